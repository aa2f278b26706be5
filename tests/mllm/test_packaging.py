"""The wheel carries the recipes, the data set descriptors and the package data, and `viq` works from an empty
folder with nothing but the installed package: recipe and demo-settings names resolve inside it, and the demo
writes only under the current directory. That demo is `viq demo ci` whole, and its report is checked here too
(one run instead of a second one in tests/mllm/demo/test_demo.py).

The wheel is built from a copy of the source (so that the build writes nothing into the checkout) and
installed with --target into a folder put first on PYTHONPATH of the subprocesses, so that `import mllm` comes
from the wheel while torch and the rest come from this environment; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from mllm_helpers import REPO

pytestmark = pytest.mark.slow



def _files(root: Path) -> dict[str, tuple[int, int]]:
    skip = {".git", ".venv", "__pycache__"}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mllm", "viq", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    (src / "data").mkdir()
    for path in [*(REPO / "data").glob("*.yaml"), REPO / "data" / "README.md"]:  # never the downloaded data
        shutil.copy(path, src / "data" / path.name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    t0 = time.perf_counter()
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("viq-*.whl"))
    t1 = time.perf_counter()
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    print(f"wheel built in {t1 - t0:.1f} s, installed in {time.perf_counter() - t1:.1f} s")
    return {"wheel": wheel, "site": tmp / "site", "tmp": tmp}


def _run(installed: dict, cwd: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    home = installed["tmp"] / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XDG_", "MPL", "HF_"))}
    # only the subprocess sees these: the wheel first on the path, no .pyc written into it, a fresh HOME so that
    # every write outside the current directory shows, one thread as in conftest.one_thread
    env.update(PYTHONPATH=str(installed["site"]), PYTHONDONTWRITEBYTECODE="1", HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_wheel_holds_the_packages_recipes_and_data_files(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    wanted = {f"mllm/recipes/{p.relative_to(REPO / 'recipes').as_posix()}"
              for p in (REPO / "recipes").rglob("*") if p.suffix in (".yaml", ".json")}
    wanted |= {f"mllm/datasets/{p.name}" for p in [*(REPO / "data").glob("*.yaml"), REPO / "data" / "README.md"]}
    wanted |= {"mllm/model/debug_corpus.txt"}
    # the package list in pyproject.toml is written by hand: every module of the tree must be in the wheel
    wanted |= {p.relative_to(REPO).as_posix() for d in ("mllm", "viq") for p in (REPO / d).rglob("*.py")}
    assert not wanted - names, sorted(wanted - names)
    # data/'s top-level files only, never downloaded or generated data from its subfolders
    assert not [n for n in names if n.startswith("mllm/datasets/") and "/" in n.removeprefix("mllm/datasets/")]


# one process for the names and both recipes' --print-config (each process of its own cost about 5 s)
EMPTY_FOLDER = """
import mllm, mllm.config as c, mllm.data.descriptors as d
from mllm.cli import main
print(mllm.__file__); print(c.resolve_recipe('demo/ci')); print(d.find_descriptor('llava-665k'))
for recipe in ('debug/sft_full', 'qwen3/sft_lora'):
    print('=== print-config'); main(['train', recipe, '--print-config'])
"""


@pytest.fixture(scope="module")
def from_empty_folder(installed, tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("empty")
    names, *configs = _run(installed, cwd, "-c", EMPTY_FOLDER).stdout.split("=== print-config\n")
    return {"names": names.split(), "configs": [yaml.safe_load(c) for c in configs], "left": list(cwd.iterdir())}


def test_names_resolve_inside_the_installed_package(installed, from_empty_folder):
    lines = from_empty_folder["names"]
    site = installed["site"].resolve()
    assert all(Path(line).resolve().is_relative_to(site) for line in lines), lines
    assert lines[1].endswith("mllm/recipes/demo/ci.yaml") and lines[2].endswith("mllm/datasets/llava-665k.yaml")


def test_print_config_from_an_empty_folder(from_empty_folder):
    cfg, qwen3 = from_empty_folder["configs"]
    assert cfg["train"]["output_dir"] == "outputs/debug/sft_full" and cfg["trainable"]["llm"] == "full"
    assert cfg["data"]["image"]["area"] == 4096  # from its base, debug/pretrain_projector.yaml
    assert qwen3["data"]["train"] == "data/llava/llava_v1_5_mix665k.json"  # the shipped descriptor, cwd-relative
    assert not from_empty_folder["left"]


@pytest.mark.smoke
def test_demo_from_an_empty_folder_writes_only_there_the_whole_report(installed, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    site_before, started = _files(installed["site"]), time.time()
    _run(installed, cwd, "-m", "mllm.cli", "demo", "ci", timeout=300)
    print(f"demo ran in {time.time() - started:.1f} s")
    written = set(_files(cwd))
    report = cwd / "demo-report-ci"
    for name in ("report.md", "results.json", "loss_curves.png", "reconstructions.png", "speedup.png"):
        assert (report / name).stat().st_size > 0, name
    assert any(p.startswith("runs/demo-ci/") for p in written)
    assert _files(installed["site"]) == site_before, "the demo wrote into the installed package"
    # other work may change the checkout meanwhile (and its data/ may be large): look only where the demo writes
    for top in {w.split("/")[0] for w in written}:
        fresh = [p for p in (REPO / top).rglob("*") if p.is_file() and p.stat().st_mtime >= started]
        assert not fresh, f"the demo wrote into the checkout: {fresh[:5]}"
    # outside the current directory only matplotlib's own font cache and config folder, under HOME
    home = [p for p in _files(installed["tmp"] / "home")]
    assert all(p.startswith((".cache/matplotlib/", ".config/matplotlib/")) for p in home), home

    results = json.loads((report / "results.json").read_text())
    # both MLLMs were evaluated on the same test questions, and every pipeline step was timed
    assert results["eval_codes"]["n"] == results["eval_continuous"]["n"] == 16
    assert set(results["step_seconds"]) == {"generate data", "train tokenizer", "extract codes",
                                            "train MLLM from codes", "train continuous baseline", "evaluate",
                                            "benchmark", "report"}
    assert results["extract"]["counts"]["images"] == 120
    md = (report / "report.md").read_text()
    assert "VQA accuracy" in md and "saving vs continuous" in md
