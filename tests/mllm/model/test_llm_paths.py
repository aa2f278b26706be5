"""model.llm values that name a path never reach the hub; hub ids honour the offline setting and fail fast; a
preset means its checkpoint, and its random shape only when model.llm_init says random."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from mllm.model import llm as llm_module
from mllm.model.llm import load_llm, load_text_tokenizer, looks_like_path


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub request fails the test: path-like values must be refused before one is made."""

    def refuse(*args, **kwargs):
        raise AssertionError("a path-like model.llm was sent to the hub")

    monkeypatch.setattr(llm_module, "hub_unreachable", refuse)
    monkeypatch.setattr(llm_module.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(llm_module.AutoTokenizer, "from_pretrained", refuse)


def test_missing_relative_directory_is_named(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="directory not found") as err:
        load_llm("./models/missing-llm")
    assert str(tmp_path / "models" / "missing-llm") in str(err.value)
    assert time.perf_counter() - start < 5


def test_missing_relative_directory_under_an_existing_parent(tmp_path, monkeypatch, no_hub):
    # no "./" prefix, but its folder exists: a path, not the hub id "models/missing-llm"
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="directory not found") as err:
        load_llm("models/missing-llm")
    assert str(tmp_path / "models" / "missing-llm") in str(err.value)


def test_missing_absolute_directory_is_named(tmp_path, no_hub):
    missing = tmp_path / "nowhere" / "llm"
    with pytest.raises(ValueError, match="directory not found") as err:
        load_llm(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match="directory not found"):
        load_text_tokenizer(str(missing))


def test_a_file_is_not_a_model_directory(tmp_path, no_hub):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a model directory"):
        load_llm(str(file))


def test_path_rules():
    assert looks_like_path("./x") and looks_like_path("../x") and looks_like_path("/x/y") and looks_like_path("~/m")
    assert not looks_like_path("someorg-that-is-not-here/some-model")


def test_uncached_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    # a closed local port: the one probe is refused at once, whatever network this machine has
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"is not \(fully\) in the Hugging Face cache .* cannot be reached") as err:
        load_llm("viq-tests-nobody/not-a-cached-model")
    assert time.perf_counter() - start < 20
    assert "--local-dir" in str(err.value) and "model.llm=DIR" in str(err.value)


def test_uncached_hub_id_offline_never_asks_the_hub(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(llm_module, "hub_unreachable", refuse)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as err:
        load_text_tokenizer("viq-tests-nobody/not-a-cached-model")
    assert time.perf_counter() - start < 20
    assert "model.llm=DIR" in str(err.value)


def test_a_local_directory_still_loads(tmp_path):
    model, tok = load_llm("debug", init="random")
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    loaded, loaded_tok = load_llm(str(tmp_path / "llm"))
    assert loaded.config.hidden_size == model.config.hidden_size
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert Path(tmp_path / "llm").is_dir()


def test_a_cached_hub_id_loads_without_asking_the_hub(tmp_path, monkeypatch):
    model, tok = load_llm("debug", init="random")
    repo = tmp_path / "hub" / "models--viq-tests--cached-llm"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked for a cached model")

    monkeypatch.setattr(llm_module, "hub_unreachable", refuse)
    loaded, loaded_tok = load_llm("viq-tests/cached-llm")
    assert loaded.config.hidden_size == model.config.hidden_size
    assert loaded_tok.get_vocab() == tok.get_vocab()
    # an adapter trained on it records the hub id as its base, not a folder of this machine's cache
    assert loaded.name_or_path == loaded.config.name_or_path == loaded_tok.name_or_path == "viq-tests/cached-llm"


def test_a_shape_only_preset_needs_llm_init_random():
    with pytest.raises(ValueError, match="llm_init: random") as err:
        load_llm("debug")
    assert "LoRA" in str(err.value) and "qwen2.5-0.5b" in str(err.value)
    with pytest.raises(ValueError, match="llm_init must be one of"):
        load_llm("debug", init="randomly")


def test_a_family_preset_loads_its_checkpoint(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", "/nonexistent-viq-test-cache")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as err:
        load_llm("qwen2.5-0.5b")  # never a random Qwen2.5-shaped network in its place
    assert "Qwen/Qwen2.5-0.5B-Instruct" in str(err.value) and "llm_init: random" in str(err.value)


def test_a_random_build_says_so_first(caplog):
    with caplog.at_level(logging.INFO):
        model, _ = load_llm("debug-llama", init="random", seed=1)
    assert "RANDOM weights" in caplog.records[0].getMessage()
    assert model.config.model_type == "llama"
