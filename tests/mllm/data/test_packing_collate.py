import random

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data.chat import IGNORE_INDEX
from mllm.data.dataset import SupervisedDataset
from mllm.data.layout import num_image_tokens
from mllm.data.packing import PackedDataset, collate_packed, collate_padded, pack_best_fit_decreasing
from mllm.data.readers import ImageRef, Sample
from viq.config import PreprocessConfig

PACKED_KEYS = {"input_ids", "labels", "position_ids", "cu_seq_lens", "pixel_values", "image_grids"}


def fake_item(n, n_img=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 100, (n,), generator=g)
    labels = ids.clone()
    labels[: n // 2] = IGNORE_INDEX
    grids = torch.tensor([[2, 2 * (k + 1)] for k in range(n_img)], dtype=torch.long).reshape(-1, 2)
    pixels = [torch.full((3, 32, 32 * (k + 1)), float(seed)) for k in range(n_img)]
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_grids": grids}


def test_best_fit_decreasing_known_case():
    assert pack_best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert pack_best_fit_decreasing([], 8) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_contract(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = pack_best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))  # every sample exactly once
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert bins == pack_best_fit_decreasing(list(lengths), 128)  # deterministic
    # best fit leaves little room: no two bins could be merged
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert loads[0] + loads[1] > 128


def test_best_fit_decreasing_errors():
    with pytest.raises(ValueError, match="sample 1 has length 9"):
        pack_best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="max_seq_len"):
        pack_best_fit_decreasing([3], 0)


def test_collate_packed_contract():
    items = [fake_item(7, 1, seed=1), fake_item(5, 0, seed=2), fake_item(9, 2, seed=3)]
    batch = collate_packed(items)
    assert set(batch) == PACKED_KEYS  # no attention_mask: the mask comes from position_ids
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 21)
    cu = batch["cu_seq_lens"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 12, 21]
    pos = batch["position_ids"][0]
    # position_ids restart at 0 exactly at the boundaries, and the boundaries follow from them
    assert torch.nonzero(pos == 0).flatten().tolist() == cu[:-1].tolist()
    assert pos.tolist() == list(range(7)) + list(range(5)) + list(range(9))
    for k, item in enumerate(items):  # round trip
        s, e = cu[k].item(), cu[k + 1].item()
        assert torch.equal(batch["input_ids"][0, s:e], item["input_ids"])
        assert batch["labels"][0, s].item() == IGNORE_INDEX
        assert torch.equal(batch["labels"][0, s + 1 : e], item["labels"][1:])
    assert [float(x[0, 0, 0]) for x in batch["pixel_values"]] == [1.0, 3.0, 3.0]
    assert batch["image_grids"].tolist() == [[2, 2], [2, 2], [2, 4]]


def test_collate_packed_does_not_modify_items():
    item = fake_item(6)
    item["labels"][0] = 42
    collate_packed([item, fake_item(4)])
    assert item["labels"][0].item() == 42


def test_collate_padded():
    items = [fake_item(7, 1, seed=1), fake_item(5, 0, seed=2)]
    batch = collate_padded(items, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values", "image_grids"}
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].sum(1).tolist() == [7, 5]
    assert batch["input_ids"][1, 5:].tolist() == [0, 0] and batch["labels"][1, 5:].tolist() == [-100, -100]
    assert torch.equal(batch["labels"][0], items[0]["labels"])  # no first-token masking unpacked
    assert torch.equal(batch["input_ids"][1, :5], items[1]["input_ids"])
    assert batch["image_grids"].tolist() == [[2, 2]] and len(batch["pixel_values"]) == 1
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], 0)


@pytest.fixture
def real_dataset(tok, tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for k in range(12):
        w, h = [(64, 64), (128, 64), (64, 160)][k % 3]
        path = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        n_img = k % 3  # 0, 1 or 2 images
        question = "<image>\n" * n_img + "Which?" + " more" * k
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": f"answer {k}"}]
        samples.append(Sample(f"s{k}", turns, [ImageRef(path)] * n_img))
    return SupervisedDataset(samples, tok, patch_size=16, image=PreprocessConfig(area=64 * 64))


def test_packed_dataset_real_samples(real_dataset, tok):
    ds = real_dataset
    packed = PackedDataset(ds, max_seq_len=160, seed=0)
    flat = sorted(i for pack in packed.packs for i in pack)
    assert flat == list(range(len(ds)))
    assert all(sum(ds.lengths[i] for i in pack) <= 160 for pack in packed.packs)
    assert PackedDataset(ds, 160, seed=0).packs == packed.packs
    image_id = tok.convert_tokens_to_ids("<image>")
    loader = torch.utils.data.DataLoader(packed, batch_size=1, collate_fn=collate_packed)
    for pack, batch in zip(packed.packs, loader, strict=True):
        items = [ds[i] for i in pack]
        cu = batch["cu_seq_lens"].tolist()
        assert cu == np.cumsum([0] + [len(it["input_ids"]) for it in items]).tolist() and cu[-1] <= 160
        for k, it in enumerate(items):
            assert torch.equal(batch["input_ids"][0, cu[k] : cu[k + 1]], it["input_ids"])
        # image spans, pixel_values and grids all in the same order
        ids = batch["input_ids"][0].tolist()
        runs = [len(r) for r in "".join("x" if t == image_id else " " for t in ids).split()]
        grids = batch["image_grids"].tolist()
        assert runs == [num_image_tokens(*g) for g in grids]
        assert [list(x.shape[1:]) for x in batch["pixel_values"]] == [[16 * h, 16 * w] for h, w in grids]
        assert (batch["labels"][0][torch.tensor(ids) == image_id] == IGNORE_INDEX).all()
        assert (batch["labels"][0, torch.tensor(cu[:-1])] == IGNORE_INDEX).all()


def test_packed_drops_corrupt_sample(real_dataset):
    ds = real_dataset
    path = ds.records[1].images[0].path
    path.write_bytes(path.read_bytes()[:200])  # truncated after preparation
    packed = PackedDataset(ds, max_seq_len=1000, seed=0)
    assert len(packed) == 1
    items = packed[0]
    ids = {tuple(it["input_ids"].tolist()) for it in items}
    assert len(items) == len(ds) - 1 and tuple(ds.load(0)["input_ids"].tolist()) in ids
    assert ds.skipped["corrupt image (at load)"] == 1


def test_packed_loss_equals_padded_loss():
    """The collators' contract seen by a real HF model: one packed row without attention_mask (and
    use_cache=False) gives the same logits and loss as the padded batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    items = [fake_item(n, seed=s) for s, n in enumerate((9, 5, 12))]
    packed, padded = collate_packed(items), collate_padded(items, pad_token_id=0)
    with torch.no_grad():
        out_p = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
            use_cache=False,
        )  # fmt: skip
        out_u = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"]
        )
    cu = packed["cu_seq_lens"].tolist()
    for k, it in enumerate(items):
        n = len(it["input_ids"])
        torch.testing.assert_close(
            out_p.logits[0, cu[k] : cu[k + 1]], out_u.logits[k, :n], rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(out_p.loss, out_u.loss, rtol=1e-5, atol=1e-6)
