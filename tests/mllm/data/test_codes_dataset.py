"""Training from code shards: CodesDataset items equal SupervisedDataset + ViQTokenizer.encode, missing codes
are counted (or raise), collate_packed carries a row's codes as one flat tensor, and the step-0 loss equals the
online ViQ path's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data.codes import CodesDataset, CodeStore, codes_dataset, default_image_root
from mllm.data.dataset import SupervisedDataset
from mllm.data.packing import collate_packed, collate_padded
from mllm.data.readers import read_samples
from mllm.model.llm import load_llm
from mllm.model.mllm import MLLM, VisualInput
from mllm.model.projector import Projector
from mllm.tools.extract import extract
from viq.tokenizer import ViQTokenizer


def lively_tokenizer() -> ViQTokenizer:
    # a fresh random head maps every patch to the FSQ grid's centre; scaling its projection gives varied codes
    tok = ViQTokenizer.from_preset("debug", seed=0)
    with torch.no_grad():
        tok.head.project_in.weight.mul_(200.0)
    return tok.eval()


def conv(question: str, n_images: int = 1) -> list[dict]:
    return [
        {"from": "human", "value": "<image>\n" * n_images + question},
        {"from": "gpt", "value": "It is a picture of noise."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ]


def write_images(root: Path, sizes: list[tuple[int, int]]) -> list[str]:
    rng = np.random.default_rng(1)
    names = []
    for i, (w, h) in enumerate(sizes):
        names.append(f"img/{i}.png")
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / names[-1])
    return names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    names = write_images(root, [(64, 64), (160, 96), (96, 200), (130, 70)])
    records = [
        {"id": "one", "image": names[0], "conversations": conv("What is this?")},
        {"id": "two", "image": [names[1], names[2]], "conversations": conv("Compare them.", 2)},
        # ViQ's per-image resize: another size, so another key
        {"id": "viq", "image": {"img_path": names[0], "resize": "96x32"}, "conversations": conv("Again?")},
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    data = root / "data.json"
    data.write_text(json.dumps(records))
    vtok = lively_tokenizer()
    extract(vtok, data, root / "codes", shard_size=2, batch_patches=100, progress=False)
    # a second annotation file whose last sample's image was never extracted
    extra = {"id": "new", "image": names[3], "conversations": conv("And this?")}
    (root / "more.json").write_text(json.dumps([*records, extra]))
    llm, tok = load_llm("debug", init="random")
    return root, data, vtok, llm, tok


def pixel_dataset(data: Path, tok, store: CodeStore) -> SupervisedDataset:
    return SupervisedDataset(read_samples(data), tok, patch_size=store.patch_size, image=store.image)


def test_items_equal_pixels_plus_encode(setup):
    root, data, vtok, _, tok = setup
    store = CodeStore(root / "codes", expected_tokenizer=vtok)
    assert "img/0.png?area=9216&multiple=32" in store and "img/0.png" in store
    cds, sds = codes_dataset(data, tok, store), pixel_dataset(data, tok, store)
    assert len(cds) == len(sds) == 4 and cds.lengths == sds.lengths
    for i in range(len(cds)):
        got, want = cds[i], sds[i]
        assert "pixel_values" not in got
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["image_grids"], want["image_grids"])
        encoded = [vtok.encode([x])[0] for x in want["pixel_values"]]
        sizes = [h * w * store.codes_per_patch for h, w in got["image_grids"].tolist()]
        assert got["codes"].dtype == torch.int64 and got["codes"].shape == (sum(sizes),)
        for c, e in zip(got["codes"].split(sizes), encoded, strict=True):
            assert torch.equal(c, e.indices)


def test_missing_codes_are_counted_or_raise(setup):
    root, _, _, _, tok = setup
    store = CodeStore(root / "codes")
    more = root / "more.json"
    ds = CodesDataset(read_samples(more), tok, store, image_root=default_image_root(more))
    assert len(ds) == 4 and ds.skipped["no codes"] == 1
    with pytest.raises(ValueError, match="'new'.*img/3.png"):
        CodesDataset(read_samples(more), tok, store, image_root=root, strict=True)


def test_collate_sends_codes_as_one_tensor(setup):
    root, data, _, _, tok = setup
    store = CodeStore(root / "codes")
    ds = codes_dataset(data, tok, store)
    items = [ds[i] for i in range(len(ds))]
    packed = collate_packed(items)
    assert "pixel_values" not in packed and isinstance(packed["codes"], torch.Tensor)
    # the images of the samples one, two (two images) and viq (the resized copy of img/0), in row order
    keys = ["img/0.png", "img/1.png", "img/2.png", "img/0.png?area=9216&multiple=32"]
    assert packed["image_grids"].tolist() == [list(store.grid(k)) for k in keys]
    sizes = [h * w * store.codes_per_patch for h, w in packed["image_grids"].tolist()]
    parts = packed["codes"].split(sizes)
    assert len(parts) == 4 and packed["codes"].numel() == sum(sizes)
    for part, key in zip(parts, keys, strict=True):
        assert torch.equal(part, store[key][0])
    assert not torch.equal(parts[0], parts[1][: len(parts[0])])  # the images' codes differ: the check has teeth
    padded = collate_padded(items, pad_token_id=0)
    assert torch.equal(padded["codes"], packed["codes"]) and padded["input_ids"].shape[0] == 4
    pixels = pixel_dataset(data, tok, store)[0]
    with pytest.raises(ValueError, match="pixels and codes mixed"):
        collate_packed([items[0], pixels])


def test_step0_loss_equals_online_viq(setup):
    root, data, vtok, llm, tok = setup
    store = CodeStore(root / "codes", expected_tokenizer=vtok)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    projector = Projector(vtok.cfg.encoder.width, llm.config.hidden_size)
    online = MLLM(llm, VisualInput(vtok, "continuous", use_head=True), image_token_id, projector).eval()
    offline = MLLM(llm, VisualInput(vtok, "discrete"), image_token_id, projector).eval()
    cds, sds = codes_dataset(data, tok, store), pixel_dataset(data, tok, store)
    with torch.no_grad():
        from_codes = offline(**collate_packed([cds[i] for i in range(len(cds))])).loss
        from_pixels = online(**collate_packed([sds[i] for i in range(len(sds))])).loss
    assert torch.isfinite(from_codes)
    torch.testing.assert_close(from_codes, from_pixels, rtol=1e-5, atol=1e-5)
