"""The pixel-decoder stage's training settings (mllm.stages.decoder): each one honoured or refused by name.
Resuming reproduces the uninterrupted run's log lines bit for bit (CPU fp32, seeded draws, the optimizer,
scheduler, RNG and metric window restored); a finished run resumed writes nothing; a log of another run is
never deleted. The init is the random `debug` preset (it has an FSQ head and an RGB decoder), so no
earlier stage has to run first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mllm_helpers import REPO, debug_overrides, read_log
from safetensors.torch import load_file

from mllm.cli import main
from mllm.config import load_recipe
from mllm.stages.decoder import DECODER_WEIGHTS, STATE_FILE
from mllm.stages.run import run_stage
from viq.configio import ConfigError

RECIPE = REPO / "recipes" / "tokenizer" / "debug" / "decoder.yaml"
BASE = ("stage.init=debug", "train.max_steps=6", "train.logging_steps=1", "train.per_device_batch_size=4",
        "stage.stability_every=2", "stage.metrics_window=4")


def decoder_cfg(demo, out: Path, *extra: str):
    return load_recipe(RECIPE, debug_overrides(demo, out, *BASE, *extra))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")),
                  key=lambda n: int(n.split("-")[1]))


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory) -> Path:
    """Six steps with a checkpoint every three; evaluated on the val split every two steps."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_stage(decoder_cfg(demo_data, out, "train.save_steps=3", f"data.eval={demo_data['val']}",
                          "train.eval_steps=2"))
    return out


@pytest.mark.parametrize("override, key", [
    ("train.deepspeed=recipes/deepspeed/zero2.json", "train.deepspeed"),
    ("train.report_to=[jsonl,wandb]", "train.report_to"),
    ("train.report_to=[tensorboard]", "train.report_to"),
    ("train.gradient_checkpointing=true", "train.gradient_checkpointing"),
    ("train.calibrate_projector=true", "train.calibrate_projector"),
])
def test_refused_settings_are_named(override, key, demo_data, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_stage(decoder_cfg(demo_data, tmp_path / "out", override))
    assert not (tmp_path / "out").exists()


def test_several_ranks_are_refused(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ConfigError, match="2 ranks"):
        run_stage(decoder_cfg(demo_data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_are_refused(demo_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mllm.cli", "train", str(RECIPE), *debug_overrides(demo_data, out, *BASE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "started as 2 ranks" in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert not out.exists()


def test_checkpoints_eval_and_log(uninterrupted):
    records = read_log(uninterrupted)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_recon_psnr" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["eval_images"] == 6 for r in evals)
    assert evals[-1]["eval_recon_loss"] < evals[0]["eval_recon_loss"]
    assert checkpoints(uninterrupted) == ["checkpoint-3", "checkpoint-6"]
    assert not [p for p in uninterrupted.iterdir() if p.name.startswith(".")]  # no temporary folder left
    report = json.loads((uninterrupted / "stage_report.json").read_text())
    assert report["eval_metrics"] == evals[-1] and report["final_metrics"] == train[-1]
    final = load_file(str(uninterrupted / "viq_tokenizer" / "model.safetensors"))
    saved = load_file(str(uninterrupted / "checkpoint-6" / DECODER_WEIGHTS))
    assert saved and all(torch.equal(final[k], v) for k, v in saved.items())


def test_resume_in_place_reproduces_the_uninterrupted_run(uninterrupted, demo_data, tmp_path):
    """Stopped after step 5 (the final outputs not yet written), resumed with train.resume=true: the
    newest complete checkpoint is checkpoint-3; a newer half-written one is skipped."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "viq_tokenizer")
    shutil.rmtree(out / "checkpoint-6")
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / DECODER_WEIGHTS).write_bytes(b"")  # no state file: incomplete
    reference = read_log(uninterrupted)
    with (out / "log.jsonl").open("w") as fh:  # the stopped run logged up to step 5, the last line cut
        fh.writelines(json.dumps(r) + "\n" for r in reference if r["step"] <= 5)
        fh.write('{"step": 6, "reco')
    run_stage(decoder_cfg(demo_data, out, "train.save_steps=3", f"data.eval={demo_data['val']}",
                          "train.eval_steps=2", "train.resume=true"))
    assert read_log(out) == reference  # bit for bit, every line of steps 1-6, each once
    for name in ("viq_tokenizer/model.safetensors", f"checkpoint-6/{DECODER_WEIGHTS}"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_resume_from_a_checkpoint_dir_into_a_new_output_dir(uninterrupted, demo_data, tmp_path):
    out = tmp_path / "run"
    run_stage(decoder_cfg(demo_data, out, "train.save_steps=3", f"data.eval={demo_data['val']}",
                          "train.eval_steps=2", f"train.resume_from_checkpoint={uninterrupted / 'checkpoint-3'}"))
    assert read_log(out) == [r for r in read_log(uninterrupted) if r["step"] > 3]
    assert checkpoints(out) == ["checkpoint-6"]


def test_resuming_a_finished_run_writes_nothing(uninterrupted, demo_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = snapshot(out)
    cfg = decoder_cfg(demo_data, out, "train.save_steps=3", "train.resume=true")
    assert run_stage(cfg) == out / "viq_tokenizer"
    assert snapshot(out) == before
    # a shorter max_steps does not train either; a lost export is rewritten from the final checkpoint
    shutil.rmtree(out / "viq_tokenizer")
    run_stage(decoder_cfg(demo_data, out, "train.max_steps=4", "train.resume=true"))
    assert snapshot(out) == before


def test_save_total_limit_keeps_the_newest(demo_data, tmp_path):
    out = tmp_path / "run"
    run_stage(decoder_cfg(demo_data, out, "train.max_steps=5", "train.save_steps=1", "train.save_total_limit=2",
                          "train.report_to=[]"))
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-5"]
    assert json.loads((out / "checkpoint-5" / STATE_FILE).read_text())["global_step"] == 5
    assert not (out / "log.jsonl").exists()  # report_to=[]: no log file


def test_a_log_of_another_run_is_never_deleted(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    foreign = '{"step": 1, "loss": 3.0}\n{"step": 7, "loss": 2.0}\n'
    (out / "log.jsonl").write_text(foreign)
    for extra in ((), ("train.resume=true",)):  # resume=true with no checkpoint there starts fresh too
        with pytest.raises(SystemExit):  # the CLI reports a ConfigError as a usage error
            main(["train", str(RECIPE), *debug_overrides(demo_data, out, *BASE, *extra)])
        assert f"train.output_dir='{out}' already holds log.jsonl of another run" in capsys.readouterr().err
    assert (out / "log.jsonl").read_text() == foreign
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]


def test_resume_from_a_foreign_checkpoint_is_refused(uninterrupted, demo_data, tmp_path):
    with pytest.raises(ConfigError, match="train.resume_from_checkpoint"):
        run_stage(decoder_cfg(demo_data, tmp_path / "run", f"train.resume_from_checkpoint={uninterrupted}"))
    # another run's log in the output dir, and a checkpoint from elsewhere
    out = tmp_path / "run2"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="lies outside train.output_dir"):
        run_stage(decoder_cfg(demo_data, out, f"train.resume_from_checkpoint={uninterrupted / 'checkpoint-3'}"))
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'
