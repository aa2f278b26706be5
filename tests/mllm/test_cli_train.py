"""`viq train` through the real entry point (in-process and as the console script) on the demo data,
and the CLI's help, stubs and launcher arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mllm_helpers import RECIPES, REPO, debug_overrides, read_log, step_losses

from mllm.cli import DELEGATED, _strip_local_rank, main, single_process_rendezvous
from mllm.config import load_recipe
from mllm.model.layout import LLM_DIR, MLLM_CONFIG, VISUAL_WEIGHTS
from mllm.train.trainer import training_arguments
from viq.configio import ConfigError


def test_debug_recipe_trains_and_loss_falls(demo_data, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", str(RECIPES / "debug" / "sft_lora.yaml"),
               *debug_overrides(demo_data, out, "train.max_steps=12")])
    assert rc == 0
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 13))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (10, 11, 12)]
    assert sum(last) / 3 < sum(first) / 3 - 0.1, losses
    rec = read_log(out)[0]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "samples_per_s", "peak_mem_gib",
                "lr_projector", "lr_llm"):
        assert key in rec, key
    assert rec["tokens_per_s"] > 0 and rec["peak_mem_gib"] > 0
    # the output directory is a checkpoint: adapters, trainable visual weights, the recipe
    assert (out / LLM_DIR / "adapter_model.safetensors").is_file()
    assert (out / VISUAL_WEIGHTS).is_file() and (out / MLLM_CONFIG).is_file()


@pytest.mark.slow
def test_console_script(demo_data, tmp_path):
    viq = Path(sys.executable).parent / "viq"
    if not viq.is_file():
        pytest.skip("the viq console script is not installed in this environment")
    out = tmp_path / "run"
    cmd = [str(viq), "train", str(RECIPES / "debug" / "pretrain_projector.yaml"),
           *debug_overrides(demo_data, out, "train.max_steps=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(step_losses(out)) == [1, 2]
    assert "step 2" in proc.stdout  # the jsonl logger also reports to stdout


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "export", *DELEGATED):
        assert command in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "train.max_steps" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(DELEGATED))
def test_subcommand_help_reaches_its_own_parser(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bad_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(RECIPES / "debug" / "sft_lora.yaml"), "train.max_stepz=3"])
    assert exc.value.code == 2
    assert "train.max_stepz" in capsys.readouterr().err


def test_deepspeed_local_rank_is_ignored():
    assert _strip_local_rank(["--local_rank=1", "train", "r.yaml", "a=1"]) == ["train", "r.yaml", "a=1"]
    assert _strip_local_rank(["--local_rank", "0", "train", "r.yaml"]) == ["train", "r.yaml"]


VARIANTS = {
    "padded_batch2": ("sft_lora", "data.packing=false", "train.per_device_batch_size=2"),
    "grad_accum": ("sft_full", "train.grad_accum=2"),
    "continuous_ckpt": ("sft_lora_continuous", "train.gradient_checkpointing=true", "trainable.tower=true"),
    "dora": ("sft_lora", "lora.dora=true"),
    "bf16": ("sft_lora", "model.dtype=bfloat16"),
    "projector_only": ("pretrain_projector",),
    "embedder": ("sft_full", "trainable.embedder=true", "lr.embedder=1e-4"),
}


def test_one_plain_process_gets_the_rendezvous_a_launcher_would_set():
    env = {"PATH": "/bin"}
    single_process_rendezvous(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536
    launched = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    single_process_rendezvous(before := dict(launched))
    assert before == launched  # a launcher's world is left as it is
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node N -m mllm.cli train"):
        single_process_rendezvous({"RANK": "1"})  # half a launch: say which launcher commands work


def test_ddp_timeout_reaches_the_training_arguments(tmp_path):
    cfg = load_recipe(RECIPES / "debug" / "sft_full.yaml", [f"train.output_dir={tmp_path}", "train.ddp_timeout=42"])
    assert training_arguments(cfg, torch.float32, has_eval=False).ddp_timeout == 42
    assert load_recipe(RECIPES / "debug" / "sft_full.yaml").train.ddp_timeout == 600  # minutes, not days
    with pytest.raises(ConfigError, match="ddp_timeout"):
        load_recipe(RECIPES / "debug" / "sft_full.yaml", ["train.ddp_timeout=0"])


@pytest.mark.smoke
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_recipe_variants_train(variant, demo_data, tmp_path):
    recipe, *extra = VARIANTS[variant]
    out = tmp_path / "run"
    assert main(["train", str(RECIPES / "debug" / f"{recipe}.yaml"),
                 *debug_overrides(demo_data, out, "train.max_steps=2", *extra)]) == 0
    losses = step_losses(out)
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values()), losses
