"""ViQ: text-aligned visual quantized representations at any resolution."""

from viq.tokenizer import Codes, ViQTokenizer

__all__ = ["Codes", "ViQTokenizer"]
