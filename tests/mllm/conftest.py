"""Fixtures of the MLLM tests: a small demo data set shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.data.demo import generate_demo


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """48 training samples (about 8 packs of 256 tokens with the debug recipes), 6 val, 6 test."""
    return generate_demo(tmp_path_factory.mktemp("demo"), n_train=48, n_val=6, n_test=6, seed=0)
