"""Training the ViQ tokenizer in stages (viq-paper.md §1.1-1.5), each run by ``viq train RECIPE`` with a
``stage`` section in the recipe (mllm.config.StageConfig):

- ``stage1``: the encoder at native resolution + projector + LLM (LoRA): LM loss + self-distillation;
- ``proximal`` (2-1): the head with an L-inf bottleneck: LM + distillation + reconstruction;
- ``fsq`` (2-2): the FSQ head, initialised from 2-1 through an explicit key map (mllm.stages.init);
- ``decoder``: the pixel decoder on the frozen tokenizer (mllm.stages.decoder), no LLM.

The LLM stages run the ordinary MLLM Trainer on a model wrapper, ``TokenizerStageModel`` (an MLLM, so
checkpointing, LoRA and the optimizer groups work unchanged), whose forward adds to the LM loss
    distill_weight * mean_i (1 - cos(MAP(student_i), MAP_teacher(image_i resized to R x R)))
    + recon_weight * MSE(decoder(head features), target) [+ recon_weight * perceptual_weight * perceptual]
    + feat_rec_weight * MSE(head features before the affine, normalised trunk features)
where the student's features are the ones the LLM sees (stage1: the trunk; later: the head's output),
taken from the same forward (mllm.model.mllm.VisualTrace): the tower runs once per step. The reconstruction
target (stage.recon_target) is the posterior mean of the frozen Qwen-Image VAE encoder (vae_latent: the decoder
predicts 2x2 latent pixels per patch, as the reference's QwenImageVAEHead) or the pixels themselves (with the
optional perceptual term). Every stage writes
``train.output_dir/viq_tokenizer`` (ViQTokenizer.save_pretrained) and ``stage_report.json``.

Shape legend: ``N`` packed patches, ``C`` width, ``B`` images.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import TrainingArguments
from transformers.utils import ModelOutput

from mllm.config import RecipeConfig, StageConfig, resolve_attention, resolve_dtype
from mllm.model.build import BuiltModel, add_lora, apply_trainable, enable_gradient_checkpointing
from mllm.model.layout import VIQ_DIR
from mllm.model.llm import IMAGE_TOKEN, load_llm
from mllm.model.mllm import MLLM, VisualInput, VisualTrace
from mllm.stages.areas import area_phases
from mllm.stages.init import (
    dry_run_tokenizer,
    init_language_side,
    load_init_projector,
    load_perceptual,
    load_stage_tokenizer,
    merge_adapter,
    perceptual_term,
)
from mllm.stages.metrics import StageMetrics, code_stability
from mllm.stages.report import REPORT_FILE, parameter_counts, stage_report, write_report
from mllm.stages.teacher import build_teacher
from mllm.train.checkpoint import load_checkpoint_weights
from mllm.train.restart import mark_run_complete, train_or_restore
from mllm.train.trainer import MLLMTrainer, calibrate_projector, leading_items, prepare_trainer
from mllm.train.zero import full_parameters
from viq.convert.keymap import KeyMapReport
from viq.decoder import reconstruction_loss
from viq.image import pad_to_multiple
from viq.tokenizer import ViQTokenizer
from viq.vae import empty_vae_half, encode_latents, load_vae_halves

log = logging.getLogger(__name__)

@dataclasses.dataclass
class StageOutput(ModelOutput):
    """``loss`` = lm_loss + the weighted terms; the terms are unweighted and detached (for logging)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    distill_loss: torch.Tensor | None = None
    recon_loss: torch.Tensor | None = None
    perceptual_loss: torch.Tensor | None = None
    feat_rec_loss: torch.Tensor | None = None


class TokenizerStageModel(MLLM):
    """The MLLM of a tokenizer stage (continuous visual input) plus the stage's auxiliary losses.

    Registered on top of the MLLM's parts: ``teacher`` (frozen), ``decoder`` (the tokenizer's pixel
    decoder, when reconstruction is on) and ``perceptual`` (frozen, when it is a module). ``tokenizer``
    is held unregistered: its modules are the ones registered here, it only saves them together. So is
    ``vae_encoder`` (the frozen VAE encoder of a latent target): never trained, never saved, and kept out
    of DeepSpeed's partitioning; it follows the decoder's device on first use.
    """

    def __init__(self, llm, visual: VisualInput, image_token_id: int, tokenizer: ViQTokenizer,
                 stage: StageConfig, teacher=None, perceptual=None, pool: str = "softmax", aux_scale: float = 1.0,
                 vae_encoder=None):
        super().__init__(llm, visual, image_token_id, pool=pool)
        object.__setattr__(self, "tokenizer", tokenizer)
        self.stage = stage
        self.teacher = teacher if stage.distill_weight > 0 else None
        recon = visual.use_head and stage.recon_weight > 0 and stage.recon_target != "none"
        if recon and tokenizer.decoder is None:
            raise ValueError(f"stage.recon_weight={stage.recon_weight} but the tokenizer has no pixel decoder "
                             "(decoder: null in its config)")
        if recon and stage.recon_target == "vae_latent" and vae_encoder is None:
            raise ValueError("stage.recon_target=vae_latent needs the frozen VAE encoder (viq.vae.load_vae_halves)")
        self.decoder = tokenizer.decoder if recon else None
        self.perceptual = perceptual if recon else None
        object.__setattr__(self, "vae_encoder", vae_encoder if recon else None)
        if not visual.keep_trace:
            raise ValueError("a tokenizer stage reads the visual trace: build its VisualInput with keep_trace=True")
        self.aux_scale = aux_scale  # 1 / (grad_accum * world size) in training, see forward
        fsq = visual.use_head and tokenizer.head.fsq is not None
        self.metrics = StageMetrics(stage.metrics_window, tokenizer.codebook_size if fsq else None,
                                    pixel_recon=stage.recon_target == "pixels")
        self.stage_report: dict = {}
        self._forwards = 0

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, pixel_values=None,
                codes=None, image_grids=None, **kwargs):
        out = super().forward(input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask,
                              pixel_values=pixel_values, codes=codes, image_grids=image_grids, **kwargs)
        trace, self.visual.trace = self.visual.trace, None  # drop the reference: it holds the graph
        terms = self.aux_terms(trace, pixel_values)
        st = self.stage
        weights = {"distill_loss": st.distill_weight, "recon_loss": st.recon_weight,
                   "perceptual_loss": st.recon_weight * st.perceptual_weight, "feat_rec_loss": st.feat_rec_weight}
        aux = sum(weights[k] * v for k, v in terms.items()) if terms else self._zero_aux()
        # In training the Trainer passes num_items_in_batch and treats the loss as already normalised over
        # the accumulated, all-rank batch (the LM loss is), then multiplies it by the world size; the
        # per-micro-batch means here are scaled so that their gradients average the same way.
        scale = self.aux_scale if kwargs.get("num_items_in_batch") is not None else 1.0
        lm = out.loss if out.loss is not None else torch.zeros((), device=aux.device)
        if self.training:
            self._record(lm.detach() / scale, terms, trace, pixel_values)
        return StageOutput(loss=lm + scale * aux, logits=out.logits, lm_loss=lm.detach(),
                           **{k: v.detach() for k, v in terms.items()})

    def aux_terms(self, trace: VisualTrace | None, pixel_values) -> dict[str, torch.Tensor]:
        """The unweighted auxiliary losses of one forward; none for a batch without images."""
        if trace is None:
            return {}
        terms = {}
        if self.teacher is not None:
            student_ND = trace.head.features if trace.head is not None else trace.trunk
            student_BC = self.visual.encoder.pool(student_ND, trace.cu)
            target_BC = self.teacher(list(pixel_values))
            terms["distill_loss"] = (1 - F.cosine_similarity(student_BC.float(), target_BC.float(), dim=-1)).mean()
        if self.decoder is not None:
            preds = self.decoder(trace.head.features, trace.grids, trace.cu, trace.max_len)
            patch = self.visual.patch_size
            targets = [pad_to_multiple(x.to(p.device), patch) for x, p in zip(pixel_values, preds, strict=True)]
            if self.vae_encoder is not None:
                vae = self.vae_encoder.to(preds[0].device)  # a no-op after the first step
                targets = [encode_latents(vae, x) for x in targets]
            terms["recon_loss"] = reconstruction_loss(preds, targets)
            if self.perceptual is not None:
                terms["perceptual_loss"] = perceptual_term(self.perceptual, preds, targets)
        if self.stage.feat_rec_weight > 0 and trace.head is not None:
            emb = self.visual.head.embedder
            # undoing the affine is exact in value and gradient: d/dw and d/db of (x*w + b - b)/w vanish
            pre_affine_NC = (trace.head.features - emb.affine_bias) / emb.affine_weight
            terms["feat_rec_loss"] = F.mse_loss(pre_affine_NC.float(), trace.head.pre_quant.detach().float())
        return terms

    def _zero_aux(self) -> torch.Tensor:
        """0 * (trainable decoder weights): a text-only batch still gives them a (zero) gradient, so every
        rank uses the same parameters (the MLLM does the same for the visual parts)."""
        params = [p for p in self.decoder.parameters() if p.requires_grad] if self.decoder is not None else []
        if not params:
            return torch.zeros((), device=self.llm.device)
        return sum(p.sum() for p in params) * 0.0

    def _record(self, lm: torch.Tensor, terms: dict, trace: VisualTrace | None, pixel_values) -> None:
        self._forwards += 1
        values = {"lm_loss": lm, **terms}
        if "distill_loss" in terms:
            values["distill_cos"] = 1 - terms["distill_loss"]
        indices = trace.head.indices if trace is not None and trace.head is not None else None
        if indices is not None:
            self.metrics.add_codes(indices)
            every = self.stage.stability_every
            if every and self._forwards % every == 0:
                values["code_stability"] = code_stability(self.visual.encoder, self.visual.head, list(pixel_values),
                                                          indices, self.stage.noise_sigma, seed=self._forwards)
        self.metrics.add(**values)

    def pop_metrics(self) -> dict[str, float]:
        """Means since the last call (MLLMTrainer.log adds them to every training log)."""
        return self.metrics.pop()


# ----------------------------------------------------------------------------------------- building

def _set_trainable(model: TokenizerStageModel, cfg: RecipeConfig) -> None:
    apply_trainable(model, cfg)
    if cfg.trainable.tower and model.teacher is not None:
        # the student's MAP head serves the distillation here (apply_trainable freezes it for plain MLLMs)
        model.visual.encoder.attn_pool.requires_grad_(True)
    if model.decoder is not None:
        model.decoder.requires_grad_(True)  # the decoder trains whenever reconstruction is on


def build_stage_model(cfg: RecipeConfig, args: TrainingArguments | None = None, *, cuda: bool | None = None,
                      dry_run: bool = False) -> BuiltModel:
    """The TokenizerStageModel of an LLM stage, seeded by train.seed. ``args``: the run's training arguments
    (they set how the auxiliary losses are scaled, see TokenizerStageModel.forward). ``dry_run``: shapes only
    (no weight files read; run it under ``torch.device("meta")``), see mllm.stages.run.dry_run."""
    stage = cfg.stage
    aux_scale = 1.0 / (args.gradient_accumulation_steps * args.world_size) if args is not None else 1.0
    dtype = resolve_dtype(cfg.model.dtype, cuda)
    attn = resolve_attention(cfg.model.attn_implementation, cuda)
    if dry_run:
        tok, report, init = dry_run_tokenizer(cfg), KeyMapReport(), cfg.model.tokenizer
    else:
        tok, report, init = load_stage_tokenizer(cfg)
    teacher, teacher_record = build_teacher(cfg, tok.encoder, dry_run)
    vae_encoder = None
    if stage.recon_target == "vae_latent" and stage.kind != "stage1" and dry_run:
        vae_encoder = empty_vae_half("encoder")
    elif stage.recon_target == "vae_latent" and stage.kind != "stage1":
        vae_encoder, tok.vae = load_vae_halves(stage.vae, dtype)  # the tokenizer saves the decoder half
        if tok.vae.config.z_dim != tok.cfg.decoder.out_channels:
            raise ValueError(f"stage.vae={stage.vae!r} has {tok.vae.config.z_dim} latent channels; the "
                             f"reconstruction branch predicts {tok.cfg.decoder.out_channels}")
    perceptual = load_perceptual(stage.perceptual) if stage.perceptual and not dry_run else None
    llm_dtype = torch.float32 if cfg.trainable.llm == "full" else dtype
    continues = stage.llm_from_init and not dry_run
    llm_spec, adapter, init_visual = init_language_side(cfg) if continues else (cfg.model.llm, None, None)
    # a dry run reads no weight files: a preset stands for its shape there
    llm_init = "random" if dry_run else cfg.model.llm_init
    llm, text_tok = load_llm(llm_spec, init=llm_init, dtype=llm_dtype, attn_implementation=attn, seed=cfg.train.seed)
    if adapter is not None:
        llm = merge_adapter(llm, adapter)
    llm.config.use_cache = False
    visual = VisualInput(tok, "continuous", use_head=stage.kind != "stage1", keep_trace=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the projector's initialisation is part of the recipe
        model = TokenizerStageModel(llm, visual, text_tok.convert_tokens_to_ids(IMAGE_TOKEN), tok, stage,
                                    teacher, perceptual, cfg.model.projector_pool, aux_scale, vae_encoder)
    if init_visual is not None:
        n = load_init_projector(model, init_visual)
        log.info("stage %s continues the LLM (%s%s) and the projector (%d tensors) of %s", stage.kind, llm_spec,
                 f" + adapter {adapter}" if adapter else "", n, stage.init)
    _set_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.trainable.llm == "lora":
        model.llm = add_lora(model.llm, cfg)
    if model.teacher is not None:
        model.teacher.to(dtype)  # frozen and never saved; the trained parts stay fp32 (they are the product)
    model.stage_report = {**stage_report(cfg, tok, report, init, parameter_counts(model)), **teacher_record}
    log.info("built tokenizer stage %s (llm=%s, init=%s): %.2fM of %.2fM parameters trainable", stage.kind,
             cfg.model.llm, init, model.stage_report["parameters"]["trainable"] / 1e6,
             model.stage_report["parameters"]["total"] / 1e6)
    return BuiltModel(model, text_tok, None, dtype)


# ------------------------------------------------------------------------------------------ running

def calibrate_fsq(tok: ViQTokenizer, dataset, n_images: int) -> None:
    """Data-dependent start of the FSQ input projection on the first ``n_images`` training images
    (viq.head.QuantizationHead.calibrate_quantizer_input says why)."""
    pixels: list = []
    for item in leading_items(dataset):
        for sample in item:
            pixels.extend(sample.get("pixel_values") or [])
        if len(pixels) >= n_images:
            break
    if not pixels:
        log.warning("no training image to calibrate the FSQ input projection on; keeping its init")
        return
    with torch.no_grad():
        out = tok(pixels[:n_images])
        std = tok.head.calibrate_quantizer_input(out.trunk, out.grids, out.cu, out.max_len)
    log.info("calibrated the FSQ input projection on %d images (per-dimension std before: %s)",
             min(len(pixels), n_images), [round(float(v), 4) for v in std])


def run_llm_stage(cfg: RecipeConfig) -> Path:
    """Train stage 1, 2-1 or 2-2 with the MLLM Trainer; returns its ``viq_tokenizer`` directory. Restarting a
    finished stage with train.resume=true trains and writes nothing (mllm.train.restart)."""
    trainer = prepare_trainer(cfg, build=build_stage_model, phases=area_phases(cfg))
    try:
        return _train_stage(cfg, trainer)
    finally:
        trainer.release_output_dir()


def _train_stage(cfg: RecipeConfig, trainer: MLLMTrainer) -> Path:
    model: TokenizerStageModel = trainer.accelerator.unwrap_model(trainer.model)
    out, fresh = Path(cfg.train.output_dir), trainer.resume_from is None

    def before_training() -> None:
        if cfg.stage.kind == "fsq" and cfg.stage.calibrate and fresh:
            calibrate_fsq(model.tokenizer, trainer.train_dataset, cfg.stage.calibration_images)
        if cfg.train.calibrate_projector and fresh:
            calibrate_projector(trainer, cfg.train.calibration_samples)  # on the (calibrated) head's features
        if trainer.args.should_save:
            write_report(out, model.stage_report)  # before training: a failed run still shows the key map

    outcome = train_or_restore(trainer, before_training)
    if outcome == "finished":
        return out / VIQ_DIR
    if outcome == "trained":
        trainer.save_model(str(out))
        if trainer.eval_dataset is not None:
            trainer.evaluate()
    else:  # killed during its final save: the tokenizer is exported again from the last checkpoint
        with full_parameters(model, modify=True):
            load_checkpoint_weights(model, trainer.resume_from)
    # ViQTokenizer.save_pretrained writes the module's own tensors: under ZeRO-3 gathered first, on every rank
    with full_parameters(model.tokenizer):
        if trainer.args.should_save:
            model.tokenizer.save_pretrained(out / VIQ_DIR)
        last = [rec for rec in trainer.state.log_history if "lm_loss" in rec]
        write_report(out, {**model.stage_report, "final_metrics": last[-1] if last else {}})
        log.info("stage %s done: %s", cfg.stage.kind, out / VIQ_DIR)
    mark_run_complete(trainer, extra=(VIQ_DIR, REPORT_FILE))
    return out / VIQ_DIR
