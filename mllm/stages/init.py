"""Where a ViQ tokenizer stage starts: the init tokenizer with its head changed for the stage through an
explicit key map, and the optional perceptual loss (the teacher: mllm.stages.teacher).

Chaining rule (viq-reference.md §3.6, where the reference needs keys filtered by hand): the stage's
tokenizer is built fresh from the init tokenizer's config with the stage's head (stage1: unchanged,
proximal: an L-inf/l2/tanh/none bottleneck, fsq: FSQ levels), then every init tensor is copied through
an identity key map with ``allow_reshape``: a tensor whose shape still fits is loaded, one whose shape
changed (project_in, embedder.project_out, the codebook) or that the init lacks (the head-wise blocks
entering 2-2) keeps its fresh initialisation and is listed. Source tensors are dropped (listed as ignored)
only when the new head has no place for them: the FSQ implicit codebook (a function of the levels, not a
learned weight) and, entering a proximal stage, the head-wise blocks (the reference's 2-1 head has none).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mllm.config import RecipeConfig, StageConfig
from mllm.model.layout import LLM_DIR, VIQ_DIR, VISUAL_WEIGHTS
from mllm.model.viq_loader import load_viq
from viq.config import PRESETS as VIQ_PRESETS
from viq.config import DecoderConfig, TokenizerConfig, preset
from viq.convert.keymap import KeyMapReport, apply_key_map
from viq.convert.siglip2 import load_siglip2, resample_position_table
from viq.encoder import Encoder
from viq.tokenizer import ViQTokenizer
from viq.vae import LATENT_CHANNELS as VAE_LATENT_CHANNELS
from viq.vae import SPATIAL_FACTOR as VAE_SPATIAL_FACTOR

log = logging.getLogger(__name__)

IDENTITY = [(r"(.+)", r"\1")]
# derived from head.levels (viq.decoder.CodeEmbedder); a head without FSQ has no such buffer
CODEBOOK_KEY = r"head\.embedder\.codebook"
# the head-wise blocks (and a learned sub-token table) of the FSQ head: a proximal head has none (as the
# reference's), so they are ignored entering 2-1 and start fresh in 2-2 (listed as re-initialised)
HEADWISE_KEYS = r"head\.(?:rope_blocks|positions)\..+"


def stage_tokenizer_config(source: TokenizerConfig, stage: StageConfig) -> TokenizerConfig:
    """The init tokenizer's config with the head this stage trains."""
    head = source.head
    if stage.kind in ("proximal", "fsq"):
        head = dataclasses.replace(head, position=stage.head_position or head.position,
                                   proximal_rope_blocks=stage.proximal_rope_blocks)
    if stage.kind == "proximal":
        head = dataclasses.replace(head, quantizer=stage.quantizer or "linf",
                                   bottleneck_dim=stage.bottleneck_dim or head.bottleneck_dim)
    elif stage.kind == "fsq":
        head = dataclasses.replace(head, quantizer="fsq", levels=tuple(stage.levels or head.levels))
    return dataclasses.replace(source, head=head, decoder=recon_decoder_config(source, stage))


def recon_decoder_config(source: TokenizerConfig, stage: StageConfig) -> DecoderConfig | None:
    """The reconstruction branch's output for stage.recon_target: 2x2 latent pixels of the Qwen-Image VAE per
    16-px patch (the released drawer: 16 channels, f8), or the patch's RGB pixels. Outputs of another shape
    (a stage-1 RGB decoder before a latent stage, a latent drawer before the RGB decoder stage) are
    re-initialised by the key map and listed."""
    dec, patch = source.decoder, source.encoder.patch_size
    if dec is None or stage.kind == "stage1" or stage.recon_target == "none":
        return dec
    if stage.recon_target == "pixels":  # always for the decoder stage
        return dataclasses.replace(dec, out_channels=3, upscale=patch)
    if patch % VAE_SPATIAL_FACTOR:
        raise ValueError(f"stage.recon_target=vae_latent: the encoder's patch size {patch} is not a multiple of the "
                         f"VAE's {VAE_SPATIAL_FACTOR} pixels per latent pixel; use recon_target=pixels")
    return dataclasses.replace(dec, out_channels=VAE_LATENT_CHANNELS, upscale=patch // VAE_SPATIAL_FACTOR)


def check_decoder_source(tok: ViQTokenizer, spec: str) -> None:
    """The decoder stage trains codes -> pixels: its init needs an FSQ head and a pixel decoder (an RGB one, or a
    latent one whose adapter starts the RGB decoder)."""
    missing = []
    if tok.head.fsq is None:
        missing.append(f"an FSQ quantizer (its head has quantizer={tok.cfg.head.quantizer!r})")
    if tok.decoder is None:
        missing.append("a pixel decoder (its config has decoder: null)")
    if missing:
        raise ValueError(f"stage.kind=decoder trains the pixel decoder from codes, but {spec!r} lacks "
                         + " and ".join(missing) + ": point stage.init at an fsq (stage 2-2) output")


def _with_siglip2(tok: ViQTokenizer, siglip2_dir: str) -> ViQTokenizer:
    enc = load_siglip2(siglip2_dir)
    if enc.cfg.width != tok.cfg.head.width:
        raise ValueError(f"SigLIP2 width {enc.cfg.width} from model.siglip2={siglip2_dir!r} does not match the "
                         f"ViQ head width {tok.cfg.head.width} of model.tokenizer (pick the preset of that size)")
    return _with_encoder(tok, enc)


def _with_encoder(tok: ViQTokenizer, enc: Encoder) -> ViQTokenizer:
    tok.encoder = enc
    tok.cfg = dataclasses.replace(tok.cfg, encoder=enc.cfg)  # the saved config must describe this tower
    return tok


def load_stage_tokenizer(cfg: RecipeConfig) -> tuple[ViQTokenizer, KeyMapReport, str]:
    """The stage's tokenizer with weights, the key-map report, and what it started from."""
    stage, seed = cfg.stage, cfg.train.seed
    spec = stage.init or cfg.model.tokenizer
    if stage.init and stage.init != cfg.model.tokenizer:
        log.info("stage.init %s replaces model.tokenizer %s", stage.init, cfg.model.tokenizer)
    source = load_viq(spec, seed=seed, what="stage.init" if stage.init else "model.tokenizer")
    if stage.kind == "decoder":
        check_decoder_source(source, spec)
        if source.cfg.decoder.out_channels == 3:
            return source, KeyMapReport(loaded=sorted(source.state_dict())), spec
        # a latent drawer (recon_target=vae_latent upstream): the key map below starts an RGB decoder from it
    if stage.kind == "stage1" and cfg.model.siglip2:
        source = _with_siglip2(source, cfg.model.siglip2)
    if stage.kind == "stage1" and stage.pos_grid is not None:
        # the reference's any-resolution tower: its table resampled once at stage-1 start (SigLIP2-g: 24 -> 128)
        source = _with_encoder(source, resample_position_table(source.encoder, stage.pos_grid))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the re-initialised tensors are part of the recipe
        target = ViQTokenizer(stage_tokenizer_config(source.cfg, stage))
    ignore = () if target.head.fsq is not None else (CODEBOOK_KEY,)
    if not target.cfg.head.headwise_blocks:
        ignore += (HEADWISE_KEYS,)
    report = apply_key_map(target, source.state_dict(), IDENTITY, what=f"stage.init {spec}", ignore=ignore,
                           allow_reshape=True)
    log.info("stage %s: loaded %d tensors from %s; re-initialised (shape changed or absent there): %s; "
             "ignored: %s", stage.kind, len(report.loaded), spec, report.reinitialised or "none",
             report.ignored or "none")
    return target, report, spec


def init_language_side(cfg: RecipeConfig) -> tuple[str, Path | None, Path]:
    """With ``stage.llm_from_init``: (LLM spec, adapter dir or None, visual weights file) of the init stage.

    A stage that trained ``trainable.llm=full`` saved the whole LLM in ``llm/``: that directory is the
    spec. A LoRA stage saved an adapter there: the spec is the adapter's base (``model.llm`` when that was
    a preset) and the adapter is merged into it.
    """
    stage = cfg.stage
    root = Path(stage.init)
    if root.name == VIQ_DIR:
        root = root.parent
    llm_dir, visual = root / LLM_DIR, root / VISUAL_WEIGHTS
    adapter_config = llm_dir / "adapter_config.json"
    if visual.is_file() and (llm_dir / "config.json").is_file():
        return str(llm_dir), None, visual
    if visual.is_file() and adapter_config.is_file():
        # peft records the base as a directory; a base built from a preset is recorded as null
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        return base or cfg.model.llm, llm_dir, visual
    raise ValueError(f"stage.llm_from_init needs stage.init to be a finished LLM stage's output directory "
                     f"(with {LLM_DIR}/ holding a model or an adapter, and {VISUAL_WEIGHTS}); {stage.init!r} "
                     "has neither")


def merge_adapter(llm: nn.Module, adapter_dir: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(llm, str(adapter_dir)).merge_and_unload()


def load_init_projector(model: nn.Module, visual_file: Path) -> int:
    """Copy the init stage's projector into ``model.projector``; returns the number of tensors."""
    from safetensors.torch import load_file

    prefix = "projector."
    state = {k[len(prefix):]: v for k, v in load_file(str(visual_file)).items() if k.startswith(prefix)}
    model.projector.load_state_dict(state, strict=True)
    return len(state)


def dry_run_tokenizer(cfg: RecipeConfig) -> ViQTokenizer:
    """The stage's tokenizer shapes without any weights (model.tokenizer must then be a preset)."""
    if cfg.model.tokenizer not in VIQ_PRESETS:
        raise ValueError(f"a dry run builds model.tokenizer as a preset; {cfg.model.tokenizer!r} is not one of "
                         f"{sorted(VIQ_PRESETS)}")
    return ViQTokenizer(stage_tokenizer_config(preset(cfg.model.tokenizer), cfg.stage))


def load_perceptual(spec: str) -> Callable:
    """``file.py:name`` (a callable ``(pred, target) -> loss``, or an nn.Module class built without
    arguments) or a TorchScript file; frozen. Local files only: nothing is downloaded."""
    file, sep, name = spec.rpartition(":")
    if sep and file.endswith(".py"):
        if not Path(file).is_file():
            raise ValueError(f"stage.perceptual {spec!r}: {file} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"viq_perceptual_{Path(file).stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        fn = getattr(module, name, None)
        if fn is None:
            raise ValueError(f"stage.perceptual {spec!r}: {file} defines no {name!r}")
        fn = fn() if isinstance(fn, type) else fn
    elif Path(spec).is_file():
        fn = torch.jit.load(spec, map_location="cpu")
    else:
        raise ValueError(f"stage.perceptual {spec!r} is neither 'file.py:name' nor a TorchScript file")
    if isinstance(fn, nn.Module):
        fn.requires_grad_(False).eval()
    return fn


def perceptual_term(fn: Callable, preds: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over images of the perceptual loss (the form viq.decoder.reconstruction_loss uses)."""
    return torch.stack([fn(p[None].float(), t[None].float()).mean() for p, t in zip(preds, targets, strict=True)]
                       ).mean()
