"""Evaluation: greedy answers of an MLLM on a held-out split, and reconstruction / code statistics of a
ViQ tokenizer.

MLLM scores (SQuAD-style normalisation: lowercase, no punctuation, no articles, single spaces):
- ``exact_match`` per sample; ``vqa_accuracy`` is its mean over the non-caption samples;
- ``token_f1`` (bag-of-tokens F1) per sample; ``caption_f1`` is its mean over the caption samples
  (``question_type == "caption"``), where an exact match is too strict to say anything;
- both, per ``question_type``. Only the first question/answer pair of a conversation is scored.

Tokenizer metrics (pixels in [-1, 1], so PSNR = 10 log10(2^2 / mse)): PSNR and SSIM of the decoded
codes against the preprocessed image (mean over images), codebook usage, the perplexity of the code
histogram, bits per image and code stability under small Gaussian pixel noise. PSNR/SSIM use
torchmetrics when it is installed, else the equivalent pure-torch code below (tested for parity).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
import string
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mllm.data.readers import ImageRef, dataset_images, read_samples
from mllm.model.viq_loader import load_viq
from mllm.stages.metrics import PIXEL_RANGE, codebook_stats, noisy_pixels
from mllm.tools.inference import Request, generate_batch, preprocess_image
from viq.config import PreprocessConfig
from viq.image import normalize
from viq.tokenizer import ViQTokenizer

log = logging.getLogger(__name__)

TORCHMETRICS_AVAILABLE = importlib.util.find_spec("torchmetrics") is not None
CAPTION = "caption"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


# ---------------------------------------------------------------------------------- answer metrics


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised token bags; 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_predictions(records: Sequence[dict]) -> dict:
    """Aggregate records with ``prediction``, ``answer`` and ``question_type`` (default "unknown")."""
    per_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rec in records:
        em, f1 = exact_match(rec["prediction"], rec["answer"]), token_f1(rec["prediction"], rec["answer"])
        per_type[rec.get("question_type") or "unknown"].append((em, f1))
    types = {t: {"n": len(v), "exact_match": _mean(e for e, _ in v), "f1": _mean(f for _, f in v)}
             for t, v in sorted(per_type.items())}
    vqa = [e for t, v in per_type.items() if t != CAPTION for e, _ in v]
    captions = [f for e, f in per_type.get(CAPTION, [])]
    return {
        "n": len(records),
        "vqa_accuracy": _mean(vqa),
        "n_vqa": len(vqa),
        "caption_f1": _mean(captions),
        "n_caption": len(captions),
        "exact_match": _mean(e for v in per_type.values() for e, _ in v),
        "per_type": types,
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------- MLLM evaluation


@dataclass
class EvalItem:
    id: str
    question: str
    answer: str
    question_type: str
    image: ImageRef | None


def eval_items(data_path: str | Path, image_root: str | Path | None = None) -> tuple[list[EvalItem], Counter]:
    """The first question/answer pair of every sample with at most one image; skips are counted."""
    skipped: Counter = Counter()
    items = []
    for sample in read_samples(data_path, image_root, skipped=skipped):
        user = next((t["content"] for t in sample.turns if t.get("role") == "user"), None)
        answer = next((t["content"] for t in sample.turns if t.get("role") == "assistant"), None)
        if not isinstance(user, str) or not isinstance(answer, str):
            skipped["no question/answer pair"] += 1
            continue
        if len(sample.images) > 1:
            skipped["more than one image"] += 1
            continue
        qtype = str(sample.meta.get("question_type") or "unknown")
        items.append(EvalItem(sample.id, user, answer, qtype, sample.images[0] if sample.images else None))
    return items, skipped


def _requests(items: list[EvalItem], settings: PreprocessConfig, patch_size: int
              ) -> tuple[list[Request | None], list[str | None]]:
    """A request per item, or None with the reason when its image cannot be read or taken."""
    requests, errors = [], []
    for item in items:
        try:
            pixels = preprocess_image(item.image.path, settings, patch_size, item.image)[0] if item.image else None
            requests.append(Request(item.question, pixels=pixels))
            errors.append(None)
        except ValueError as err:
            requests.append(None)
            errors.append(str(err))
    return requests, errors


def evaluate_mllm(model, text_tokenizer, data_path: str | Path, *, image_settings: PreprocessConfig,
                  image_root: str | Path | None = None, vis_tokenizer: ViQTokenizer | None = None,
                  batch_size: int = 8, max_new_tokens: int = 32, out_dir: str | Path | None = None,
                  limit: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy answers for every sample of ``data_path``; scores, and with ``out_dir`` the files
    ``results.json`` and ``predictions.jsonl``. ``model`` and the recipe whose ``data.image`` is
    ``image_settings`` come from ``mllm.tools.inference.load_mllm``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    items, skipped = eval_items(data_path, image_root)
    items = items[:limit] if limit is not None else items
    if not items:
        raise ValueError(f"{data_path} holds no sample with a question and an answer ({dict(skipped)})")
    records: list[dict] = []
    start = time.perf_counter()
    for lo in range(0, len(items), batch_size):
        batch = items[lo: lo + batch_size]
        requests, errors = _requests(batch, image_settings, model.visual.patch_size)
        good = [r for r in requests if r is not None]
        answers = iter(generate_batch(model, text_tokenizer, good, vis_tokenizer=vis_tokenizer,
                                      max_new_tokens=max_new_tokens))
        for item, req, err in zip(batch, requests, errors, strict=True):
            if req is None:
                skipped["unusable image"] += 1
                log.warning("skipping sample %r: %s", item.id, err)
                continue
            pred = next(answers)
            records.append({**asdict(item), "image": str(item.image.path) if item.image else None,
                            "prediction": pred, "exact_match": exact_match(pred, item.answer),
                            "f1": token_f1(pred, item.answer)})
        if progress is not None:
            progress(min(lo + batch_size, len(items)), len(items))
    seconds = time.perf_counter() - start
    if not records:
        raise ValueError(f"no sample of {data_path} could be evaluated ({dict(skipped)})")
    results = {**score_predictions(records), "skipped": dict(skipped), "seconds": seconds,
               "samples_per_s": len(records) / max(seconds, 1e-9), "data": str(data_path)}
    log.info("evaluated %d samples: vqa_accuracy=%s caption_f1=%s", len(records),
             results["vqa_accuracy"], results["caption_f1"])
    if out_dir is not None:
        write_results(out_dir, results, records)
    return results


def write_results(out_dir: str | Path, results: dict, records: Sequence[dict] | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if records is not None:
        with (out / "predictions.jsonl").open("w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------ pixel metrics


def psnr(pred_3HW: torch.Tensor, target_3HW: torch.Tensor, data_range: float = PIXEL_RANGE) -> float:
    """10 log10(data_range^2 / mse); inf for identical images."""
    pred, target = _pair(pred_3HW, target_3HW)
    if TORCHMETRICS_AVAILABLE:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        return float(peak_signal_noise_ratio(pred, target, data_range=data_range))
    mse = F.mse_loss(pred, target)
    return float(10 * torch.log10(data_range**2 / mse)) if mse > 0 else math.inf


def ssim(pred_3HW: torch.Tensor, target_3HW: torch.Tensor, data_range: float = PIXEL_RANGE) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5, k1=0.01, k2=0.03, reflect-padded borders)."""
    pred, target = _pair(pred_3HW, target_3HW)
    if min(pred.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(pred.shape[-2:])}")
    if TORCHMETRICS_AVAILABLE:
        from torchmetrics.functional.image import structural_similarity_index_measure

        return float(structural_similarity_index_measure(pred[None], target[None], data_range=data_range))
    return _ssim_torch(pred[None], target[None], data_range)


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"expected two [3, H, W] images of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    # fp64: the PSNR of near-identical images and SSIM's variance differences lose digits in fp32
    return pred.detach().double().cpu(), target.detach().double().cpu()


def _ssim_torch(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> float:
    """torchmetrics' SSIM (1.x) without torchmetrics: reflect-pad by the half window, so that the map
    (and its mean) covers every pixel, border windows included."""
    coords = torch.arange(11, dtype=pred.dtype) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    channels = pred.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11)
    pred, target = (F.pad(t, (5, 5, 5, 5), mode="reflect") for t in (pred, target))
    stats = F.conv2d(torch.cat([pred, target, pred * pred, target * target, pred * target]), kernel,
                     groups=channels).split(pred.shape[0])
    mu_p, mu_t = stats[0], stats[1]
    var_p = (stats[2] - mu_p**2).clamp(min=0)
    var_t = (stats[3] - mu_t**2).clamp(min=0)
    cov = stats[4] - mu_p * mu_t
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return float(ssim_map.mean())


# ---------------------------------------------------------------------------------- code metrics


def code_statistics(codes: Sequence, codebook_size: int) -> dict:
    """Codebook usage, histogram perplexity and bits per image of a list of ``Codes``."""
    flat = torch.cat([c.indices.reshape(-1).cpu() for c in codes])
    stats = codebook_stats(flat, codebook_size)
    mean_codes = flat.numel() / len(codes)
    return {
        "codebook_size": codebook_size,
        "codebook_usage": stats["codebook_usage"],
        "perplexity": stats["code_perplexity"],
        "codes_per_image": mean_codes,
        "bits_per_image": mean_codes * math.log2(codebook_size),
    }


def _encode_batches(vis_tokenizer: ViQTokenizer, pixels: list[torch.Tensor], batch_size: int) -> list:
    out = []
    for lo in range(0, len(pixels), batch_size):
        out += vis_tokenizer.encode(pixels[lo: lo + batch_size])
    return out


def tokenizer_metrics(vis_tokenizer: ViQTokenizer, images: Sequence[Any], *, noise_sigma: float = 0.01,
                      seed: int = 0, batch_size: int = 16) -> dict:
    """Reconstruction and code metrics of a ViQ tokenizer on ``images`` (paths, PIL images, uint8
    arrays or preprocessed [3, H, W] tensors), preprocessed with the tokenizer's own settings.

    ``code_stability``: the fraction of codes unchanged when N(0, noise_sigma^2) noise (in [-1, 1]
    pixel units, clamped to the range) is added to every pixel. PSNR/SSIM need a pixel decoder; without
    one they are None."""
    if not images:
        raise ValueError("tokenizer_metrics needs at least one image")
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    pixels, skipped = [], 0
    for image in images:
        try:
            pixels.append(vis_tokenizer.preprocess([image])[0].float().cpu())
        except ValueError as err:  # an unreadable image is counted, not fatal for a whole data set
            skipped += 1
            log.warning("skipping image %s: %s", image if isinstance(image, (str, Path)) else "", err)
    if not pixels:
        raise ValueError(f"none of the {len(images)} images could be read")
    codes = _encode_batches(vis_tokenizer, pixels, batch_size)
    stats = code_statistics(codes, vis_tokenizer.codebook_size)
    noisy_codes = _encode_batches(vis_tokenizer, noisy_pixels(pixels, noise_sigma, seed), batch_size)
    same = sum(int((a.indices == b.indices).sum()) for a, b in zip(codes, noisy_codes, strict=True))
    stats["code_stability"] = same / sum(c.indices.numel() for c in codes)
    stats.update(reconstruction_metrics(vis_tokenizer, codes, pixels, batch_size))
    stats["n_images"], stats["skipped_images"] = len(pixels), skipped
    return stats


def reconstruction_metrics(vis_tokenizer: ViQTokenizer, codes: Sequence, pixels: Sequence[torch.Tensor],
                           batch_size: int = 16) -> dict:
    """Mean PSNR / SSIM of the decoded codes, and the PSNR of each image's own mean colour (the
    baseline a decoder has to beat). None for a tokenizer without a pixel decoder."""
    baseline = _mean(psnr(x.mean(dim=(1, 2), keepdim=True).expand_as(x), x) for x in pixels)
    if vis_tokenizer.decoder is None or vis_tokenizer.cfg.decoder.out_channels != 3:
        return {"psnr": None, "ssim": None, "psnr_mean_colour": baseline}
    decoded = []
    for lo in range(0, len(codes), batch_size):
        decoded += [normalize(img) for img in vis_tokenizer.decode(list(codes[lo: lo + batch_size]))]
    for x, y in zip(pixels, decoded, strict=True):
        if x.shape != y.shape:
            raise ValueError(f"decoded image {tuple(y.shape)} does not match its input {tuple(x.shape)}")
    return {"psnr": _mean(psnr(y, x) for x, y in zip(pixels, decoded, strict=True)),
            "ssim": _mean(ssim(y, x) for x, y in zip(pixels, decoded, strict=True)),
            "psnr_mean_colour": baseline}


# --------------------------------------------------------------------------------------------- CLI

EVAL_HELP = """Evaluate a trained MLLM or a ViQ tokenizer on a data set.
  viq eval MODEL_DIR --data data/demo --split test [--out DIR] [--batch-size 8]
      greedy answers; exact match overall and per question_type, token F1 for captions.
      MODEL_DIR: a viq train output/checkpoint or a viq export directory.
  viq eval --tokenizer TOKENIZER --data data/demo --split test
      PSNR, SSIM, codebook usage, code perplexity, bits per image, code stability.
      TOKENIZER: a ViQ tokenizer directory, a preset name, or a viq export directory.
--data is an annotation file, or a directory holding <split>.json / <split>.jsonl.
Writes results.json (and predictions.jsonl) to --out and prints the results as JSON."""


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viq eval", description=EVAL_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", help="viq train output/checkpoint or viq export directory")
    parser.add_argument("--tokenizer", help="evaluate this ViQ tokenizer instead of an MLLM")
    parser.add_argument("--data", required=True, help="annotation file or a directory with <split>.json")
    parser.add_argument("--split", default="test", help="split file to use when --data is a directory")
    parser.add_argument("--image-root", default=None, help="image folder (default: the annotation's folder)")
    parser.add_argument("--out", default=None, help="output folder (default: MODEL_DIR/eval-<split>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples or images")
    parser.add_argument("--noise-sigma", type=float, default=0.01, help="code-stability noise, [-1, 1] units")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return parser


def resolve_data(data: str | Path, split: str) -> Path:
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {str(path)!r} does not exist")
    if path.is_dir():
        for suffix in (".json", ".jsonl"):
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
    return path


def _run_eval(args: argparse.Namespace) -> dict:
    from mllm.tools.inference import load_mllm, load_vis_tokenizer, model_dir_kind, resolve_device

    data = resolve_data(args.data, args.split)
    if args.tokenizer:
        tok = load_viq(args.tokenizer, what="--tokenizer").to(resolve_device(args.device)).eval()
        images = dataset_images(data, args.image_root, args.limit)
        results = {**tokenizer_metrics(tok, images, noise_sigma=args.noise_sigma, batch_size=args.batch_size),
                   "tokenizer": args.tokenizer, "data": str(data)}
        if args.out:
            write_results(args.out, results)
        return results
    model_dir_kind(args.model_dir)
    model, text_tok, recipe = load_mllm(args.model_dir, device=args.device)
    vis_tok = load_vis_tokenizer(args.model_dir, recipe, args.device) if recipe.model.visual == "discrete" \
        else None
    out = args.out or Path(args.model_dir) / f"eval-{args.split if Path(args.data).is_dir() else data.stem}"
    return evaluate_mllm(model, text_tok, data, image_settings=recipe.data.image, image_root=args.image_root,
                         vis_tokenizer=vis_tok,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, out_dir=out,
                         limit=args.limit)


def eval_main(argv: list[str] | None = None) -> int:
    """``viq eval``: prints the results as JSON; a bad input prints one line on stderr, returns 1."""
    parser = eval_parser()
    args = parser.parse_args(argv)
    if (args.model_dir is None) == (args.tokenizer is None):
        parser.error("give either MODEL_DIR or --tokenizer TOKENIZER")
    try:
        results = _run_eval(args)
    except (ValueError, OSError) as err:
        print(f"viq eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    return 0
