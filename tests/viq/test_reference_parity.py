"""viq.convert.load_reference against the ViQ authors' own inference code (fp32, CPU).

Ground truth: shared/fixtures/reference-16k-d2-seed0.npz (see its README): their `forward_indices`,
`IndexEmbeder` and `IndexDrawer` run on weights that shared/tools/reference_weights.py regenerates
(size 16k, trunk depth 2, seed 0). The weights are rebuilt in memory, saved in their file format to a
temporary directory (3 GiB) and loaded from there (memory-mapped), once for the whole module. About
4 GB of RAM and 2 minutes on two CPU cores, plus about 20 s for one picture through the Qwen-Image VAE
(with diffusers installed) and 30 s for the convert-then-reload round trip.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from viq.convert import load_reference, reference
from viq.convert.reference import (
    EXTERNAL,
    convert_reference_main,
    file_names,
    reference_config,
    reference_rules,
    reference_tokenizer,
)
from viq.encoder import cu_from_grids
from viq.image import preprocess
from viq.quantize import FSQ_PRESETS
from viq.tokenizer import Codes, ViQTokenizer
from viq.vae import vae_available

FIXTURE = "reference-16k-d2-seed0.npz"
TOOL = "tools/reference_weights.py"
N_IMAGES = 4
VAE_IMAGE = 3  # the smallest picture, zero-padded: the VAE takes about 15 s per picture on two CPU cores
TOL = 1e-4
MARGIN = 1e-4


def _find_shared() -> Path | None:
    here = Path(__file__).resolve()
    for shared in (here.parents[3] / "shared", here.parents[2] / "shared"):
        if (shared / "fixtures" / FIXTURE).is_file() and (shared / TOOL).is_file():
            return shared
    return None


SHARED = _find_shared()
if SHARED is None:
    pytest.skip("shared/ (fixtures/reference-16k-d2-seed0.npz, tools/reference_weights.py) is not beside "
                "the repository", allow_module_level=True)
DESIGN = SHARED / "design" / "reference-weights.json"


def _weights_module():
    spec = importlib.util.spec_from_file_location("viq_reference_weights", SHARED / TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights_dir():
    """The fixture's weights in the authors' format: <tmp>/converted_16k/{3 files}."""
    mod = _weights_module()
    sds = mod.build(mod.load_spec(str(DESIGN), "16k"), seed=0, depth=2)
    root = Path(tempfile.mkdtemp(prefix="viq-reference-"))
    out = root / "converted_16k"
    out.mkdir()
    for part, name in file_names("16k").items():
        torch.save(sds.pop(part), out / name)
    del sds
    _give_back_memory()
    yield out
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ref():
    with np.load(SHARED / "fixtures" / FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def tok(weights_dir):
    return load_reference(weights_dir)


@pytest.fixture(scope="module")
def encoded(tok, ref):
    """One packed encode of the four images; the trunk output and the FSQ input are captured by hooks."""
    seen = {}
    hooks = [tok.encoder.blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("trunk", out)),
             tok.head.project_in.register_forward_hook(lambda m, a, out: seen.__setitem__("z", out))]
    try:
        codes = tok.encode([torch.from_numpy(ref[f"pixels_{i}"])[0] for i in range(N_IMAGES)])
    finally:
        for h in hooks:
            h.remove()
    n = [c.grid[0] * c.grid[1] for c in codes]
    z = seen["z"].reshape(-1, 5).split([4 * k for k in n])
    return {"codes": codes, "trunk": seen["trunk"].split(n), "z": z}


def _grid(ref, i) -> tuple[int, int]:
    return tuple(int(v) for v in ref["grid_hw"][i])


def _fixture_codes(ref, i) -> Codes:
    return Codes(torch.from_numpy(ref[f"indices_{i}"]).reshape(-1).long(), _grid(ref, i))


@pytest.fixture(scope="module")
def embedded(tok, ref):
    """The embedder's features of the fixture's own indices (not ours)."""
    with torch.no_grad():
        return tok.embed([_fixture_codes(ref, i) for i in range(N_IMAGES)])


def _max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    return (a.float() - torch.from_numpy(b).reshape(a.shape)).abs().max().item()


def test_grids(encoded, ref):
    assert [c.grid for c in encoded["codes"]] == [_grid(ref, i) for i in range(N_IMAGES)]


def test_trunk_output(encoded, ref):
    diffs = [_max_diff(encoded["trunk"][i], ref[f"trunk_out_{i}"]) for i in range(N_IMAGES)]
    assert max(diffs) < TOL, f"trunk max abs diff per image: {diffs}"


def test_fsq_input(encoded, ref):
    diffs = [_max_diff(encoded["z"][i], ref[f"fsq_z_{i}"]) for i in range(N_IMAGES)]
    assert max(diffs) < TOL, f"fsq_z max abs diff per image: {diffs}"


def test_indices(encoded, ref):
    """Exact wherever every FSQ value of the code is at least 1e-4 from a rounding boundary."""
    report = []
    for i, codes in enumerate(encoded["codes"]):
        expected = torch.from_numpy(ref[f"indices_{i}"]).reshape(-1).long()
        safe = torch.from_numpy((ref[f"fsq_margin_{i}"] >= MARGIN).all(-1))
        differ = codes.indices != expected
        report.append((i, int(safe.sum()), int((~safe).sum()), int(differ[safe].sum()),
                       int(differ[~safe].sum())))
    msg = "(image, compared, excluded, mismatches, mismatches among excluded): " + str(report)
    assert [r[2] for r in report] == [2, 1, 4, 3], msg  # the fixture README's count of near-boundary codes
    assert all(r[3] == 0 for r in report), msg


def test_embedder(embedded, ref):
    diffs = [_max_diff(f, ref[f"embed_{i}"]) for i, f in enumerate(embedded)]
    assert max(diffs) < TOL, f"embedder max abs diff per image: {diffs}"


def test_drawer_latents(tok, embedded, ref):
    grids = [_grid(ref, i) for i in range(N_IMAGES)]
    cu, max_len = cu_from_grids(grids, tok.device)
    with torch.no_grad():
        latents = tok.decoder(torch.cat(embedded), grids, cu, max_len)
    assert [tuple(x.shape) for x in latents] == [ref[f"vae_latent_{i}"].shape[1:] for i in range(N_IMAGES)]
    diffs = [_max_diff(x, ref[f"vae_latent_{i}"]) for i, x in enumerate(latents)]
    assert max(diffs) < TOL, f"latent max abs diff per image: {diffs}"


@pytest.mark.skipif(not vae_available(), reason='the Qwen-Image VAE needs diffusers: pip install "viq[reference]"')
def test_vae_decode_reproduces_their_picture(tok, ref):
    """Their drawer's picture from their indices: embedder, drawer, latent rounded to bf16, Qwen-Image VAE,
    truncation to uint8. Float noise moves a few values by 1 (the fixture README allows it)."""
    assert tok.vae is not None  # load_reference loads it by default when diffusers is installed
    (image,) = tok.decode(_fixture_codes(ref, VAE_IMAGE))
    ours, theirs = np.asarray(image).astype(int), ref[f"recon_{VAE_IMAGE}"].astype(int)
    assert ours.shape == theirs.shape == (16 * 11, 16 * 16, 3)  # the padded area included
    diff = np.abs(ours - theirs)
    msg = f"{int((diff > 1).sum())} values off by more than 1, {int((diff == 1).sum())} by 1, of {diff.size}"
    assert (diff > 1).mean() <= 1e-4 and (diff > 0).mean() <= 1e-2, msg


def test_convert_then_reload_encodes_identically(tok, ref, encoded, embedded, weights_dir, tmp_path,
                                                 monkeypatch):
    """`viq convert-reference IN OUT`, then from_pretrained(OUT): same config, tensors, codes and features.
    The conversion gets the module's loaded tokenizer (load_reference is tested above; 3 GB twice is not)."""
    calls = []

    def loaded(path, size=None, *, dtype, vae):
        calls.append((path, size, dtype, vae))
        return tok

    monkeypatch.setattr(reference, "load_reference", loaded)
    out = tmp_path / "viq-16k"
    assert convert_reference_main([str(weights_dir), str(out), "--dtype", "float32"]) == 0
    assert calls == [(str(weights_dir), None, torch.float32, None)]
    again = ViQTokenizer.from_pretrained(out)
    try:
        _check_round_trip(again, tok, ref, encoded, embedded)
    finally:
        del again
        _give_back_memory()


def _give_back_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps freed blocks under 32 MB (most of a 2 GB tokenizer),
    and the next test loading the weights would stack on them (the module must stay under 8 GB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _check_round_trip(again, tok, ref, encoded, embedded) -> None:
    assert again.cfg == tok.cfg and again.cfg.preprocess.mode == "none"
    assert again.cfg.head.rope_angles == tok.cfg.head.rope_angles == "activation"
    state = again.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tok.state_dict().items())
    assert (again.vae is None) == (tok.vae is None)
    if tok.vae is not None:  # OUT/vae/, in diffusers' format
        vae_state = again.vae.state_dict()
        assert all(torch.equal(vae_state[k], v) for k, v in tok.vae.state_dict().items())
    codes = again.encode([torch.from_numpy(ref[f"pixels_{i}"])[0] for i in range(N_IMAGES)])
    for i, (c, expected) in enumerate(zip(codes, encoded["codes"], strict=True)):
        assert c.grid == expected.grid and torch.equal(c.indices, expected.indices), f"image {i}"
    with torch.no_grad():
        feats = again.embed([_fixture_codes(ref, i) for i in range(N_IMAGES)])
    assert all(torch.equal(a, b) for a, b in zip(feats, embedded, strict=True))


def test_preprocessing_reproduces_their_pixels(tok, ref):
    assert str(ref["preprocess_0"]) == "process_image:256"
    x, grid = preprocess(ref["image_0"], patch_size=16, mode="square_crop", area=256 * 256)
    assert grid == (16, 16) and torch.equal(x, torch.from_numpy(ref["pixels_0"])[0])
    assert tok.cfg.preprocess.mode == "none"
    for i in range(1, N_IMAGES):
        assert str(ref[f"preprocess_{i}"]) == "processor"
        pixels = torch.from_numpy(ref[f"pixels_{i}"])[0]
        h, w = pixels.shape[1:]
        (x,) = tok.preprocess([ref[f"image_{i}"]])  # the reference config's own path: mode "none"
        assert torch.equal(x[:, :h, :w], pixels)
        assert not x[:, h:].any() and not x[:, :, w:].any()  # zero padding (mid-grey) to whole patches
        assert tuple(s // 16 for s in x.shape[1:]) == _grid(ref, i)


def test_codebook_is_read_from_the_file(tok):
    codebook = tok.head.embedder.codebook
    assert codebook.shape == (15360, 5)
    values = set(codebook[:, 3].tolist())  # the 6-level dimension holds bf16-rounded thirds
    assert {-1.0, -0.66796875, -0.333984375, 0.0, 0.333984375, 0.66796875} == values


def _fact_modules(entries, pattern):
    regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + r"\.weight")
    return [name[: -len(".weight")] for name, _, _ in entries if regex.fullmatch(name)]


def test_config_matches_module_facts(tok):
    """LayerNorm/GroupNorm eps and affinity, and the exact GELU, as listed in the design JSON."""
    spec = json.loads(DESIGN.read_text())["sizes"]["16k"]["files"]
    rules, own = reference_rules(tok.cfg), dict(tok.named_modules())
    checked = 0
    for part, info in spec.items():
        for desc, patterns in info["module_facts"]["norms"].items():
            kind, eps = desc.split("(")[0], float(re.search(r"eps=([0-9.e-]+)", desc).group(1))
            if "affine=False" in desc:  # no tensors: their LN-trick pre-norm is our head.pre_norm
                assert patterns == ["fusion_block.vq_low_norm_trick_pre_quantize_norm_wo_affine"]
                assert tok.head.pre_norm.eps == eps == tok.cfg.head.aux_norm_eps
                assert not tok.head.pre_norm.elementwise_affine
                continue
            for pattern in patterns:
                found = _fact_modules(info["entries"], pattern)
                targets = [next(filter(None, (r.forward(n + ".weight") for r in rules[part]))) for n in found]
                modules = [own[t[: -len(".weight")]] for t in targets if t[: -len(".weight")] in own]
                assert modules, f"{part}: no module of ours for {pattern}"
                groups = re.search(r"groups=(\d+)", desc)
                for m in modules:
                    assert type(m).__name__ == kind and m.eps == eps, f"{pattern}: {m} vs {desc}"
                    assert groups is None or m.num_groups == int(groups.group(1)), f"{pattern}: {m} vs {desc}"
                checked += len(modules)
    assert checked > 20
    assert all(m.approximate == "none" for m in tok.modules() if isinstance(m, nn.GELU))


@pytest.mark.parametrize("size", sorted(FSQ_PRESETS))
def test_key_map_covers_every_size(tok, size):
    """Every tensor their files hold for a size (names and shapes from the JSON's rules) has a rule
    and lands on a tensor of ours of that shape (blocks beyond our depth-2 trunk skipped)."""
    spec = _weights_module().load_spec(str(DESIGN), size)
    cfg = reference_config(size, depth=2)
    d, k = len(cfg.head.levels), int(np.prod(cfg.head.levels))
    sized = {"head.project_in.weight": (d, 1536), "head.project_in.bias": (d,),
             "head.embedder.project_out.weight": (1536, d), "head.embedder.codebook": (k, d)}
    own = {n: tuple(t.shape) for n, t in tok.state_dict().items()}
    rules, covered = reference_rules(cfg), set()
    for part, info in spec["files"].items():
        for name, shape, _ in info["entries"]:
            if part != "embedder" and EXTERNAL.fullmatch(name):
                continue
            target = next(filter(None, (r.forward(name) for r in rules[part])), None)
            assert target is not None, f"{part}: no rule for {name}"
            if re.match(r"encoder\.blocks\.([2-9]|\d\d)\.", target):
                continue
            assert tuple(shape) == sized.get(target, own.get(target)), f"{part}: {name} -> {target}"
            covered.add(target)
    assert covered == set(own)


@pytest.fixture
def files(weights_dir):
    """The three files, memory-mapped (per test, so the mappings do not outlive it)."""
    return {part: torch.load(weights_dir / name, map_location="cpu", weights_only=True, mmap=True)
            for part, name in file_names("16k").items()}


def _edited(files, part, drop=(), add=None):
    state = {k: v for k, v in files[part].items() if k not in drop}
    state.update(add or {})
    return {**files, part: state}


def test_missing_tensors_are_named(files):
    edited = _edited(files, "model_viq_fsq", drop=["blocks.1.mlp.fc2.bias"])
    edited = _edited(edited, "embedder", drop=["projector_3.2.norm.bias"])
    with pytest.raises(ValueError, match="missing") as err:
        reference_tokenizer(edited, "16k")
    assert "model_viq_fsq_16k.pth: blocks.1.mlp.fc2.bias" in str(err.value)
    assert "embedder.pth: projector_3.2.norm.bias" in str(err.value)


def test_unexpected_tensors_are_named(files):
    edited = _edited(files, "model_viq_fsq", add={"fusion_block.vq_low.extra.weight": torch.zeros(3)})
    edited = _edited(edited, "embedder", add={"vae_head.vae.decoder.conv_in.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="unexpected") as err:
        reference_tokenizer(edited, "16k")
    assert "model_viq_fsq_16k.pth: fusion_block.vq_low.extra.weight" in str(err.value)
    assert "embedder.pth: vae_head.vae.decoder.conv_in.bias" in str(err.value)  # the VAE belongs elsewhere


def test_inconsistent_copy_is_named(files):
    bias = files["index_drawer"]["projector_2.fc2.bias"]
    edited = _edited(files, "index_drawer", add={"projector_2.fc2.bias": bias + 1})
    with pytest.raises(ValueError, match="index_drawer.pth: projector_2.fc2.bias != embedder.pth"):
        reference_tokenizer(edited, "16k")


@pytest.mark.parametrize(("size", "named"), [("64k", "project_in.weight"), ("8k", "ori_codebook.weight")])
def test_wrong_size(files, size, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        reference_tokenizer(files, size)


def test_missing_file_is_named(weights_dir, tmp_path):
    partial = tmp_path / "converted_16k"
    partial.mkdir()
    for name in ("model_viq_fsq_16k.pth", "embedder.pth"):
        (partial / name).symlink_to(weights_dir / name)
    with pytest.raises(ValueError, match="index_drawer.pth is missing"):
        load_reference(tmp_path, "16k")  # the weights root plus the size
    with pytest.raises(ValueError, match="converted_<size>"):
        load_reference(tmp_path)


def test_bfloat16_runs(weights_dir, ref):
    tok16 = load_reference(weights_dir, dtype=torch.bfloat16)
    assert tok16.encoder.pos_embed.dtype == torch.bfloat16 and tok16.head.rope.freqs.dtype == torch.float32
    image = np.ascontiguousarray(ref["image_3"][:40, :56])  # small and unaligned: 3 x 4 patches
    (codes,) = tok16.encode(image)
    assert codes.grid == (3, 4) and codes.indices.numel() == 48
    assert 0 <= int(codes.indices.min()) and int(codes.indices.max()) < 15360
    (feats,) = tok16.embed(codes)
    assert feats.dtype == torch.bfloat16 and feats.shape == (12, 1536) and torch.isfinite(feats).all()
