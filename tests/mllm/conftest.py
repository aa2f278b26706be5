"""Fixtures of the MLLM tests: one intra-op thread, and a small demo data set shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.demo.data import generate_demo


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # the tiny debug models run ~10x faster on one thread than on two when the two cores are shared
    # (measured: 8 debug training steps 34 s -> 1.8 s under a load average of 4.5)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """48 training samples (about 8 packs of 256 tokens with the debug recipes), 6 val, 6 test."""
    return generate_demo(tmp_path_factory.mktemp("demo"), n_train=48, n_val=6, n_test=6, seed=0)
