"""Where an image sits in the LLM's token sequence: one `<image>` placeholder in the text, expanded to
``num_image_tokens(h, w)`` positions for an (h, w) patch grid. The projector produces exactly that many
embeddings per image (2x2 pooling, a newline token per pooled row, begin and end tokens), and the data
pipeline, inference and the model's own check all count with this one function.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"


def num_image_tokens(h: int, w: int) -> int:
    """LLM tokens for an image with an (h, w) patch grid; both sides must be even (2x2 pooling)."""
    if h <= 0 or w <= 0 or h % 2 or w % 2:
        raise ValueError(f"patch grid ({h}, {w}) must have positive even sides for 2x2 pooling")
    return (h // 2) * (w // 2 + 1) + 2
