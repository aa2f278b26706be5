"""Weight loaders: SigLIP / SigLIP2 checkpoints in Hugging Face format, the authors' released weights, and
stage-to-stage key maps."""

from viq.convert.keymap import KeyMapReport, apply_key_map
from viq.convert.reference import load_reference
from viq.convert.siglip2 import load_siglip2

__all__ = ["KeyMapReport", "apply_key_map", "load_reference", "load_siglip2"]
