"""``viq sweep --launcher slurm``: one shell script per cell and a SLURM array script that runs them.

A cell's script runs each stage as ``torchrun ... -m mllm.cli sweep SWEEP --cell V/S --stage NAME`` (a
finished stage is skipped, an interrupted one restarted, as in a local run), then the metrics in one process
(``--cell V/S``). The folder layout is the local one, so ``viq sweep SWEEP --collect`` writes the report.
Files go to ``work_dir/jobs/``: ``<variant>-seed<seed>.sh``, ``cells.txt`` (the array's task list) and
``sweep.sbatch`` (submit it with ``sbatch``).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from mllm.tools.sweep_config import Cell, Plan


def _write(path: Path, text: str, executable: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if executable:
        tmp.chmod(0o755)
    os.replace(tmp, path)


def cell_script(plan: Plan, cell: Cell, sweep_file: str, overrides: list[str]) -> str:
    python = shlex.quote(sys.executable)
    args = " ".join(shlex.quote(a) for a in [str(Path(sweep_file).resolve()) if Path(sweep_file).is_file()
                                               else sweep_file, *overrides, "--cell", cell.key])
    lines = ["#!/usr/bin/env bash",
             f"# sweep {plan.sweep.name}, cell {cell.key}: every stage under torchrun (finished ones are skipped), "
             "then the metrics",
             "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}",
             f'NPROC="${{NPROC_PER_NODE:-{plan.sweep.slurm.nproc_per_node}}}"']
    for stage in plan.stages:
        lines.append(f'{python} -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m mllm.cli sweep '
                     f"{args} --stage {shlex.quote(stage.name)}")
    lines.append(f"{python} -m mllm.cli sweep {args}")
    return "\n".join(lines) + "\n"


def array_script(plan: Plan, jobs: Path, n: int) -> str:
    sbatch = [f"#SBATCH --job-name=viq-sweep-{plan.sweep.name}", f"#SBATCH --array=0-{n - 1}",
              f"#SBATCH --output={jobs / 'slurm-%A_%a.out'}",
              *(f"#SBATCH {opt}" for opt in plan.sweep.slurm.sbatch)]
    return "\n".join(["#!/usr/bin/env bash", *sbatch,
                      f"# {n} cells of sweep {plan.sweep.name}, one array task each; then: viq sweep ... --collect",
                      "set -euo pipefail",
                      f'script=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(jobs / "cells.txt"))})',
                      f'exec bash {shlex.quote(str(jobs))}/"$script"', ""])


def write_slurm(plan: Plan, sweep_file: str, overrides: list[str]) -> Path:
    """Write the scripts (see the module doc); returns the array script's path."""
    jobs = (plan.sweep.work / "jobs").resolve()
    jobs.mkdir(parents=True, exist_ok=True)
    names = []
    for cell in plan.cells:
        name = f"{cell.variant}-seed{cell.seed}.sh"
        _write(jobs / name, cell_script(plan, cell, sweep_file, overrides), executable=True)
        names.append(name)
    _write(jobs / "cells.txt", "\n".join(names) + "\n")
    _write(jobs / "sweep.sbatch", array_script(plan, jobs, len(names)), executable=True)
    return jobs / "sweep.sbatch"
