"""Why presses keep what they keep: attention reconstruction and single-token eviction."""

from .eviction import eviction_study
from .reconstruction import attention_errors, reconstruction_study

__all__ = ["attention_errors", "eviction_study", "reconstruction_study"]
