"""Tasks and data for measuring accuracy under compression."""
