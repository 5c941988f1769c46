"""Where the kept keys and values live: transformers cache layers that hold only what a press kept.

``dense`` (every head the same count), ``ragged`` (each head its own count,
stored flat), ``masked`` (kvpress's layout, the reference), ``stack``
(several contexts' caches as one batch), ``gather`` (copying kept tokens).
"""
