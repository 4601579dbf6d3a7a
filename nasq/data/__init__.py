"""Data: the seed's preprocessing (``transforms``), labels (``labels``), the three dataset forms
(``sources``), ``nasq preprocess`` (``preprocess``) and full logits on disk (``outputs``)."""
from .labels import find_labels, read_labels, stem
from .sources import Source, open_source
from .transforms import ImageError, normalize_u8, preprocess_float, preprocess_u8, resized_size

__all__ = ["ImageError", "Source", "find_labels", "normalize_u8", "open_source", "preprocess_float", "preprocess_u8",
           "read_labels", "resized_size", "stem"]
