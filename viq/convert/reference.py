"""Load the ViQ authors' converted inference weights (``XuminYu/ViQ_weights``) into a ViQTokenizer.

``converted_<size>/`` holds ``model_viq_fsq_<size>.pth`` (fp32: trunk, head, copies of the decode path),
``embedder.pth`` and ``index_drawer.pth`` (bf16: their IndexEmbeder, and it again plus the latent head).
Every tensor has one explicit rule: loaded, or (a copy) checked equal after bf16 rounding to the tensor
loaded, or external: the Qwen-Image VAE (``vae_head.vae.*``), whose decoder half is loaded from the drawer
file into ``ViQTokenizer.vae`` when diffusers is installed (viq.vae; its encoder half is unused).
Anything missing, unexpected, mis-shaped or inconsistent is a ValueError naming file and tensor.
The configuration reproduces their numerics: exact GELU, LayerNorm eps 1e-6 (1e-5 for the affine-free
pre-norm and the residual MLPs), the position table resized bilinearly without antialias, RoPE angles
rounded to the activation dtype, the bf16 codebook from the file, and preprocessing "none" (normalise,
zero-pad to 16 pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.nn import functional as F

from viq.config import DecoderConfig, EncoderConfig, PreprocessConfig, TokenizerConfig, preset
from viq.quantize import FSQ, FSQ_PRESETS
from viq.tokenizer import ViQTokenizer, load_strict, skip_weight_init
from viq.vae import DECODER_PREFIXES, load_qwen_image_vae_decoder, vae_available

log = logging.getLogger(__name__)

WIDTH = 1536
FILES = ("model_viq_fsq", "embedder", "index_drawer")
VAE_PREFIX = "vae_head.vae."
EXTERNAL = re.compile(r"vae_head\.vae\..+")  # the Qwen-Image VAE (model_viq_fsq and index_drawer)
_PRIMARY = (("head.embedder.", "embedder"), ("decoder.", "index_drawer"))
_FIELDS = {
    "i": r"\d+",
    "wb": r"weight|bias",
    "mlp": r"fc[12]\.(?:weight|bias)",
    "block": r"(?:norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(?:weight|bias)",
    "rope": r"(?:norm[12]|attn\.(?:decrease_dim|qkv|proj|increase_dim)|mlp\.fc[12])\.(?:weight|bias)",
    "res": r"(?:norm|mlp\.fc[12])\.(?:weight|bias)",
    "pool": r"latent|(?:q|kv|proj|norm|mlp\.fc[12])\.(?:weight|bias)",
}


class Rule:
    """Their name <-> our name, both written as templates with ``{field}`` placeholders (_FIELDS)."""

    def __init__(self, theirs: str, ours: str):
        self.theirs, self.ours = theirs, ours
        self._theirs_re, self._ours_re = _compile(theirs), _compile(ours)

    def forward(self, key: str) -> str | None:
        m = self._theirs_re.fullmatch(key)
        return self.ours.format(**m.groupdict()) if m else None

    def backward(self, target: str) -> str | None:
        m = self._ours_re.fullmatch(target)
        return self.theirs.format(**m.groupdict()) if m else None


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})"
                              for k, p in enumerate(parts)))


def _levels(size: str) -> tuple[int, ...]:
    if size not in FSQ_PRESETS:
        raise ValueError(f"unknown ViQ size {size!r}; choose one of {sorted(FSQ_PRESETS)}")
    return FSQ_PRESETS[size]


def file_names(size: str) -> dict[str, str]:
    """The file of each part (keys ``FILES``) in a ``converted_<size>`` directory."""
    _levels(size)
    return {"model_viq_fsq": f"model_viq_fsq_{size}.pth", "embedder": "embedder.pth",
            "index_drawer": "index_drawer.pth"}


def reference_config(size: str, depth: int = 40, rope_angles: str = "activation") -> TokenizerConfig:
    """The compatibility configuration of the released tokenizer of a size ("2k" ... "64k")."""
    g = preset("g")
    enc = EncoderConfig(width=WIDTH, depth=depth, num_heads=16, mlp_hidden=4 * WIDTH, patch_size=16,
                        pos_grid=128, gelu="none", norm_eps=1e-6, pos_antialias=False)
    head = dataclasses.replace(g.head, levels=_levels(size), rope_angles=rope_angles)
    dec = DecoderConfig(width=WIDTH, blocks=3, num_heads=16, mlp_hidden=4 * WIDTH, out_channels=16,
                        upscale=2, norm_groups=32, norm_eps=1e-6)
    return TokenizerConfig(name=f"viq-reference-{size}", encoder=enc, head=head, decoder=dec,
                           preprocess=PreprocessConfig(mode="none"))


def reference_rules(cfg: TokenizerConfig) -> dict[str, list[Rule]]:
    """The key map of each file (their name -> our state-dict name)."""
    embedder = [Rule("ori_codebook.weight", "head.embedder.codebook"),
                Rule("projector_1.{wb}", "head.embedder.project_out.{wb}"),
                Rule("projector_2.{mlp}", "head.embedder.merge_mlp.{mlp}"),
                Rule("projector_3.0.{mlp}", "head.embedder.post_mlp.{mlp}"),
                Rule("_weight", "head.embedder.affine_weight"), Rule("_bias", "head.embedder.affine_bias")]
    embedder += [Rule(f"projector_3.{i + 1}.{{res}}", f"head.embedder.post_blocks.{i}.{{res}}")
                 for i in range(cfg.head.post_blocks)]
    drawer = [Rule("vae_preprocess_layers.0.{mlp}", "decoder.adapter_mlp.{mlp}"),
              Rule("vae_preprocess_layers.1.{wb}", "decoder.adapter_norm.{wb}"),
              Rule("vae_head.conv_norm_out.{wb}", "decoder.out_norm.{wb}"),
              Rule("vae_head.conv_out.{wb}", "decoder.out_conv.{wb}")]
    drawer += [Rule(f"vae_preprocess_layers.{i + 2}.{{block}}", f"decoder.blocks.{i}.{{block}}")
               for i in range(cfg.decoder.blocks)]
    fb = "fusion_block."
    trunk = [Rule("pos_embed", "encoder.pos_embed"),
             Rule("patch_embed.proj.{wb}", "encoder.patch_embed.proj.{wb}"),
             Rule("blocks.{i}.{block}", "encoder.blocks.{i}.{block}"), Rule("norm.{wb}", "encoder.norm.{wb}"),
             Rule("attn_pool.{pool}", "encoder.attn_pool.{pool}"),
             Rule(fb + "vq_low_preprocess_layers.{i}.{block}", "head.pre_blocks.{i}.{block}"),
             Rule(fb + "vq_low_pre_token_shuffle_head.{mlp}", "head.expand_mlp.{mlp}"),
             Rule(fb + "vq_low_post_token_shuffle_head.{mlp}", "head.subtoken_mlp.{mlp}"),
             Rule(fb + "vq_low.fsq_pre_attn.{i}.{rope}", "head.rope_blocks.{i}.{rope}"),
             Rule(fb + "vq_low.project_in.{wb}", "head.project_in.{wb}")]
    # the encoder file's copies of the decode path, under their training names
    copies = {"projector_1.": "vq_low.project_out.", "projector_2.": "vq_low_inverse_token_shuffle_head.",
              "projector_3.": "vq_low_postprocess_layers.", "_": "vq_low_norm_trick_post_quantize_affine_"}
    for r in embedder[1:]:
        prefix = next(p for p in copies if r.theirs.startswith(p))
        trunk.append(Rule(fb + copies[prefix] + r.theirs[len(prefix):], r.ours))
    return {"model_viq_fsq": trunk + drawer, "embedder": embedder, "index_drawer": embedder + drawer}


def _forward(rules: list[Rule], key: str) -> str | None:
    return next(filter(None, (r.forward(key) for r in rules)), None)


def _backward(rules: list[Rule], target: str) -> str | None:
    return next(filter(None, (r.backward(target) for r in rules)), None)


def _primary(target: str) -> str:  # the file whose tensor is loaded; the others hold checked copies
    return next((f for prefix, f in _PRIMARY if target.startswith(prefix)), "model_viq_fsq")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"ViQ reference weights: {path} is missing")
    for mmap in (True, False):  # files in torch's legacy (non-zip) format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # noqa: BLE001 - an unreadable file is a user error
            error = err
    raise ValueError(f"cannot read {path}: {error}") from error


def _check_size(files: Mapping[str, Mapping[str, torch.Tensor]], size: str, names: dict[str, str]) -> None:
    """The levels of ``size`` must match project_in and the codebook rows (a file of another size)."""
    levels = _levels(size)
    w = files["model_viq_fsq"].get("fusion_block.vq_low.project_in.weight")
    if w is None or tuple(w.shape) != (len(levels), WIDTH):
        got = "is missing" if w is None else f"has shape {tuple(w.shape)}"
        raise ValueError(f"{names['model_viq_fsq']}: fusion_block.vq_low.project_in.weight {got}, but size "
                         f"{size!r} (levels {levels}) needs ({len(levels)}, {WIDTH})")
    for f in ("embedder", "index_drawer"):
        cb = files[f].get("ori_codebook.weight")
        if cb is not None and tuple(cb.shape) != (math.prod(levels), len(levels)):
            raise ValueError(f"{names[f]}: ori_codebook.weight has shape {tuple(cb.shape)}, but size "
                             f"{size!r} (levels {levels}) needs ({math.prod(levels)}, {len(levels)})")


def _trunk_depth(state: Mapping[str, torch.Tensor], name: str) -> int:
    ids = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"{name}: trunk blocks {sorted(ids)} are not numbered 0..N-1")
    return len(ids)


def _resize_pos_embed(state: Mapping[str, torch.Tensor], grid: int) -> Mapping[str, torch.Tensor]:
    """A raw SigLIP2 24x24 position table -> grid x grid, bicubic, as their loader does."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[1] != 576:
        return state
    table = pos.float().reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    return {**state, "pos_embed": table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)}


def _route(files, rules, names) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """target -> {file: (their name, tensor)}; unknown names raise, external ones are reported."""
    routed: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unexpected, ignored = [], {}
    for f, state in files.items():
        for key, tensor in state.items():
            if f != "embedder" and EXTERNAL.fullmatch(key):
                ignored[f] = ignored.get(f, 0) + 1
                continue
            target = _forward(rules[f], key)
            if target is None:
                unexpected.append(f"{names[f]}: {key}")
            else:
                routed.setdefault(target, {})[f] = (key, tensor)
    if unexpected:
        raise ValueError(f"ViQ reference weights: {len(unexpected)} unexpected tensors: {unexpected[:20]}")
    for f, n in ignored.items():
        log.info("%s: %d tensors of the external Qwen-Image VAE (vae_head.vae.*), not part of the tokenizer "
                 "(the drawer's decoder half becomes ViQTokenizer.vae when vae=True)", names[f], n)
    return routed


def _check_copies(routed, names) -> None:
    """Every copy must equal the tensor that is loaded (its primary file's), after bf16 rounding."""
    differ = []
    for target, sources in routed.items():
        if _primary(target) not in sources:
            continue  # reported as missing by _collect
        key, value = sources[_primary(target)]
        for f, (k, t) in sources.items():
            if t.shape != value.shape or not torch.equal(t.to(torch.bfloat16), value.to(torch.bfloat16)):
                differ.append(f"{names[f]}: {k} != {names[_primary(target)]}: {key}")
    if differ:
        raise ValueError(f"ViQ reference weights: {len(differ)} copies differ from the tensors loaded "
                         f"(after bf16 rounding): {differ[:20]}")


def _collect(routed, rules, names, own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from the routed tensors (each from its primary file); strict both ways."""
    state, missing, shapes = {}, [], []
    for target in own:
        sources = routed.get(target, {})
        expected = {f: s for f in FILES if (s := _backward(rules[f], target)) is not None}
        missing += [f"{names[f]}: {s}" for f, s in expected.items() if f not in sources]
        if not expected:
            missing.append(f"(no rule for {target})")
        if _primary(target) not in sources:
            continue
        key, value = sources[_primary(target)]
        if value.shape != own[target].shape:
            shapes.append(f"{names[_primary(target)]}: {key} {tuple(value.shape)}, {target} needs "
                          f"{tuple(own[target].shape)}")
        state[target] = value
    extra = [f"{names[f]}: {k}" for t, src in routed.items() if t not in own for f, (k, _) in src.items()]
    if missing or extra or shapes:
        raise ValueError(f"ViQ reference weights: missing {missing[:20]}, unexpected {extra[:20]}, "
                         f"shape mismatches {shapes[:20]}")
    return state


def _check_codebook(model: ViQTokenizer, name: str) -> None:
    expected = FSQ(model.cfg.head.levels).implicit_codebook().to(torch.bfloat16)
    if not torch.equal(model.head.embedder.codebook.to(torch.bfloat16), expected):
        raise ValueError(f"{name}: ori_codebook.weight is not the FSQ codebook of levels "
                         f"{model.cfg.head.levels} (a file of another model?)")


def _external(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(VAE_PREFIX):]: v for k, v in state.items() if EXTERNAL.fullmatch(k)}


def _load_vae(files, names, dtype: torch.dtype) -> torch.nn.Module:
    """The drawer file's Qwen-Image VAE decoder (the copy their IndexDrawer decodes with). The encoder
    file's copy of it must be equal after bf16 rounding, like every other copy."""
    drawer, copy = _external(files["index_drawer"]), _external(files["model_viq_fsq"])
    differ = [f"{names['model_viq_fsq']}: {VAE_PREFIX}{k}" for k, t in drawer.items()
              if k.startswith(DECODER_PREFIXES) and (k not in copy or copy[k].shape != t.shape
                                                     or not torch.equal(copy[k].to(torch.bfloat16),
                                                                        t.to(torch.bfloat16)))]
    if differ:
        raise ValueError(f"ViQ reference weights: {len(differ)} tensors of the Qwen-Image VAE decoder are "
                         f"missing or differ from {names['index_drawer']}'s: {differ[:20]}")
    return load_qwen_image_vae_decoder(drawer, dtype=dtype, what=f"{names['index_drawer']}: {VAE_PREFIX}")


def reference_tokenizer(files: Mapping[str, Mapping[str, torch.Tensor]], size: str, *,
                        dtype: torch.dtype = torch.float32, rope_angles: str = "activation",
                        vae: bool | None = None) -> ViQTokenizer:
    """The three files' state dicts (keys ``FILES``) -> a ViQTokenizer in eval mode, strictly.

    ``vae`` (default: whether diffusers is installed) also loads the Qwen-Image VAE decoder that turns the
    drawer's latents into pixels (``ViQTokenizer.vae``, in ``dtype``)."""
    names = file_names(size)
    if set(files) != set(FILES):
        raise ValueError(f"expected the state dicts of {list(FILES)}, got {sorted(files)}")
    _check_size(files, size, names)
    cfg = reference_config(size, _trunk_depth(files["model_viq_fsq"], names["model_viq_fsq"]), rope_angles)
    files = {**files, "model_viq_fsq": _resize_pos_embed(files["model_viq_fsq"], cfg.encoder.pos_grid)}
    rules = reference_rules(cfg)
    routed = _route(files, rules, names)
    _check_copies(routed, names)
    with skip_weight_init():
        model = ViQTokenizer(cfg)
    state = _collect(routed, rules, names, model.state_dict())
    load_strict(model, state, what=f"ViQ reference weights ({size})")
    _check_codebook(model, names["embedder"])
    model = model.to(dtype).eval()
    if vae_available() if vae is None else vae:
        model.vae = _load_vae(files, names, dtype)
    return model


def load_reference(path: str | Path, size: str | None = None, *, dtype: torch.dtype = torch.float32,
                   rope_angles: str = "activation", vae: bool | None = None) -> ViQTokenizer:
    """The authors' converted weights -> ViQTokenizer.

    ``path`` is a ``converted_<size>`` directory (the size is read from its name unless given), or the
    weights root that holds it when ``size`` is given. Files saved on CUDA or in bf16 load on the CPU;
    ``dtype`` is the dtype of the returned model. ``vae``: see ``reference_tokenizer``.
    """
    path = Path(path)
    if size is None:
        m = re.fullmatch(r"converted_(\w+)", path.name)
        if m is None:
            raise ValueError(f"{path} is not a converted_<size> directory; pass size= ('16k', '64k', ...)")
        size = m.group(1)
    elif path.name != f"converted_{size}" and (path / f"converted_{size}").is_dir():
        path = path / f"converted_{size}"
    files = {f: _read(path / n) for f, n in file_names(size).items()}
    return reference_tokenizer(files, size, dtype=dtype, rope_angles=rope_angles, vae=vae)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_reference_main(argv: list[str] | None = None) -> int:
    """``viq convert-reference IN OUT [--size 16k] [--dtype float32] [--no-vae]``: the authors' converted
    weights -> our ``save_pretrained`` directory (``ViQTokenizer.from_pretrained(OUT)`` then encodes
    identically; ``OUT/vae/`` holds the Qwen-Image VAE decoder, in diffusers' format)."""
    p = argparse.ArgumentParser(prog="viq convert-reference", description="Convert the ViQ authors' released "
                                "weights (a converted_<size> directory) into a ViQTokenizer directory.")
    p.add_argument("src", metavar="IN", help="a converted_<size> directory, or the weights root with --size")
    p.add_argument("out", metavar="OUT", help="output directory (our save_pretrained format)")
    p.add_argument("--size", default=None, help="2k, 4k, 8k, 16k or 64k (default: from IN's name)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    p.add_argument("--no-vae", action="store_true", help="leave out the VAE decoder (no pixels from decode)")
    args = p.parse_args(argv)
    vae = False if args.no_vae else None
    if not args.no_vae and not vae_available():
        print('warning: diffusers is not installed, so OUT gets no VAE decoder and decode() cannot make '
              'pixels; pip install "viq[reference]" and convert again to include it', file=sys.stderr)
    try:
        model = load_reference(args.src, args.size, dtype=DTYPES[args.dtype], vae=vae)
    except ValueError as err:  # a user error (missing file, wrong size, foreign tensor): no traceback
        p.exit(2, f"viq convert-reference: error: {err}\n")
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({model.cfg.name}, {args.dtype}, VAE decoder: {model.vae is not None})")
    return 0
