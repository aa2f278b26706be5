"""The dependency rules of the tree (.importlinter: layers, viq without mllm, no cycles) and no private
names imported across modules: checked here so that the test command enforces them, not only `make lint`."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed (pip install -e .[dev])")
    proc = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("mllm", "viq"):
            found += [f"{path.relative_to(REPO)}: from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_")]
    return found


def test_no_private_name_is_imported_across_modules():
    files = sorted([*(REPO / "mllm").rglob("*.py"), *(REPO / "viq").rglob("*.py")])
    bad = [line for f in files for line in _private_imports(f)]
    assert not bad, "\n".join(bad)
