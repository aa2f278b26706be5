"""Inference with a trained MLLM: load a ``viq train`` checkpoint or a ``viq export`` directory, and
answer questions about images with greedy decoding.

A prompt is rendered exactly as training rendered the user turn (mllm.data.chat: same chat template,
same segment-wise tokenisation, ending at the assistant's generation header), and its ``<image>``
token is expanded into ``num_image_tokens(h, w)`` placeholders, as mllm.data.dataset does.
Images are preprocessed with the recipe's ``data`` settings (what the model saw in training); a
discrete model turns them into codes with the ViQ tokenizer's ``encode`` first.

Decoding: one prefill over the (left-padded) batch of prompt embeddings, then one token per step with
the KV cache. Left padding with ``position_ids`` counted from each row's first real token keeps every
row's positions and attention identical to an unbatched run.

Shape legend: ``B`` requests of a batch, ``T`` (padded) prompt length, ``H`` LLM hidden size.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mllm.config import RecipeConfig, load_recipe, resolve_dtype
from mllm.data.chat import split_segments
from mllm.data.dataset import image_settings
from mllm.data.layout import IMAGE_TOKEN, num_image_tokens
from mllm.data.readers import ImageRef
from mllm.model.layout import LLM_DIR, MLLM_CONFIG, VIQ_DIR, VISUAL_WEIGHTS
from mllm.model.mllm import MLLM
from mllm.model.viq_loader import load_viq
from mllm.train.checkpoint import is_peft, load_checkpoint_weights
from viq.config import PreprocessConfig
from viq.image import load_image, patch_grid, preprocess
from viq.tokenizer import Codes, ViQTokenizer

log = logging.getLogger(__name__)

# a placeholder answer: split_segments needs an assistant turn to find where the prompt ends
_DUMMY_ANSWER = "x"


# ----------------------------------------------------------------------------------------- loading


def model_dir_kind(model_dir: str | Path) -> str:
    """"export" or "checkpoint"; ValueError naming what is missing for any other directory."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"model directory {str(root)!r} does not exist")
    if not (root / MLLM_CONFIG).is_file():
        is_viq = (root / "config.json").is_file() and (root / "model.safetensors").is_file()
        hint = " (it looks like a ViQ tokenizer directory: use viq eval --tokenizer)" if is_viq else ""
        raise ValueError(f"{root} is not a viq train or viq export directory: {MLLM_CONFIG} is missing{hint}")
    if not (root / VISUAL_WEIGHTS).is_file():
        raise ValueError(f"{root} is not a finished viq train or viq export directory: "
                         f"{VISUAL_WEIGHTS} is missing")
    if (root / VIQ_DIR).is_dir() and (root / LLM_DIR / "config.json").is_file():
        return "export"
    return "checkpoint"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_mllm(model_dir: str | Path, *, device: str | torch.device | None = None
              ) -> tuple[MLLM, PreTrainedTokenizerBase, RecipeConfig]:
    """(MLLM in eval mode, text tokenizer, recipe) from a ``viq train`` output/checkpoint directory or
    a ``viq export`` directory. LoRA adapters are merged; the whole model is cast to the recipe's
    compute dtype (fp32 on CPU), since inference runs without the training autocast."""
    from mllm.model.build import build_mllm
    from mllm.train.checkpoint import load_exported
    from mllm.train.trainer import resolve_image_settings

    root = Path(model_dir)
    kind = model_dir_kind(root)
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    # training saves concrete image settings; a recipe that lacks them gets them as training would have
    recipe = resolve_image_settings(load_recipe(root / MLLM_CONFIG))
    if kind == "export":
        built = load_exported(root, cuda=cuda)
    else:
        built = build_mllm(recipe, cuda=cuda)
        load_checkpoint_weights(built.model, root)
    model = built.model
    if is_peft(model.llm):
        model.llm = model.llm.merge_and_unload()
    model.requires_grad_(False)
    model.to(device=dev, dtype=resolve_dtype(recipe.model.dtype, cuda)).eval()
    log.info("loaded MLLM %s (%s, visual=%s) on %s", root, kind, recipe.model.visual, dev)
    return model, built.tokenizer, recipe


def load_vis_tokenizer(model_dir: str | Path, recipe: RecipeConfig | None = None,
                       device: str | torch.device | None = None) -> ViQTokenizer:
    """The ViQ tokenizer that turns pixels into this model's codes (eval mode, fp32).

    An export holds it (with any trained weights); a checkpoint names it in its recipe (a preset,
    rebuilt with the run's seed, or a directory). Its ``encode`` does not use the embedder, so the
    codes are the training codes even when the checkpoint trained the embedder.
    """
    root = Path(model_dir)
    kind = model_dir_kind(root)
    recipe = recipe or load_recipe(root / MLLM_CONFIG)
    tok = load_viq(root / VIQ_DIR) if kind == "export" \
        else load_viq(recipe.model.tokenizer, seed=recipe.train.seed, what="model.tokenizer")
    return tok.to(resolve_device(device)).eval()


def preprocess_image(image: Any, settings: PreprocessConfig, patch_size: int, ref: ImageRef | None = None
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image (path, PIL, uint8 array) -> (x_3HW in [-1, 1], grid), as training preprocessed it: the
    recipe's ``data.image`` settings and the model's ``visual.patch_size``. ValueError for an unreadable
    image or one whose patch grid the 2x2 projector cannot take. ``ref`` adds per-image overrides."""
    s = image_settings(ref, settings, patch_size) if ref is not None else settings
    img = load_image(image) if isinstance(image, (str, Path)) else image
    x_3HW, grid = preprocess(img, patch_size=patch_size, **dataclasses.asdict(s))
    try:
        num_image_tokens(*grid)
    except ValueError as err:
        raise ValueError(f"the model cannot take this image ({img.size[0]}x{img.size[1]} pixels with "
                         f"mode={s.mode!r}): {err}") from err
    return x_3HW, grid


# ----------------------------------------------------------------------------------------- prompts


def prompt_ids(text_tokenizer, question: str, grids: list[tuple[int, int]]) -> list[int]:
    """Token ids of the user turn + generation header, each ``<image>`` expanded for its grid.

    With one image and no ``<image>`` in the question, the placeholder is put first (LLaVA style).
    """
    n_tags = question.count(IMAGE_TOKEN)
    if grids and n_tags == 0:
        question = f"{IMAGE_TOKEN}\n{question}"
        n_tags = len(grids) if len(grids) == 1 else 0
    if n_tags != len(grids):
        raise ValueError(f"the question has {n_tags} {IMAGE_TOKEN} placeholders for {len(grids)} images")
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": _DUMMY_ANSWER}]
    ids: list[int] = []
    for text, is_answer in split_segments(turns, text_tokenizer):
        if is_answer:
            break
        ids += text_tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = text_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    sizes = iter(num_image_tokens(*g) for g in grids)
    out: list[int] = []
    for tok in ids:
        out += [tok] * next(sizes) if tok == image_id else [tok]
    return out


@dataclass
class Request:
    """One question with at most one image, given as pixels (x_3HW, preprocessed) or as codes."""

    question: str
    pixels: torch.Tensor | None = None
    codes: Codes | None = None

    def grids(self, patch_size: int) -> list[tuple[int, int]]:
        if self.codes is not None:
            return [tuple(self.codes.grid)]
        if self.pixels is not None:
            return [patch_grid(self.pixels.shape[-2], self.pixels.shape[-1], patch_size)]
        return []


def _visual_kwargs(model: MLLM, requests: list[Request], vis_tokenizer: ViQTokenizer | None) -> dict:
    """The image inputs of ``MLLM.embed_inputs`` for a batch, in request order."""
    imaged = [r for r in requests if r.pixels is not None or r.codes is not None]
    if not imaged:
        return {}
    grids = [g for r in imaged for g in r.grids(model.visual.patch_size)]
    if model.visual.mode == "continuous":
        if any(r.pixels is None for r in imaged):
            raise ValueError("a continuous-visual model needs pixels; it cannot take codes")
        dtype = next(model.visual.parameters()).dtype
        return {"pixel_values": [r.pixels.to(dtype) for r in imaged], "image_grids": grids}
    need = [r.pixels for r in imaged if r.codes is None]
    if need and vis_tokenizer is None:
        raise ValueError("a discrete-visual model given pixels needs vis_tokenizer to encode them")
    encoded = iter(vis_tokenizer.encode(need) if need else [])
    codes = [r.codes if r.codes is not None else next(encoded) for r in imaged]
    for c in codes:
        c.validate(model.visual.codes_per_patch, model.visual.embedder.codebook_size)
    return {"codes": torch.cat([c.indices.cpu() for c in codes]), "image_grids": grids}


@torch.inference_mode()
def prompt_embeddings(model: MLLM, text_tokenizer, requests: list[Request],
                      vis_tokenizer: ViQTokenizer | None = None) -> list[torch.Tensor]:
    """Per-request prompt embeddings ``[T_i, H]``; all images of the batch go through one visual pass."""
    ids = [prompt_ids(text_tokenizer, r.question, r.grids(model.visual.patch_size)) for r in requests]
    device = model.llm.get_input_embeddings().weight.device
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=device)[None]
    embeds = model.embed_inputs(flat, **_visual_kwargs(model, requests, vis_tokenizer))
    return list(embeds[0].split([len(row) for row in ids]))


# ---------------------------------------------------------------------------------------- decoding


def stop_token_ids(text_tokenizer, llm) -> set[int]:
    """End-of-turn ids: the tokenizer's eos, the model's generation eos, and the common chat ends."""
    ids = {text_tokenizer.eos_token_id}
    gen = getattr(llm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    vocab = text_tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>") if t in vocab}
    return {int(i) for i in ids if i is not None}


def _cache_argument(llm) -> str:
    # transformers 5 renamed past_key_values to cache (5.2x); accept both spellings of the 5.x range
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # peft passes kwargs through
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def greedy_decode(llm, embeds: list[torch.Tensor], stop_ids: set[int], max_new_tokens: int = 32
                  ) -> list[list[int]]:
    """Greedy continuation of each prompt (``[T_i, H]``) with the KV cache; stop tokens excluded."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    B, T, H = len(embeds), max(len(e) for e in embeds), embeds[0].shape[-1]
    x_BTH = embeds[0].new_zeros(B, T, H)
    mask = torch.zeros(B, T, dtype=torch.long, device=x_BTH.device)
    for i, e in enumerate(embeds):  # left padding: every row's last prompt token sits at T - 1
        x_BTH[i, T - len(e):] = e
        mask[i, T - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_argument(llm)
    out = llm(inputs_embeds=x_BTH, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    stop = torch.tensor(sorted(stop_ids), device=x_BTH.device)
    done = torch.zeros(B, dtype=torch.bool, device=x_BTH.device)
    steps = []
    next_pos = pos[:, -1:] + 1
    for step in range(max_new_tokens):
        token = out.logits[:, -1].float().argmax(-1)
        steps.append(torch.where(done, stop[0], token))
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = llm(input_ids=steps[-1][:, None], attention_mask=mask, position_ids=next_pos,
                  use_cache=True, **{cache_arg: _cache_of(out)})
        next_pos = next_pos + 1
    rows = torch.stack(steps, dim=1).tolist()
    return [row[: next((j for j, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def generate_batch(model: MLLM, text_tokenizer, requests: list[Request], *,
                   vis_tokenizer: ViQTokenizer | None = None, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to a batch of requests (one visual pass, one padded decode)."""
    if not requests:
        return []
    embeds = prompt_embeddings(model, text_tokenizer, requests, vis_tokenizer)
    tokens = greedy_decode(model.llm, embeds, stop_token_ids(text_tokenizer, model.llm), max_new_tokens)
    return [text_tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def generate(model: MLLM, text_tokenizer, question: str, image: Any = None, codes: Codes | None = None,
             vis_tokenizer: ViQTokenizer | None = None, max_new_tokens: int = 32,
             settings: PreprocessConfig | None = None) -> str:
    """The greedy answer to ``question`` about ``image`` (path, PIL image or uint8 array) or ``codes``.

    ``settings``: the image preprocessing the model was trained with, ``recipe.data.image`` of the recipe
    ``load_mllm`` returns; needed with ``image``. Codes must come from the same preprocessing
    (``vis_tokenizer.encode(preprocess_image(image, settings, model.visual.patch_size)[0])``).
    """
    if image is not None and codes is not None:
        raise ValueError("give either image or codes, not both")
    pixels = None
    if image is not None:
        if settings is None:
            raise ValueError("an image needs settings=: the recipe's data.image (load_mllm returns the recipe)")
        pixels, _ = preprocess_image(image, settings, model.visual.patch_size)
    request = Request(question, pixels=pixels, codes=codes)
    return generate_batch(model, text_tokenizer, [request], vis_tokenizer=vis_tokenizer,
                          max_new_tokens=max_new_tokens)[0]


# --------------------------------------------------------------------------------------------- CLI

GENERATE_HELP = """Answer a question about an image with a trained MLLM (greedy decoding).
MODEL_DIR is a viq train output/checkpoint directory or a viq export directory. A discrete model
encodes the image with its ViQ tokenizer first. Example:
  viq generate outputs/debug/sft_full --image data/demo/images/test/test-00000.png "What shape is shown?"
"""


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viq generate", description=GENERATE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="viq train output/checkpoint or viq export directory")
    parser.add_argument("question", help="the question (an <image> placeholder is put first if absent)")
    parser.add_argument("--image", help="image file (PNG, JPEG, WebP, ...)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--verbose", action="store_true", help="show the library's log messages")
    return parser


def quiet_logging(verbose: bool) -> None:
    """Keep stdout for the command's result: library logs and transformers' warnings go quiet."""
    if verbose:
        return
    for name in ("mllm", "viq"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def generate_main(argv: list[str] | None = None) -> int:
    """``viq generate``: prints the answer; a bad input prints one line on stderr and returns 1."""
    args = generate_parser().parse_args(argv)
    quiet_logging(args.verbose)
    try:
        # the cheap checks first, so that a bad input fails before the model is built
        model_dir_kind(args.model_dir)
        if args.image is not None and not Path(args.image).is_file():
            raise ValueError(f"image file {args.image!r} does not exist")
        model, text_tok, recipe = load_mllm(args.model_dir, device=args.device)
        pixels = preprocess_image(args.image, recipe.data.image, model.visual.patch_size)[0] if args.image \
            else None
        vis_tok = load_vis_tokenizer(args.model_dir, recipe, device=args.device) \
            if recipe.model.visual == "discrete" and pixels is not None else None
        answer = generate_batch(model, text_tok, [Request(args.question, pixels=pixels)],
                                vis_tokenizer=vis_tok, max_new_tokens=args.max_new_tokens)[0]
    except (ValueError, OSError) as err:
        print(f"viq generate: error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(answer)
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
