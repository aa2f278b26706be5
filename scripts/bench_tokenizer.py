"""Tokenizer encode throughput, packed against padded, at mixed native resolutions.

    python scripts/bench_tokenizer.py --preset debug --images 32
    python scripts/bench_tokenizer.py --preset so400m --images 8 --depth 4

Packed: all images in one sequence with block-diagonal attention (what ViQTokenizer.encode does).
Padded: every image's patch sequence zero-padded to the longest one, the way a dense batch runs; the
padding tokens cost the same compute as real ones, which is the waste packing removes.
Prints images/s and patches/s (real patches only) for both, medians over --repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from viq import ViQTokenizer
from viq.config import preset
from viq.encoder import cu_from_grids, patchify

# a LLaVA-like mix of native sizes (H, W) in pixels, multiples of 32
SIZES = [(224, 224), (384, 384), (256, 512), (512, 256), (320, 448), (96, 160), (640, 480), (160, 96)]


def _run(tok, patches, grids, cu, max_len):
    with torch.inference_mode():
        trunk = tok.encoder.forward_packed(patches, grids, cu, max_len)
        tok.head.quantize(trunk, grids, cu, max_len)


def _padded_inputs(patches, grids):
    """Each image padded to the longest sequence: equal segments, padding computed like real tokens."""
    lengths = [h * w for h, w in grids]
    longest = max(lengths)
    parts, out = patches.split(lengths), []
    for p in parts:
        out.append(torch.cat([p, p.new_zeros(longest - len(p), p.shape[1])]))
    # a padded grid with the same patch count keeps the RoPE and position shapes valid
    pgrid = max(grids, key=lambda g: g[0] * g[1])
    pgrids = [pgrid] * len(grids)
    cu, max_len = cu_from_grids(pgrids, patches.device)
    return torch.cat(out), pgrids, cu, max_len


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--depth", type=int, default=None, help="override the trunk depth (CPU-sized runs)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    if args.depth is not None:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, depth=args.depth))
    tok = ViQTokenizer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *SIZES[i % len(SIZES)], generator=g) * 2 - 1 for i in range(args.images)]
    patches, grids = patchify(images, cfg.encoder.patch_size)
    n_real = patches.shape[0]
    variants = {"packed": (patches, grids, *cu_from_grids(grids, "cpu")), "padded": _padded_inputs(patches, grids)}
    times = {k: [] for k in variants}
    _run(tok, *variants["packed"])  # warm-up
    for _ in range(args.repeats):
        for name, inputs in variants.items():  # interleaved so drift hits both alike
            t0 = time.perf_counter()
            _run(tok, *inputs)
            times[name].append(time.perf_counter() - t0)
    print(f"preset={cfg.name} depth={cfg.encoder.depth} images={len(images)} real_patches={n_real} "
          f"threads={torch.get_num_threads()}")
    print("| layout | patches computed | s/batch | images/s | patches/s |")
    print("|---|---|---|---|---|")
    for name, inputs in variants.items():
        t = statistics.median(times[name])
        print(f"| {name} | {inputs[0].shape[0]} | {t:.3f} | {len(images) / t:.1f} | {n_real / t:.0f} |")
    speed = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"packed speed-up over padded: {speed:.2f}x")


if __name__ == "__main__":
    main()
