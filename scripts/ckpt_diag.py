"""Why the VMoBA training step is slow under activation checkpointing (GPU diagnostic).

Run (GPU, repo root): ``python scripts/ckpt_diag.py [--layers 3] [--grid 24x36x64]``

For the Wan-2.1-1.3B config at ``--layers`` layers, with and without activation checkpointing:
the training step's time and, for every VMoBA mask built at run time, the mean number of key
blocks per query block in each of its 3-D tables (kv partial, [q partial,] kv full, ..., then the
selection words) as seen by the ``vmoba_compile::materialize`` op (a spy kernel registered for
CUDA records them; that step synchronizes), and the flex kernels' device times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_model import WAN_1_3B, median_ms, wan_inputs  # noqa: E402

import vmoba_compile as vc  # noqa: E402

RECORD: list | None = None


def _spy(xs):
    if RECORD is not None:
        nb = xs[1].shape[-1]
        RECORD.append([nb] + [round(float(t.float().mean()), 2) for t in xs if t.dim() == 3][:5])
    return [x.clone() for x in xs]


def flex_kernel_ms(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if "flex" in e.key and e.device_type.name == "CUDA":
            out[e.key[:90]] = (e.count, round(e.self_device_time_total / 1e3 / e.count, 2))
    return out


def main() -> None:
    global RECORD
    from diffusers import WanTransformer3DModel

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--grid", default="24x36x64")
    p.add_argument("--modes", default="ckpt,nockpt")
    args = p.parse_args()
    torch.library.register_kernel("vmoba_compile::materialize", "cuda", _spy)
    cfg = dict(WAN_1_3B, num_layers=args.layers)
    inputs = wan_inputs(args.grid, "cuda", torch.bfloat16, cfg["text_dim"])
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = WanTransformer3DModel(**cfg).cuda().bfloat16().train()
        if mode == "ckpt":
            m.enable_gradient_checkpointing()
        run = vc.optimize(m)

        def step(run=run):
            out = run(**inputs)[0]
            out.float().square().mean().backward()

        step()
        ms = median_ms(step, "cuda", 3)
        RECORD = []
        step()
        torch.cuda.synchronize()
        masks, RECORD = RECORD, None
        row = dict(mode=mode, layers=args.layers, step_ms=round(ms, 1), masks=masks,
                   flex=flex_kernel_ms(step))  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
