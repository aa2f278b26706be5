"""ViQ code shards on the training side: the shard format's shared pieces, the in-memory CodeStore, and
CodesDataset, which feeds the MLLM's discrete input path from stored codes instead of pixels.

Image keys, the tokenizer identity and the per-image preprocessing rule live here because both the
writer (mllm.tools.extract) and the readers must agree on them byte for byte.

Image key: the image path relative to ``image_root`` (posix), or the absolute path for an image
outside it. A reference that overrides the preprocessing (ViQ's ``"resize": "<base>x<multiple>"``)
gets ``?area=A&multiple=M`` appended: the same file at another size has other codes.

CodesDataset renders and expands conversations exactly as SupervisedDataset does (it is one), but
takes each image's patch grid from the store, so no image file is ever opened, and its items carry
``codes`` (ONE flat int64 tensor: its images' codes one after another, ``h*w*E`` each, split by
``image_grids``) in place of ``pixel_values``. A sample whose image
has no codes is skipped and counted as "no codes" (``strict=True``: ValueError naming the sample).
Never a silent fallback to pixels.

Shapes: L expanded token length; codes [sum of h*w*E over the sample's images]; image_grids [n_img, 2] as (h, w).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mllm.data.dataset import SampleError, SupervisedDataset
from mllm.data.layout import IMAGE_TOKEN, num_image_tokens
from mllm.data.readers import ImageRef, Sample, read_samples
from viq.config import PreprocessConfig
from viq.configio import to_dict
from viq.tokenizer import ViQTokenizer

logger = logging.getLogger(__name__)

FORMAT = "viq-codes"
FORMAT_VERSION = 2  # 2: the manifest records the encoder's patch_size
UINT16_MAX_CODEBOOK = 1 << 16


# ----------------------------------------------------------------------------------- identity


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_identity(tokenizer: ViQTokenizer) -> dict:
    """Name, sha256 of the config tree, and sha256 of the encoder and head weights.

    Only the encoder and the head decide the codes and their embeddings; the pixel decoder does not,
    so a tokenizer saved with or without it keeps its identity.
    """
    h = hashlib.sha256()
    state = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("decoder.")}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "name": tokenizer.cfg.name,
        "config_sha256": sha256_json(to_dict(tokenizer.cfg)),
        "weights_sha256": h.hexdigest(),
    }


def default_image_root(dataset_path: str | os.PathLike) -> Path:
    """The folder relative image paths resolve against when no image_root is given (as read_samples)."""
    path = Path(dataset_path)
    if path.is_dir():
        return path
    if path.suffix.lower() == ".tar":
        return path.with_name(path.stem + "_images")
    return path.parent


def image_key(ref: ImageRef, image_root: str | os.PathLike) -> str:
    """The stable key of an image reference (module docstring)."""
    path, root = Path(ref.path), Path(image_root)
    try:
        key = path.relative_to(root).as_posix()
    except ValueError:
        key = path.resolve().as_posix()
    if ref.resize is not None or ref.multiple is not None:
        key += f"?area={ref.resize}&multiple={ref.multiple}"
    return key


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- reading


class CodeStore:
    """All codes of an extraction directory in memory: ``store[key] -> (LongTensor [h*w*E], (h, w))``.

    Checks each shard's sha256 against the manifest, and, given ``expected_tokenizer`` (a ViQTokenizer
    or an identity dict from ``tokenizer_identity``), that the codes come from that tokenizer.
    Codes stay in their stored integer type until asked for (2 bytes per code in memory for uint16).
    A manifest or shard that cannot be read (malformed, truncated, missing) is a ValueError naming the file.
    """

    def __init__(self, out_dir: str | os.PathLike, expected_tokenizer=None, *, verify: bool = True):
        self.root = Path(out_dir)
        path = self.root / "manifest.json"
        self.manifest = _read_manifest(path)
        if expected_tokenizer is not None:
            self.check_tokenizer(expected_tokenizer)
        keys, grids, codes, lengths = [], [], [], []
        for shard in self.manifest["shards"]:
            table = _read_shard(self.root / shard["file"], shard["sha256"] if verify else None)
            col = table.column("codes").combine_chunks()
            keys += table.column("key").to_pylist()
            grids.append(np.stack([table.column("h").to_numpy(), table.column("w").to_numpy()], axis=1))
            codes.append(col.flatten().to_numpy(zero_copy_only=False))
            lengths.append(col.value_lengths().to_numpy(zero_copy_only=False))
        self._index = {k: i for i, k in enumerate(keys)}
        self._grids = np.concatenate(grids) if grids else np.zeros((0, 2), np.int32)
        self._codes = np.concatenate(codes) if codes else np.zeros(0, np.uint16)
        self._offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else np.zeros(1, np.int64)

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def image(self) -> PreprocessConfig:
        """The preprocessing the codes were extracted with."""
        return PreprocessConfig(**self.manifest["preprocess"])

    @property
    def patch_size(self) -> int:
        return int(self.manifest["patch_size"])

    @property
    def codes_per_patch(self) -> int:
        return int(self.manifest["codes_per_patch"])

    @property
    def codebook_size(self) -> int:
        return int(self.manifest["codebook_size"])

    def check_tokenizer(self, tokenizer) -> None:
        """ValueError naming both tokenizers unless ``tokenizer`` has the manifest's config and weights.

        The weights hash covers their dtype: check the tokenizer as loaded, before casting it for training.
        """
        want = tokenizer_identity(tokenizer) if isinstance(tokenizer, ViQTokenizer) else dict(tokenizer)
        have = self.tokenizer
        fields = ("config_sha256", "weights_sha256")
        if any(want.get(f) != have.get(f) for f in fields):
            raise ValueError(
                f"codes in {self.root} come from tokenizer {_describe(have)}, "
                f"not from the given tokenizer {_describe(want)}"
            )

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        return list(self._index)

    def grid(self, key: str) -> tuple[int, int]:
        return tuple(int(v) for v in self._grids[self._row(key)])

    def _row(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"image {key!r} has no codes in {self.root}") from None

    def __getitem__(self, key: str) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.concat([key]), self.grid(key)

    def concat(self, keys: Iterable[str]) -> torch.Tensor:
        """The codes of ``keys`` one after another, as one LongTensor (cast once, not once per image)."""
        rows = [self._row(k) for k in keys]
        parts = [self._codes[self._offsets[i] : self._offsets[i + 1]] for i in rows]
        return torch.from_numpy(np.concatenate([self._codes[:0], *parts]).astype(np.int64))


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path.parent} has no manifest.json: not a finished extraction")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): extract the codes again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest.get('format_version')!r}, this version "
                         f"reads {FORMAT_VERSION}: extract the codes again with viq extract")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "sha256"} <= set(s) for s in shards):
        raise ValueError(f"{path} has no valid 'shards' list (each entry with 'file' and 'sha256'): "
                         "extract the codes again")
    return manifest


def _read_shard(file: Path, sha256: str | None):
    """The shard's table; ValueError naming it when it is missing, fails ``sha256`` or does not parse."""
    if not file.is_file():
        raise ValueError(f"shard {file} is missing: extract the codes again into {file.parent}")
    if sha256 is not None and sha256_file(file) != sha256:
        raise ValueError(f"shard {file} has a bad checksum (manifest says {sha256})")
    try:
        return pq.read_table(file, columns=["key", "h", "w", "codes"])
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"shard {file} is corrupt: {err}") from err


# ----------------------------------------------------------------------------------- data set


def expand_image_tokens(input_ids: np.ndarray, labels: np.ndarray, grids, image_token_id: int):
    """Repeat each ``<image>`` id (and its -100 label) ``num_image_tokens(h, w)`` times, as
    SupervisedDataset.load does; returns int64 tensors (input_ids, labels) of the expanded length."""
    ids = np.asarray(input_ids).astype(np.int64)
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[ids == image_token_id] = [num_image_tokens(*g) for g in grids]
    lab = np.asarray(labels).astype(np.int64)
    return torch.from_numpy(np.repeat(ids, repeats)), torch.from_numpy(np.repeat(lab, repeats))


class CodesDataset(SupervisedDataset):
    """SupervisedDataset over stored codes (module docstring). ``image_root`` must be the one the
    extraction used (by default both resolve it from the annotation path: see ``codes_dataset``)."""

    def __init__(
        self,
        samples: Iterable[Sample],
        tokenizer,
        store: CodeStore,
        *,
        image_root: str | os.PathLike,
        max_seq_len: int = 2048,
        strict: bool = False,
        image_token: str = IMAGE_TOKEN,
        max_skip_fraction: float | None = None,
        skipped: Counter | None = None,
    ):
        # set before the parent's __init__, which prepares every sample through self._grid
        self.store = store
        self.image_root = Path(image_root)
        # each reference's key, computed once: pathlib's relative_to on every load was a quarter of the loader's time
        self._keys: dict[ImageRef, str] = {}
        super().__init__(
            samples,
            tokenizer,
            patch_size=store.patch_size,
            image=store.image,
            max_seq_len=max_seq_len,
            strict=strict,
            image_token=image_token,
            max_skip_fraction=max_skip_fraction,
            skipped=skipped,
        )

    def _grid(self, ref: ImageRef) -> tuple[int, int]:
        key = self._keys.setdefault(ref, image_key(ref, self.image_root))
        if key not in self.store:
            raise SampleError("no codes", f"image {key!r} has no codes in {self.store.root}")
        grid = self.store.grid(key)
        try:
            num_image_tokens(*grid)
        except ValueError as err:
            raise SampleError("bad image size", f"image {key!r}: {err}") from err
        return grid

    def load(self, i: int) -> dict:
        rec = self.records[i]
        input_ids, labels = expand_image_tokens(rec.input_ids, rec.labels, rec.grids, self.image_token_id)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "codes": self.store.concat(self._keys[ref] for ref in rec.images),
            "image_grids": torch.tensor(rec.grids, dtype=torch.long).reshape(-1, 2),
        }


def codes_dataset(data_path, tokenizer, store: CodeStore, *, image_root=None, **kwargs) -> CodesDataset:
    """Read the annotations at ``data_path`` and join them to ``store`` (keys as the extraction made them)."""
    root = Path(image_root) if image_root is not None else default_image_root(data_path)
    skipped = Counter()  # the reader's skips and the data set's, in one count
    samples = read_samples(data_path, image_root, skipped=skipped, strict=kwargs.get("strict", False))
    return CodesDataset(samples, tokenizer, store, image_root=root, skipped=skipped, **kwargs)


def _describe(identity: dict) -> str:
    config, weights = identity.get("config_sha256", "?"), identity.get("weights_sha256", "?")
    return f"{identity.get('name')!r} (config sha256 {config[:12]}, weights sha256 {weights[:12]})"
