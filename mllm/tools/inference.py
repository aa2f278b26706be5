"""Inference with a trained MLLM: load a ``viq train`` checkpoint or a ``viq export`` directory, and
answer questions about images through transformers' own ``generate()``.

A prompt is rendered exactly as training rendered the user turn (mllm.data.chat: same chat template,
same segment-wise tokenisation, ending at the assistant's generation header), and its ``<image>``
token is expanded into ``num_image_tokens(h, w)`` placeholders, as mllm.data.dataset does.
Images are preprocessed with the recipe's ``data`` settings (what the model saw in training); a
discrete model turns them into codes with the ViQ tokenizer's ``encode`` first.

Decoding: the batch's prompt embeddings (text and visual tokens, ``MLLM.embed_inputs``), padded on the
left, go to the LLM's ``generate(inputs_embeds=..., attention_mask=..., generation_config=...)``, so a
``GenerationConfig``, sampling, beam search, stop strings and streamers work as in transformers.
The default is greedy decoding. generate() counts positions from each row's first real token, so a
batched row sees the positions and attention of an unbatched run. (A hand-written greedy loop with a KV
cache did this before. generate() gives its tokens, the tests hold them, and measured no slower: 8-12 s
either way for 2 x 32 tokens of SmolLM2-135M on one shared CPU core.)

Shape legend: ``B`` requests of a batch, ``T`` (padded) prompt length, ``H`` LLM hidden size.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

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
    from mllm.train.data_setup import resolve_image_settings

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

DEFAULT_MAX_NEW_TOKENS = 32


def stop_token_ids(text_tokenizer, llm) -> set[int]:
    """End-of-turn ids: the tokenizer's eos, the model's generation eos, and the common chat ends."""
    ids = {text_tokenizer.eos_token_id}
    gen = getattr(llm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    vocab = text_tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>") if t in vocab}
    return {int(i) for i in ids if i is not None}


def answer_generation_config(llm, text_tokenizer, config: GenerationConfig | None = None, **options
                             ) -> GenerationConfig:
    """The ``GenerationConfig`` of an answer: ``config`` (or greedy decoding of ``DEFAULT_MAX_NEW_TOKENS``)
    updated with ``options`` (any GenerationConfig field: ``max_new_tokens``, ``do_sample``, ``temperature``,
    ``num_beams``, ``stop_strings``, ...), ending at the end-of-turn ids of ``stop_token_ids`` unless it names
    its own ``eos_token_id``.

    The default pins ``repetition_penalty=1.0``: ``generate()`` fills every unset field from the LLM's own
    generation_config, and Qwen2.5-Instruct's 1.05 there would penalise a VQA answer for appearing in
    the question's list of choices. Sampling settings the caller does not give (temperature, top_p, top_k)
    still come from the LLM's generation_config, as in plain transformers.
    """
    cfg = copy.deepcopy(config) if config is not None else \
        GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0)
    unknown = cfg.update(**options)
    if unknown:
        raise ValueError(f"unknown generation options {sorted(unknown)}: they must be GenerationConfig fields")
    if cfg.max_new_tokens is None and cfg.max_length is None:
        cfg.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if (cfg.num_return_sequences or 1) != 1:
        raise ValueError(f"one answer per request: num_return_sequences must be 1, got {cfg.num_return_sequences}")
    if cfg.eos_token_id is None:
        cfg.eos_token_id = sorted(stop_token_ids(text_tokenizer, llm))
    if cfg.pad_token_id is None:
        pad = text_tokenizer.pad_token_id
        cfg.pad_token_id = pad if pad is not None else _as_list(cfg.eos_token_id)[0]
    cfg.validate()
    return cfg


def _as_list(ids) -> list[int]:
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def left_padded(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request ``[T_i, H]`` embeddings -> (``x_BTH``, attention mask ``[B, T]``), padded on the left so
    that every row's next token follows at ``T``; generate() counts positions from each row's first real
    token, so each row sees the positions and attention of an unbatched run."""
    B, T, H = len(embeds), max(len(e) for e in embeds), embeds[0].shape[-1]
    x_BTH = embeds[0].new_zeros(B, T, H)
    mask = torch.zeros(B, T, dtype=torch.long, device=x_BTH.device)
    for i, e in enumerate(embeds):
        x_BTH[i, T - len(e):] = e
        mask[i, T - len(e):] = 1
    return x_BTH, mask


@torch.inference_mode()
def generate_ids(llm, text_tokenizer, embeds: list[torch.Tensor], config: GenerationConfig,
                 streamer=None) -> list[list[int]]:
    """The answer tokens of each prompt (``[T_i, H]``) through ``llm.generate`` (a transformers model or a
    peft model around one), up to and without the first end-of-turn or pad token."""
    x_BTH, mask = left_padded(embeds)
    # tokenizer= lets stop_strings work; with inputs_embeds alone, generate() returns only the new tokens
    out = llm.generate(inputs_embeds=x_BTH, attention_mask=mask, generation_config=config,
                       tokenizer=text_tokenizer, streamer=streamer)
    rows = getattr(out, "sequences", out).tolist()
    ends = set(_as_list(config.eos_token_id)) | {config.pad_token_id}
    return [row[: next((j for j, t in enumerate(row) if t in ends), len(row))] for row in rows]


def generate_batch(model: MLLM, text_tokenizer, requests: list[Request], *,
                   vis_tokenizer: ViQTokenizer | None = None, generation_config: GenerationConfig | None = None,
                   streamer=None, **options) -> list[str]:
    """Answers to a batch of requests: one visual pass, one left-padded ``generate()``. Greedy unless
    ``generation_config`` or ``options`` say otherwise (see ``answer_generation_config``); ``streamer``
    is a transformers streamer (batch size 1, as transformers requires)."""
    if not requests:
        return []
    config = answer_generation_config(model.llm, text_tokenizer, generation_config, **options)
    embeds = prompt_embeddings(model, text_tokenizer, requests, vis_tokenizer)
    tokens = generate_ids(model.llm, text_tokenizer, embeds, config, streamer)
    return [text_tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def generate(model: MLLM, text_tokenizer, question: str, image: Any = None, codes: Codes | None = None,
             vis_tokenizer: ViQTokenizer | None = None, settings: PreprocessConfig | None = None,
             generation_config: GenerationConfig | None = None, streamer=None, **options) -> str:
    """The answer to ``question`` about ``image`` (path, PIL image or uint8 array) or ``codes``; greedy
    unless ``generation_config`` or ``options`` (GenerationConfig fields) say otherwise.

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
                          generation_config=generation_config, streamer=streamer, **options)[0]


# --------------------------------------------------------------------------------------------- CLI

GENERATE_HELP = """Answer a question about an image with a trained MLLM (transformers' generate(), greedy
unless sampling or beams are asked for). MODEL_DIR is a viq train output/checkpoint directory or a viq
export directory. A discrete model encodes the image with its ViQ tokenizer first. Example:
  viq generate outputs/debug/sft_full --image data/demo/images/test/test-00000.png "What shape is shown?"
  viq generate outputs/debug/sft_full "Describe it." --image x.png --do-sample --temperature 0.7 --seed 1
"""


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viq generate", description=GENERATE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="viq train output/checkpoint or viq export directory")
    parser.add_argument("question", help="the question (an <image> placeholder is put first if absent)")
    parser.add_argument("--image", help="image file (PNG, JPEG, WebP, ...)")
    gen = parser.add_argument_group("generation (GenerationConfig fields)")
    gen.add_argument("--max-new-tokens", type=_positive(int), default=DEFAULT_MAX_NEW_TOKENS)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=_positive(float), help="sampling temperature (with --do-sample)")
    gen.add_argument("--top-p", type=_positive(float), help="nucleus sampling mass (with --do-sample)")
    gen.add_argument("--num-beams", type=_positive(int), help="beam search with this many beams")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop once the answer contains TEXT (repeatable); TEXT stays in the answer")
    gen.add_argument("--seed", type=int, help="seed of the sampling")
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


def generation_options(args: argparse.Namespace) -> dict:
    """The GenerationConfig fields the command line set."""
    given = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample or None,
             "temperature": args.temperature, "top_p": args.top_p, "num_beams": args.num_beams,
             "stop_strings": args.stop}
    return {k: v for k, v in given.items() if v is not None}


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
        if args.seed is not None:
            torch.manual_seed(args.seed)
        answer = generate_batch(model, text_tok, [Request(args.question, pixels=pixels)],
                                vis_tokenizer=vis_tok, **generation_options(args))[0]
    except (ValueError, OSError) as err:
        print(f"viq generate: error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(answer)
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
