"""Data set descriptors: a recipe names one in data.train; its files, or an error that says how to get them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mllm_helpers import RECIPES, REPO

from mllm.cli import main
from mllm.config import load_recipe
from mllm.data.descriptors import MissingDataError, find_descriptor, load_descriptor, resolve_data
from viq.configio import ConfigError

PREPARE = ["wget -O data/mine/ann.json https://example.org/ann.json", "unzip -q data/mine/img.zip -d data/mine/img"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """An empty current directory with one descriptor, data/mine.yaml, whose files do not exist yet."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        "annotation: data/mine/ann.json\nimage_root: data/mine/img\nsource: https://example.org\n"
        "licence: CC BY 4.0\nsize: 1 kB\nsha256: null\nprepare:\n" + "".join(f"  - {c}\n" for c in PREPARE))
    return tmp_path


def _recipe(*overrides: str):
    return load_recipe(RECIPES / "debug" / "sft_lora.yaml", ["data.demo=false", *overrides])


def _prepare(root: Path) -> None:
    (root / "data" / "mine" / "img").mkdir(parents=True)
    (root / "data" / "mine" / "ann.json").write_text("[]")


def test_a_name_resolves_to_the_descriptors_files(in_tmp):
    _prepare(in_tmp)
    cfg = resolve_data(_recipe("data.train=mine"), check_files=True)
    assert (cfg.data.train, cfg.data.image_root) == ("data/mine/ann.json", "data/mine/img")
    # the rest of the recipe is untouched, and an explicit image_root wins over the descriptor's
    assert cfg.model == _recipe().model and cfg.data.image == _recipe().data.image
    assert resolve_data(_recipe("data.train=mine", "data.image_root=elsewhere")).data.image_root == "elsewhere"
    # a descriptor file named by its path works as well
    assert resolve_data(_recipe("data.train=data/mine.yaml")).data.train == "data/mine/ann.json"


def test_paths_are_left_alone():
    cfg = _recipe("data.train=data/demo/train.json")
    assert resolve_data(cfg) is cfg
    for value in ("data/demo/train.json", "train.json", "shards.parquet", str(REPO / "nothing" / "x.json")):
        assert find_descriptor(value) is None, value


def test_missing_files_say_how_to_get_them(in_tmp):
    cfg = _recipe("data.train=mine")
    assert resolve_data(cfg).data.train == "data/mine/ann.json"  # no files needed to resolve (or print) a recipe
    with pytest.raises(MissingDataError) as err:
        resolve_data(cfg, check_files=True)
    text = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "'mine'" in text and "data/mine/ann.json" in text and "data/README.md" in text
    assert all(cmd in text for cmd in PREPARE)
    # `viq train` stops with the same message before building anything
    with pytest.raises(SystemExit) as exc:
        main(["train", str(RECIPES / "debug" / "sft_lora.yaml"), "data.train=mine", "data.demo=false",
              f"train.output_dir={in_tmp / 'out'}"])
    assert "is not prepared" in str(exc.value.code) and PREPARE[0] in str(exc.value.code)
    assert not (in_tmp / "out").exists()


def test_checksum_is_checked_once_set(in_tmp):
    _prepare(in_tmp)
    desc = in_tmp / "data" / "mine.yaml"
    good = hashlib.sha256(b"[]").hexdigest()
    desc.write_text(desc.read_text().replace("sha256: null", f"sha256: {good}"))
    resolve_data(_recipe("data.train=mine"), check_files=True)
    desc.write_text(desc.read_text().replace(good, "f" * 64))
    with pytest.raises(MissingDataError, match="sha256"):
        resolve_data(_recipe("data.train=mine"), check_files=True)


def test_unknown_name_is_a_clear_error(in_tmp):
    with pytest.raises(ConfigError, match=r"'llava-66k' is neither an existing file or directory nor a data set "
                                          r"descriptor \(known: .*mine"):
        resolve_data(_recipe("data.train=llava-66k"))
    with pytest.raises(ConfigError, match="descriptor nowhere.yaml does not exist"):
        resolve_data(_recipe("data.train=nowhere.yaml"))
    (in_tmp / "data" / "bad.yaml").write_text("annotation: a.json\nlicense: typo\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key license"):
        resolve_data(_recipe("data.train=bad"))


SHIPPED = sorted((REPO / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_descriptors_are_complete(path):
    desc = load_descriptor(path)
    assert desc.source and desc.licence and desc.size and desc.prepare
    # paths relative to the current directory, never to the package, and under data/ (which git ignores)
    for p in (desc.annotation, desc.image_root):
        assert p is None or (not Path(p).is_absolute() and p.startswith("data/")), p
    # data/README.md shows the same commands
    readme = (REPO / "data" / "README.md").read_text()
    assert all(cmd.splitlines()[0] in readme for cmd in desc.prepare if not cmd.startswith("#")), path.name


def test_family_recipes_name_shipped_descriptors():
    assert {p.stem for p in SHIPPED} >= {"llava-558k", "llava-665k"}
    assert load_recipe(RECIPES / "qwen2.5" / "pretrain_projector.yaml").data.train == "llava-558k"
    assert load_recipe(RECIPES / "qwen2.5" / "sft_lora.yaml").data.train == "llava-665k"


def test_the_python_entry_points_resolve_names_too(in_tmp):
    # run_training / run_stage are what library users call: they resolve the name and check the files
    from mllm.stages.run import run_stage
    from mllm.train.trainer import run_training

    with pytest.raises(MissingDataError, match="wget -O data/mine/ann.json"):
        run_training(_recipe("data.train=mine", f"train.output_dir={in_tmp / 'out'}"))
    stage = load_recipe(RECIPES / "tokenizer" / "debug" / "decoder.yaml",
                        ["data.demo=false", "data.train=mine", f"train.output_dir={in_tmp / 'out'}"])
    with pytest.raises(MissingDataError, match="mine"):
        run_stage(stage)
    assert not (in_tmp / "out").exists()
