"""Evaluation metrics on hand-made predictions and images (mllm.tools.evaluate)."""

from __future__ import annotations

import math

import pytest
import torch

from mllm.tools import evaluate as ev
from viq.tokenizer import Codes, ViQTokenizer


def test_normalize_answer_drops_case_punctuation_articles():
    assert ev.normalize_answer("  The Red, circle! ") == "red circle"
    assert ev.normalize_answer("An apple a day") == "apple day"
    assert ev.normalize_answer("theme") == "theme"  # an article only as a whole word


def test_exact_match_and_token_f1_exact_values():
    assert ev.exact_match("Red.", "red") == 1.0
    assert ev.exact_match("red circle", "red") == 0.0
    # "red circle" vs "red circle left": P = 2/2, R = 2/3, F1 = 0.8
    assert ev.token_f1("a red circle", "red circle left") == pytest.approx(0.8)
    assert ev.token_f1("blue", "red") == 0.0
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("the", "red") == 0.0
    # repeated tokens count once per occurrence: P = 1/2, R = 1/1
    assert ev.token_f1("red red", "red") == pytest.approx(2 / 3)


def test_score_predictions_per_type():
    records = [
        {"question_type": "colour", "prediction": "Red", "answer": "red"},
        {"question_type": "colour", "prediction": "blue", "answer": "green"},
        {"question_type": "count", "prediction": "3", "answer": "3"},
        {"question_type": "caption", "prediction": "a red circle", "answer": "red circle left"},
        {"prediction": "x", "answer": "x"},
    ]
    s = ev.score_predictions(records)
    assert s["n"] == 5 and s["n_vqa"] == 4 and s["n_caption"] == 1
    assert s["vqa_accuracy"] == pytest.approx(3 / 4)  # captions are scored by F1 only
    assert s["caption_f1"] == pytest.approx(0.8)
    assert s["exact_match"] == pytest.approx(3 / 5)
    assert s["per_type"]["colour"] == {"n": 2, "exact_match": 0.5, "f1": 0.5}
    assert s["per_type"]["count"]["exact_match"] == 1.0
    assert s["per_type"]["unknown"]["n"] == 1


@pytest.fixture(params=[True, False], ids=["torchmetrics", "pure-torch"])
def backend(request, monkeypatch):
    if request.param and not ev.TORCHMETRICS_AVAILABLE:
        pytest.skip("torchmetrics is not installed")
    monkeypatch.setattr(ev, "TORCHMETRICS_AVAILABLE", request.param)
    return request.param


def test_psnr_ssim_identical_images(backend):
    x = torch.rand(3, 32, 40) * 2 - 1
    assert ev.psnr(x, x) == math.inf
    assert ev.ssim(x, x) == pytest.approx(1.0)


def test_psnr_of_known_noise_uses_the_pixel_range_2(backend):
    x = torch.rand(3, 32, 32, dtype=torch.float64) - 0.5
    sign = torch.randint(0, 2, x.shape) * 2 - 1
    y = x + 0.1 * sign  # mse = 0.01 exactly
    # torchmetrics computes the logarithm in fp32: agreement to about 1e-7 relative
    assert ev.psnr(y, x) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)


def test_ssim_fallback_matches_torchmetrics(monkeypatch):
    if not ev.TORCHMETRICS_AVAILABLE:
        pytest.skip("torchmetrics is not installed")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 24, 30, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    reference = ev.ssim(y, x)
    monkeypatch.setattr(ev, "TORCHMETRICS_AVAILABLE", False)
    assert ev.ssim(y, x) == pytest.approx(reference, abs=1e-9)
    assert 0 < reference < 1


def test_pixel_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ev.psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 32))
    with pytest.raises(ValueError, match="11x11"):
        ev.ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_code_statistics_exact():
    codes = [Codes(torch.tensor([0, 0, 1, 1]), (1, 1)), Codes(torch.tensor([2, 3]), (1, 1))]
    s = ev.code_statistics(codes, codebook_size=8)
    assert s["codebook_usage"] == 0.5
    p = torch.tensor([2, 2, 1, 1], dtype=torch.float64) / 6
    assert s["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert s["codes_per_image"] == 3 and s["bits_per_image"] == pytest.approx(9.0)


@pytest.fixture(scope="module")
def debug_tok():
    return ViQTokenizer.from_preset("debug", seed=0).eval()


def _images():
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 96, generator=gen) * 2 - 1, torch.rand(3, 32, 32, generator=gen) * 2 - 1]


def test_tokenizer_metrics_debug(debug_tok):
    m = ev.tokenizer_metrics(debug_tok, _images(), noise_sigma=0.0)
    assert m["code_stability"] == 1.0  # no noise: the same codes
    assert m["n_images"] == 2 and m["codebook_size"] == debug_tok.codebook_size == 8 * 5 * 5 * 5
    assert m["codes_per_image"] == (4 * 6 + 2 * 2) * 4 / 2
    assert m["bits_per_image"] == pytest.approx(m["codes_per_image"] * math.log2(1000))
    assert 0 < m["codebook_usage"] <= 1 and m["perplexity"] >= 1
    assert math.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1
    noisy = ev.tokenizer_metrics(debug_tok, _images(), noise_sigma=0.5)
    assert noisy["code_stability"] < 1.0


def test_tokenizer_metrics_without_decoder():
    tok = ViQTokenizer.from_preset("debug", seed=0, decoder=None).eval()
    m = ev.tokenizer_metrics(tok, _images()[:1])
    assert m["psnr"] is None and m["ssim"] is None and m["codebook_usage"] > 0


def test_eval_cli_tokenizer(demo_data, tmp_path, capsys):
    rc = ev.eval_main(["--tokenizer", "debug", "--data", str(demo_data["test"].parent), "--limit", "3",
                       "--out", str(tmp_path / "tok")])
    assert rc == 0
    out = capsys.readouterr().out
    assert '"psnr"' in out and (tmp_path / "tok" / "results.json").is_file()
