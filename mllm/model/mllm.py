"""LLaVA-style MLLM: visual features (continuous tower or ViQ codes) -> projector -> HF causal LM.

Shape legend: ``T`` tokens of a (packed) row, ``H`` LLM hidden size, ``C`` visual width,
``N`` packed patches of all images of a batch.
Visual embeddings replace the ``<image>`` placeholder positions of ``input_ids`` in order: image i's
``num_image_tokens(h_i, w_i)`` embeddings go to the i-th run of placeholders. The data pipeline expands
each ``<image>`` into that many placeholders, so lengths are known before packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mllm.data.layout import num_image_tokens
from mllm.model.loss import supervised_lm_loss
from mllm.model.projector import Projector
from viq.encoder import Encoder
from viq.head import HeadOutput
from viq.tokenizer import ViQTokenizer

VisualMode = Literal["continuous", "discrete"]


@dataclass
class VisualTrace:
    """The intermediates of the last continuous forward, kept when ``VisualInput.keep_trace`` is set:
    the tokenizer stages (mllm.stages) reuse them for distillation and reconstruction instead of
    running the tower a second time."""

    trunk: torch.Tensor  # [N, C] encoder output before its final norm
    head: HeadOutput | None  # with use_head
    grids: list[tuple[int, int]]
    cu: torch.Tensor
    max_len: int


class VisualInput(nn.Module):
    """Pixels or codes -> per-image features ``[h*w, C]``.

    ``continuous``: the ViQ encoder runs on pixels inside the step (with ``use_head``, the quantization
    head too, so the LLM sees quantized features); without the head, the features are the encoder's
    final-norm output (SigLIP2's last_hidden_state). ``discrete``: codes -> the token-local code
    embedder; no pixels, no encoder.

    The modules are the tokenizer's own (not copies); ``encoder`` replaces its tower (a SigLIP2 checkpoint
    of the same patch layout), and ``keep_trace`` keeps each continuous forward's intermediates in
    ``trace`` for the tokenizer stages' losses.
    """

    def __init__(self, tokenizer: ViQTokenizer, mode: VisualMode, use_head: bool = False, *,
                 encoder: Encoder | None = None, keep_trace: bool = False):
        super().__init__()
        if mode not in ("continuous", "discrete"):
            raise ValueError(f"visual mode must be 'continuous' or 'discrete', got {mode!r}")
        if encoder is not None and mode == "discrete":
            raise ValueError("the discrete visual input runs no encoder: an encoder was given")
        tower = encoder if encoder is not None else tokenizer.encoder
        self.mode = mode
        self.use_head = use_head
        self.width = tower.cfg.width
        self.patch_size = tower.cfg.patch_size
        self.codes_per_patch = tokenizer.cfg.head.expand
        self.keep_trace = keep_trace
        self.trace: VisualTrace | None = None
        if mode == "continuous":
            self.encoder = tower
            self.head = tokenizer.head if use_head else None
        else:
            self.embedder = tokenizer.head.embedder

    def forward(self, pixel_values=None, codes=None, image_grids=None) -> torch.Tensor:
        """The packed features ``[N, C]`` of all images, image after image (``h*w`` rows each): one tensor, not
        one per image, for the reason given in mllm.model.projector.Projector.forward."""
        if self.mode == "discrete":
            return self._from_codes(codes, image_grids)
        if pixel_values is None:
            raise ValueError("the continuous visual input needs pixel_values")
        t = self.encoder.forward_pixels(pixel_values)
        head = self.head(t.trunk_ND, t.grids, t.cu, t.max_len) if self.use_head else None
        feats = head.features if head is not None else self.encoder.norm(t.trunk_ND)
        if self.keep_trace:
            self.trace = VisualTrace(t.trunk_ND, head, t.grids, t.cu, t.max_len)
        return feats

    def _from_codes(self, codes: torch.Tensor, image_grids) -> torch.Tensor:
        """``codes``: one flat tensor, the images' codes one after another (``h*w*codes_per_patch`` each)."""
        if codes is None or image_grids is None:
            raise ValueError("the discrete visual input needs codes and image_grids")
        grids = [tuple(int(v) for v in g) for g in image_grids]
        sizes = [h * w * self.codes_per_patch for h, w in grids]
        if codes.numel() != sum(sizes):
            raise ValueError(f"{codes.numel()} codes do not match the grids {grids} ({sum(sizes)} expected)")
        return self.embedder(codes.to(self.embedder.project_out.weight.device).reshape(-1, self.codes_per_patch))


class MLLM(nn.Module):
    def __init__(self, llm: PreTrainedModel, visual: VisualInput, image_token_id: int,
                 projector: Projector | None = None, pool: str = "softmax"):
        super().__init__()
        self.llm = llm
        self.visual = visual
        self.image_token_id = image_token_id
        self.projector = projector or Projector(visual.width, llm.config.hidden_size, pool)

    @property
    def config(self):
        return self.llm.config

    def image_embeddings(self, pixel_values=None, codes=None, image_grids=None) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in image_grids]
        feats = self.visual(pixel_values=pixel_values, codes=codes, image_grids=grids)
        return self.projector(feats, grids)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values=None, codes=None, image_grids=None):
        embeds = self.llm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        n_images = 0 if image_grids is None else len(image_grids)
        if n_images == 0:
            if n_slots:
                raise ValueError(f"{n_slots} <image> positions but no images in the batch")
            return embeds + self._zero_visual_term().to(embeds.dtype)
        expected = sum(num_image_tokens(int(h), int(w)) for h, w in image_grids)
        if n_slots != expected:
            raise ValueError(f"{n_slots} <image> positions for {n_images} images needing {expected} tokens")
        vis = self.image_embeddings(pixel_values, codes, image_grids).to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), vis)

    def _zero_visual_term(self) -> torch.Tensor:
        """0 * (the visual path on a dummy 2x2-patch image). A batch without images runs the same modules, in
        the same order, as a batch with them: every rank then uses the same parameters (DDP) and gathers them
        in the same sequence (ZeRO-3 records its parameter-fetch trace from the modules that run; a rank that
        skipped the visual modules desynchronised it and hung). The term is exactly zero in value and
        gradient."""
        grid = [(2, 2)]
        if self.visual.mode == "discrete":
            codes = torch.zeros(4 * self.visual.codes_per_patch, dtype=torch.long)
            vis = self.image_embeddings(codes=codes, image_grids=grid)
        else:
            ref = next(self.visual.encoder.parameters())
            side = 2 * self.visual.patch_size
            vis = self.image_embeddings(pixel_values=[ref.new_zeros(3, side, side)], image_grids=grid)
            self.visual.trace = None  # the dummy image is no training image: leave no trace for the stages
        return vis.sum() * 0.0

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, pixel_values=None,
                codes=None, image_grids=None, **kwargs):
        embeds = self.embed_inputs(input_ids, pixel_values, codes, image_grids)
        kwargs.pop("cu_seq_lens", None)  # transformers derives packed boundaries from position_ids
        if labels is None or getattr(self.llm.config, "final_logit_softcapping", None):
            return self.llm(inputs_embeds=embeds, labels=labels, position_ids=position_ids,
                            attention_mask=attention_mask, use_cache=False, **kwargs)
        # training: the loss over the supervised positions only (mllm.model.loss), no full-vocabulary logits
        items = kwargs.pop("num_items_in_batch", None)
        out = self.llm.get_decoder()(inputs_embeds=embeds, position_ids=position_ids,
                                     attention_mask=attention_mask, use_cache=False, **kwargs)
        loss = supervised_lm_loss(out.last_hidden_state, self.llm.get_output_embeddings(), labels, items)
        return CausalLMOutputWithPast(loss=loss)
