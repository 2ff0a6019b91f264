"""TOKEN granularity's work without a GPU: token density against the kernel's block density, with
the query rows in the padded chunk order (natural) and sorted by selection (``token_order``).

Run: ``python benchmarks/token_density.py [--grid 24x36x64] [--heads 12] [--dim 128]
[--thresholds 0.4,0.25] [--layers 0,1,2] [--inputs random,smooth] [--md FILE]``. CPU is enough:
selection and block tables only, no attention. Each row: partition, inputs, threshold, token
density, block density (video block pairs computed over all of them) and the share of computed
blocks that are full (no ``mask_mod``), natural and sorted.

Inputs: ``random`` (independent Gaussian q and k, no locality: the worst case) and ``smooth``
(q and k share a smooth random field per head and channel, coarse Gaussian noise trilinearly
upsampled over the grid, plus independent noise: nearby tokens agree, as in video features).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from vmoba_compile import VideoLayout, VMoBAConfig
from vmoba_compile.diagnostics import token_block_density


def qk_inputs(kind: str, layout: VideoLayout, heads: int, dim: int, seed: int = 0):
    """``q, k`` of ``[1, heads, S, dim]``, float32 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    s = layout.seq_len
    noise = [torch.randn(1, heads, s, dim, generator=g) for _ in range(2)]
    if kind == "random":
        return noise[0], noise[1]
    t, y, x = layout.frames, layout.height, layout.width
    coarse_grid = (max(t // 4, 1), max(y // 6, 1), max(x // 8, 1))
    coarse = torch.randn(1, heads * dim, *coarse_grid, generator=g)
    field = F.interpolate(coarse, size=(t, y, x), mode="trilinear", align_corners=False)
    field = field / field.std()
    base = field.reshape(heads, dim, t * y * x).transpose(1, 2)[None]  # [1, H, N, D]
    q, k = (base + 0.5 * n for n in noise)
    return q, k


def rows(args) -> list[dict]:
    t, y, x = (int(v) for v in args.grid.split("x"))
    layout = VideoLayout(t, y, x)
    out = []
    for kind in args.inputs.split(","):
        q, k = qk_inputs(kind, layout, args.heads, args.dim)
        for thr in (float(v) for v in args.thresholds.split(",")):
            cfg = VMoBAConfig(granularity="token", threshold=thr)
            for layer in (int(v) for v in args.layers.split(",")):
                t0 = time.perf_counter()
                d = token_block_density(q, k, layout=layout, config=cfg, layer_index=layer)
                row = dict(inputs=kind, threshold=thr, partition=cfg.partition_for(layer).value,
                           **d, seconds=time.perf_counter() - t0)  # fmt: skip
                print(row, flush=True)
                out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| partition | q/k | threshold | token density | block density natural | sorted "
        "| full share natural | sorted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['partition']} | {r['inputs']} | {r['threshold']} | {r['token']:.3f} "
            f"| {r['block_natural']:.3f} | {r['block_sorted']:.3f} | {r['full_natural']:.3f} "
            f"| {r['full_sorted']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="24x36x64")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--thresholds", default="0.4,0.25")
    p.add_argument("--layers", default="0,1,2", help="layer indices (partitions 1d, 2d, 3d)")
    p.add_argument("--inputs", default="smooth,random")
    p.add_argument("--md", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    text = table(rows(args))
    print("\n" + text)
    if args.md:
        with open(args.md, "a") as f:
            command = "python benchmarks/token_density.py " + " ".join(sys.argv[1:])
            f.write(f"\n`{command}`\n\n{text}\n")


if __name__ == "__main__":
    sys.exit(main())
