"""The workload of ``viq bench``: models with published shapes (random weights), synthetic LLaVA-like
batches that give every mode the same LLM tokens, one full training step per mode, and FLOP counts.

A batch row holds samples of a text prompt, at most one image, and an answer, drawn from a seeded mix
and filled to exactly ``seq_len`` tokens. The modes see the same token ids, labels and sample lengths:
the image spans are ``<image>`` placeholders that the visual path fills (pixels through the tower, codes
through the embedder), and in ``text-only`` they are ordinary text tokens. Every mode computes the same loss, the
MLLM's (mllm.model.loss: the LM head on the supervised positions only), so the LLM's work is the same in all.

Shapes: T tokens of a packed row; n patches of one image; w encoder width; H LLM hidden size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mllm.data.chat import IGNORE_INDEX
from mllm.data.layout import num_image_tokens
from mllm.data.packing import collate_packed, collate_padded
from mllm.model.llm import LLM_PRESETS
from mllm.model.loss import supervised_lm_loss
from mllm.model.mllm import MLLM, VisualInput
from mllm.model.projector import Projector
from viq.config import preset as viq_preset
from viq.tokenizer import ViQTokenizer

# the visual path each mode runs before the projector (None: no images, the LLM alone)
VISUAL_OF_MODE = {
    "continuous": "tower",
    "continuous-trainable": "tower",
    "viq-online": "tower+head",
    "viq-offline": "embedder",
    "viq-offline-unfolded": "embedder",  # the same, through the embedder's unfolded input map (CodeEmbedder.fold)
    "text-only": None,
}
LLM_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
)


# ------------------------------------------------------------------------------------ models


def tokenizer_config(
    name: str, width=None, depth=None, num_heads=None, mlp_hidden=None, head_blocks=None, rope_dim=None
):
    """A ViQ tokenizer preset (no pixel decoder) with its encoder and head resized (None: keep)."""
    cfg = viq_preset(name, decoder=None)
    enc = dataclasses.replace(
        cfg.encoder,
        width=width or cfg.encoder.width,
        depth=depth or cfg.encoder.depth,
        num_heads=num_heads or cfg.encoder.num_heads,
        mlp_hidden=mlp_hidden or cfg.encoder.mlp_hidden,
    )
    head = cfg.head
    if width is not None or head_blocks is not None or rope_dim is not None:
        w = enc.width
        blocks = head_blocks or head.pre_blocks
        head = dataclasses.replace(
            head,
            width=w,
            num_heads=enc.num_heads,
            mlp_hidden=4 * w,
            rope_mlp_hidden=4 * w,
            post_hidden=2 * w,
            pre_blocks=blocks,
            rope_blocks=head_blocks or head.rope_blocks,
            post_blocks=head_blocks or head.post_blocks,
            rope_dim=rope_dim or head.rope_dim,
        )
    return dataclasses.replace(cfg, encoder=enc, head=head)


def llm_spec(name: str, shapes: dict) -> dict:
    """HF config fields of an LLM preset, or of a ``shapes[name]`` entry (``base`` preset + overrides)."""
    if name in shapes:
        entry = dict(shapes[name])
        base = entry.pop("base", None)
        if base not in LLM_PRESETS:
            raise ValueError(f"llm_shapes.{name}.base must be an LLM preset, got {base!r}")
        bad = sorted(set(entry) - set(LLM_SHAPE_KEYS))
        if bad:
            raise ValueError(f"llm_shapes.{name}: unknown key {bad[0]!r}; valid: {list(LLM_SHAPE_KEYS)}")
        return {**LLM_PRESETS[base], **entry}
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM {name!r}: neither a preset ({sorted(LLM_PRESETS)}) nor in llm_shapes")
    return dict(LLM_PRESETS[name])


def build_llm(spec: dict, dtype: torch.dtype, device: torch.device, attn: str, seed: int):
    spec = dict(spec)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialise on the device: fast on a GPU
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model


@dataclass
class Workbench:
    """One LLM with the shared projector, the three visual paths, and one AdamW over everything trainable."""

    models: dict[str, MLLM]  # per visual path; they share the LLM and the projector
    llm: torch.nn.Module
    tokenizer: ViQTokenizer
    optimizer: torch.optim.Optimizer
    image_token_id: int
    embedder_trainable: bool


def build_workbench(tok: ViQTokenizer, llm, lr: float, embedder_trainable: bool) -> Workbench:
    image_token_id = llm.config.vocab_size - 1  # a synthetic placeholder id; nothing is tokenised here
    llm.train()  # training mode: what a real step runs (and what gradient checkpointing needs)
    projector = Projector(tok.cfg.encoder.width, llm.config.hidden_size).to(
        device=tok.device, dtype=tok.encoder.pos_embed.dtype
    )
    visuals = {
        "tower": VisualInput(tok, "continuous", use_head=False),
        "tower+head": VisualInput(tok, "continuous", use_head=True),
        "embedder": VisualInput(tok, "discrete"),
    }
    models = {k: MLLM(llm, v, image_token_id, projector) for k, v in visuals.items()}
    params = {id(p): p for m in models.values() for p in m.parameters()}
    # AdamW skips parameters whose grad is None, so the frozen parts of a mode cost nothing in its step
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, foreach=True)
    return Workbench(models, llm, tok, optimizer, image_token_id, embedder_trainable)


def set_trainable(bench: Workbench, mode: str) -> None:
    """Freeze the visual modules the mode keeps frozen. A frozen module with inputs that need no grad
    records no graph and saves no activation: the same cost as running it under torch.no_grad."""
    tok = bench.tokenizer
    tok.encoder.requires_grad_(mode == "continuous-trainable")
    tok.encoder.train(mode == "continuous-trainable")  # train mode turns on its gradient checkpointing
    tok.head.requires_grad_(False)
    tok.head.embedder.requires_grad_(mode.startswith("viq-offline") and bench.embedder_trainable)
    tok.head.embedder.fold = mode != "viq-offline-unfolded"


# ----------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class SynthSample:
    prompt: int  # text tokens before the image
    grid: tuple[int, int] | None  # patch grid of its image, None for a text-only sample
    answer: int  # supervised text tokens after it

    @property
    def image_tokens(self) -> int:
        return num_image_tokens(*self.grid) if self.grid else 0

    @property
    def length(self) -> int:
        return self.prompt + self.image_tokens + self.answer


def synth_samples(mix, seq_len: int, rng: np.random.Generator) -> list[SynthSample]:
    """Samples drawn from ``mix`` (a mllm.tools.bench.SampleMixConfig) until they fill exactly ``seq_len`` tokens.

    Answers are log-uniform in ``mix.answer_tokens``: many short samples and a few long ones, the
    LLaVA-like length mix on which packing pays. The last sample is cut (or made text-only) to fit.
    """
    weights = np.asarray(mix.grid_weights, dtype=float)
    if len(weights) != len(mix.grids) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"grid_weights {mix.grid_weights} do not fit grids {mix.grids}")
    lo, hi = mix.answer_tokens
    samples, room = [], seq_len
    while room > 0:
        grid = None
        if rng.random() >= mix.text_only_fraction:
            grid = tuple(mix.grids[rng.choice(len(weights), p=weights / weights.sum())])
        prompt = int(rng.integers(mix.prompt_tokens[0], mix.prompt_tokens[1] + 1))
        answer = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        if grid is not None and prompt + num_image_tokens(*grid) + 1 > room:
            grid = None  # the image does not fit in what is left of the row
        s = SynthSample(prompt, grid, answer)
        if s.length > room:
            answer = max(1, room - prompt - s.image_tokens)
            prompt = room - s.image_tokens - answer
            s = SynthSample(prompt, grid, answer)
        samples.append(s)
        room -= s.length
    return samples


def make_items(
    samples: list[SynthSample],
    kind: str,
    *,
    vocab: int,
    image_token_id: int,
    codebook: int,
    codes_per_patch: int,
    patch: int,
    seed: int,
) -> list[dict]:
    """Data-set items for one visual kind: ``pixels``, ``codes`` or ``text``. Text ids and labels depend on
    the seed only, so every kind of one seed carries the same tokens."""
    text_rng = np.random.default_rng(seed)  # the same text for every kind
    vis = torch.Generator().manual_seed(seed + 1)
    items = []
    for s in samples:
        prompt = torch.from_numpy(text_rng.integers(4, image_token_id, s.prompt))
        answer = torch.from_numpy(text_rng.integers(4, image_token_id, s.answer))
        filler = torch.from_numpy(text_rng.integers(4, image_token_id, s.image_tokens))
        span = filler if kind == "text" else torch.full((s.image_tokens,), image_token_id)
        item = {
            "input_ids": torch.cat([prompt, span, answer]).long(),
            "labels": torch.cat([torch.full((s.prompt + s.image_tokens,), IGNORE_INDEX), answer]).long(),
            "image_grids": torch.tensor([s.grid] if s.grid and kind != "text" else [], dtype=torch.long).reshape(-1, 2),
        }
        if kind == "pixels":
            item["pixel_values"] = (
                [torch.randn(3, patch * s.grid[0], patch * s.grid[1], generator=vis)] if s.grid else []
            )
        elif kind == "codes":
            n = s.grid[0] * s.grid[1] * codes_per_patch if s.grid else 0
            item["codes"] = torch.randint(0, codebook, (n,), generator=vis)
        elif kind == "text":
            item["pixel_values"] = []
        else:
            raise ValueError(f"unknown item kind {kind!r}; expected pixels, codes or text")
        items.append(item)
    return items


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    def move(v):
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        return v

    return {k: move(v) for k, v in batch.items()}


def collate(items: list[dict], packed: bool) -> dict:
    return collate_packed(items) if packed else collate_padded(items, pad_token_id=0)


# -------------------------------------------------------------------------------------- step


def attention_kwargs(batch: dict, attn: str) -> dict:
    """Packed-row boundaries for the varlen kernels, given up front so that no layer syncs to find them."""
    cu = batch.get("cu_seq_lens")
    if cu is None or attn == "sdpa":
        return {}
    max_len = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def train_step(bench: Workbench, mode: str, batch: dict, attn_kwargs: dict) -> float:
    """One full training step (forward, backward, AdamW) of ``mode``; returns the loss."""
    set_trainable(bench, mode)
    bench.optimizer.zero_grad(set_to_none=True)
    common = {
        "labels": batch["labels"],
        "position_ids": batch.get("position_ids"),
        "attention_mask": batch.get("attention_mask"),
        **attn_kwargs,
    }
    path = VISUAL_OF_MODE[mode]
    if path is None:
        loss = llm_only_loss(bench.llm, batch["input_ids"], **common)
    else:
        loss = bench.models[path](
            input_ids=batch["input_ids"],
            pixel_values=batch.get("pixel_values"),
            codes=batch.get("codes"),
            image_grids=batch["image_grids"],
            **common,
        ).loss
    loss.backward()
    bench.optimizer.step()
    return float(loss.detach())


def llm_only_loss(llm, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """The ``text-only`` step's loss: the LLM alone, with the MLLM's training loss (mllm.model.loss, the LM head
    on the supervised positions only). ``llm(labels=...)`` would run transformers' loss over full-vocabulary
    logits at every position, work the visual modes never do (on the CPU preset's 512-token cell, 129 positions
    supervised, it made the text-only step about 20 % slower, and slower than ``viq-offline``)."""
    hidden = llm.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    return supervised_lm_loss(hidden, llm.get_output_embeddings(), labels)


def embedder_forward(bench: Workbench, batch: dict) -> torch.Tensor:
    """The code embedder alone on a codes batch, forward only and folded: what ``viq-offline`` adds to a
    ``text-only`` step at the limit (the prediction of the bench's summary)."""
    set_trainable(bench, "viq-offline")
    with torch.no_grad():
        return bench.models["embedder"].visual(codes=batch["codes"], image_grids=batch["image_grids"])


# ------------------------------------------------------------------------------------- FLOPs


def llm_train_flops(cfg, lengths: list[int]) -> float:
    """Forward + backward FLOPs of a causal LM on samples of ``lengths`` tokens (packed: no cross terms):
    6 x matmul parameters per token (the LM head included, the embedding lookup not) + causal attention."""
    h, layers, inter, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // nq
    per_token = layers * (2 * h * nq * hd + 2 * h * nkv * hd + 3 * h * inter) + h * vocab
    return 6.0 * per_token * sum(lengths) + 6.0 * layers * nq * hd * sum(n * n for n in lengths)


def _vit_flops(n: int, width: int, mlp: int, depth: int) -> float:
    return depth * (2.0 * n * (4 * width * width + 2 * width * mlp) + 4.0 * n * n * width)


def visual_forward_flops(tcfg, grids: list[tuple[int, int]], path: str | None, folded: bool = True) -> float:
    """Forward FLOPs of a mode's visual path over images of ``grids`` (the projector not included);
    ``folded``: the code embedder's folded input map, else project_out per sub-code and then fc1."""
    if path is None:
        return 0.0
    enc, head = tcfg.encoder, tcfg.head
    w, e = enc.width, head.expand
    total = 0.0
    for h_, w_ in grids:
        n = h_ * w_
        # the folded input map (viq.decoder.CodeEmbedder): E*d raw code values -> E*C, then fc2, post MLP, blocks
        input_map = e * head.code_dim * e * w if folded else e * head.code_dim * w + (e * w) ** 2
        embedder = n * 2.0 * (input_map + e * w * w + 2 * w * w + head.post_blocks * 2 * w * head.post_hidden)
        if path == "embedder":
            total += embedder
            continue
        total += 2.0 * n * 3 * enc.patch_size**2 * w + _vit_flops(n, w, enc.mlp_hidden, enc.depth)
        if path == "tower+head":
            r, m = head.rope_dim, 4 * n  # head-wise RoPE blocks: e sub-tokens per patch, the heads
            rope = 2.0 * m * (2 * w * r + 4 * r * r + 2 * w * head.rope_mlp_hidden) + 4.0 * n * n * r * e
            total += _vit_flops(n, w, head.mlp_hidden, head.pre_blocks) + head.headwise_blocks * rope
            total += 2.0 * n * (w * e * w + (e * w) ** 2 + e * 2 * w * w) + embedder
    return total
