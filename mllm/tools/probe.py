"""Probe accuracy: how much of an image's content its frozen codes carry, read by a small linear classifier.

For every question type of a data set with short answers (the demo set: colour, shape, count, position,
word), a multinomial logistic regression is fitted on the codes of the training images with their answer as
the label and scored on the codes of the test images. Captions are not class labels and are skipped.

Features of one image: each code index is turned back into its FSQ level values (the implicit codebook, a
fixed function of the levels, so nothing is learned from the tokenizer's weights), the ``E`` codes of a patch
are concatenated, and the patch grid is average-pooled to a fixed ``grid x grid`` layout, which keeps where
things are (left/right/top/bottom) for any aspect ratio. ``chance`` is the accuracy of always answering the
most frequent training answer, measured on the test labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mllm.tools.evaluate import CAPTION, eval_items, normalize_answer
from viq.quantize import FSQ
from viq.tokenizer import Codes, ViQTokenizer

DEFAULT_GRID = 4


def code_features(codes: Sequence[Codes], levels: Sequence[int], codes_per_patch: int,
                  grid: int = DEFAULT_GRID) -> torch.Tensor:
    """One feature row ``[grid * grid * codes_per_patch * len(levels)]`` per image (see the module doc)."""
    if grid <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    fsq = FSQ(levels)
    rows = []
    for c in codes:
        h, w = c.grid
        c.validate(codes_per_patch, fsq.codebook_size)
        values = fsq.indices_to_codes(c.indices.cpu()).reshape(h, w, codes_per_patch * fsq.dim)
        rows.append(F.adaptive_avg_pool2d(values.permute(2, 0, 1)[None], grid)[0].reshape(-1))
    return torch.stack(rows).double()


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, l2: float = 1e-3,
                     steps: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS (deterministic):
    returns (weight [F, K], bias [K], feature mean, feature std)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)  # constant features stay 0 after scaling
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach(), mean, std


def probe_accuracy(x_train: torch.Tensor, y_train: Sequence[str], x_test: torch.Tensor, y_test: Sequence[str],
                   *, l2: float = 1e-3) -> dict:
    """Fit on (x_train, y_train), score on (x_test, y_test); labels are strings. A test label never seen in
    training counts as wrong."""
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"features and labels differ in number: {len(x_train)} vs {len(y_train)} (train), "
                         f"{len(x_test)} vs {len(y_test)} (test)")
    if not len(y_train) or not len(y_test):
        raise ValueError(f"a probe needs training and test samples, got {len(y_train)} and {len(y_test)}")
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in y_train])
    weight, bias, mean, std = fit_linear_probe(x_train, y, len(classes), l2=l2)
    predicted = (((x_test.double() - mean) / std) @ weight + bias).argmax(1).tolist()
    correct = sum(classes[p] == t for p, t in zip(predicted, y_test, strict=True))
    majority = max(classes, key=lambda c: (list(y_train).count(c), c))
    return {"accuracy": correct / len(y_test), "chance": sum(t == majority for t in y_test) / len(y_test),
            "n_train": len(y_train), "n_test": len(y_test), "n_classes": len(classes)}


def labelled_images(data_path: str | Path) -> dict[str, tuple[list[Path], list[str]]]:
    """question type -> (image paths, normalised answers) of a data set's single-image, non-caption samples."""
    out: dict[str, tuple[list[Path], list[str]]] = {}
    items, _ = eval_items(data_path)
    for item in items:
        if item.image is None or item.question_type == CAPTION:
            continue
        paths, labels = out.setdefault(item.question_type, ([], []))
        paths.append(Path(item.image.path))
        labels.append(normalize_answer(item.answer))
    return out


def _features(tok: ViQTokenizer, paths: list[Path], grid: int, batch_size: int) -> torch.Tensor:
    codes = []
    for lo in range(0, len(paths), batch_size):
        codes += tok.encode(paths[lo: lo + batch_size])
    return code_features(codes, tok.cfg.head.levels, tok.codes_per_patch, grid)


def probe_tokenizer(tok: ViQTokenizer, train_data: str | Path, test_data: str | Path, *,
                    grid: int = DEFAULT_GRID, batch_size: int = 32) -> dict[str, dict]:
    """Probe results per question type present in both data sets (see ``probe_accuracy``)."""
    if tok.head.fsq is None:
        raise ValueError("the probe reads codes, and this tokenizer has a continuous (proximal) head")
    train, test = labelled_images(train_data), labelled_images(test_data)
    types = sorted(set(train) & set(test))
    if not types:
        raise ValueError(f"{train_data} and {test_data} share no question type with class answers "
                         f"(train: {sorted(train)}, test: {sorted(test)})")
    return {t: probe_accuracy(_features(tok, train[t][0], grid, batch_size), train[t][1],
                              _features(tok, test[t][0], grid, batch_size), test[t][1])
            for t in types}
