"""The code probe: features that keep where codes are, a linear classifier that is perfect on separable codes
and at chance on random ones, and the labelled images of the demo set."""

from __future__ import annotations

import pytest
import torch

from mllm.tools.probe import code_features, labelled_images, probe_accuracy
from viq.quantize import FSQ
from viq.tokenizer import Codes

LEVELS = (4, 4)  # 16 codes, two FSQ dimensions
CLASSES = ("a", "b", "c", "d")
CORNERS = (0, 3, 12, 15)  # level pairs (0, 0), (3, 0), (0, 3), (3, 3): the corners of the code square


def _codes(indices_hwE: torch.Tensor) -> Codes:
    h, w, _ = indices_hwE.shape
    return Codes(indices_hwE.reshape(-1).long(), (h, w))


def test_features_are_the_pooled_fsq_values_and_keep_where_codes_are():
    fsq = FSQ(LEVELS)
    left = torch.zeros(4, 4, 1, dtype=torch.long)
    left[:, :2] = 15  # the last code: +0.5 in both dimensions; code 0 is -1 in both
    right = left.flip(1)
    feats = code_features([_codes(left), _codes(right)], LEVELS, codes_per_patch=1, grid=2)
    assert feats.shape == (2, 2 * 2 * 1 * 2)
    low, high = fsq.indices_to_codes(torch.tensor([0, 15]))
    # channel-major [d, grid, grid]: the left image holds the high code in its left column only
    expected_left = torch.stack([torch.tensor([[high[j], low[j]], [high[j], low[j]]]) for j in range(2)])
    torch.testing.assert_close(feats[0], expected_left.reshape(-1).double())
    torch.testing.assert_close(feats[1], expected_left.flip(-1).reshape(-1).double())


def _dataset(n: int, separable: bool, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    labels = [CLASSES[i % len(CLASSES)] for i in range(n)]
    codes = []
    for label in labels:
        idx = torch.randint(0, 16, (6, 6, 2), generator=gen)
        if separable:  # the label's corner code fills the top row, the rest is noise
            idx[0] = CORNERS[CLASSES.index(label)]
        codes.append(_codes(idx))
    return code_features(codes, LEVELS, codes_per_patch=2, grid=6), labels


def test_probe_is_perfect_on_separable_codes():
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = _dataset(120, True, gen)
    x_test, y_test = _dataset(200, True, gen)
    result = probe_accuracy(x_train, y_train, x_test, y_test)
    assert result["accuracy"] == 1.0
    assert result["chance"] == 0.25 and result["n_classes"] == 4 and result["n_test"] == 200


def test_probe_is_at_chance_on_random_codes():
    gen = torch.Generator().manual_seed(1)
    x_train, y_train = _dataset(200, False, gen)
    x_test, y_test = _dataset(400, False, gen)
    result = probe_accuracy(x_train, y_train, x_test, y_test)
    # chance is 0.25; 0.35 is more than four standard errors (0.022 at 400 samples) above it
    assert abs(result["accuracy"] - result["chance"]) < 0.1, result


def test_probe_rejects_mismatched_labels():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="differ in number"):
        probe_accuracy(x, ["a", "b"], x, ["a", "b", "c"])


def test_labelled_images_of_the_demo_set_skip_captions(demo_data):
    labelled = labelled_images(demo_data["train"])
    assert sorted(labelled) == ["colour", "count", "position", "shape", "word"]
    paths, labels = labelled["count"]
    assert len(paths) == len(labels) == 8 and set(labels) <= {"1", "2", "3", "4"}
    assert all(p.is_file() for p in paths)
