"""Shared fixtures for the mllm.data tests: the test tokenizer and tiny images on disk."""

from __future__ import annotations

import pytest
from PIL import Image

from mllm.model.text_tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture
def make_image(tmp_path):
    """Write a solid-colour PNG of (width, height) under tmp_path and return its path."""

    def make(name: str, width: int = 64, height: int = 64, colour=(200, 30, 30)):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), colour).save(path)
        return path

    return make
