"""Where cold compile time goes, on a GPU: one scenario per process, fresh caches each.

Run (GPU machine, repo root): ``python benchmarks/compile_profile.py SCENARIO [--layer N]``
with SCENARIO one of

- ``flex``: ``torch.compile(flex_attention)`` forward + backward at Wan-1.3B shapes on the
  24x36x64 grid, with a mask_mod that reads a captured selection table as ours does (the cost of
  one flex kernel pair, without our selection);
- ``op``: ``torch.compile(vmoba_attention)`` forward + backward, one layer;
- ``op3``: one compiled function that runs the op for layers 0, 1 and 2 (1D, 2D, 3D) in turn:
  whether the three partitions share their flex kernels;
- ``dit-vmoba`` / ``dit-dense``: one training step (forward, backward) of the quality study's
  6-layer video DiT (16K tokens) through ``optimize`` / dense ``torch.compile``.

Prints one JSON line (also when ``timeout`` cuts the run with SIGTERM): wall seconds of the
first call (compile included), Dynamo's compile-time breakdown (largest entries), and the Triton
kernels compiled (``*.cubin`` files in a fresh ``TRITON_CACHE_DIR``), flex templates among them by
name. ``--cprofile FILE`` also writes the first call's cProfile stats.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import json
import os
import signal
import sys
import tempfile
import time

# Fresh caches for this process (its environment, set before torch is imported): a cold compile.
_TMP = tempfile.mkdtemp(prefix="vmoba_compile_profile_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_TMP, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_TMP, "triton")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality"))

GRID = (24, 36, 64)


def _qkv(s: int, heads: int = 12, dim: int = 128):
    return [
        torch.randn(1, heads, s, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    ]


def scenario_flex(args):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = GRID[0] * GRID[1] * GRID[2]
    nb = s // 128
    table = torch.rand(1, 12, nb, 146, device="cuda") < 0.25
    col = torch.arange(s, device="cuda") // 128 % 146

    def mask_mod(b, h, q, kv):
        return table[b, h, q // 128, col[kv]]

    bm = create_block_mask(mask_mod, 1, 12, s, s, device="cuda", _compile=True)
    q, k, v = _qkv(s)
    f = torch.compile(flex_attention, dynamic=False)
    return lambda: f(q, k, v, block_mask=bm)


def _op(layers):
    from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention

    layout, cfg = VideoLayout(*GRID), VMoBAConfig()
    q, k, v = _qkv(layout.seq_len)

    def run(q, k, v):
        out = q
        for layer in layers:
            out = vmoba_attention(out, k, v, layout=layout, config=cfg, layer_index=layer)
        return out

    f = torch.compile(run, dynamic=False)
    return lambda: f(q, k, v)


def scenario_dit(args, vmoba: bool):
    from train import VideoDiT

    import vmoba_compile as vc

    torch.manual_seed(0)
    model = VideoDiT(heads=4, head_dim=64, layers=args.layers, patch=4).to("cuda", torch.bfloat16)
    net = vc.optimize(model.net) if vmoba else torch.compile(model.net, dynamic=False)
    x = torch.randn(4, 3, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(4, device="cuda")
    labels = torch.arange(4, device="cuda")
    return lambda: model(x, t, labels, net=net)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["flex", "op", "op3", "dit-vmoba", "dit-dense"])
    p.add_argument("--layer", type=int, default=1, help="op: the layer index")
    p.add_argument("--layers", type=int, default=6, help="dit-*: transformer blocks")
    p.add_argument("--cprofile", default=None, help="write cProfile stats of the first call here")
    args = p.parse_args()
    make = {
        "flex": scenario_flex,
        "op": lambda a: _op([a.layer]),
        "op3": lambda a: _op([0, 1, 2]),
        "dit-vmoba": lambda a: scenario_dit(a, True),
        "dit-dense": lambda a: scenario_dit(a, False),
    }[args.scenario]
    fn = make(args)

    def on_term(signum, frame):  # `timeout` cut the compile: report what was measured so far
        raise TimeoutError("cut by SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    prof = cProfile.Profile() if args.cprofile else None
    first = second = None
    t0 = time.perf_counter()
    try:
        if prof:
            prof.enable()
        out = fn()
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if prof:
            prof.disable()
        t0 = time.perf_counter()
        out = fn()
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        second = time.perf_counter() - t0
    except TimeoutError:
        print(f"cut after {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(args.cprofile)
        report(args, first, second)


def report(args, first, second) -> None:
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    times = sorted(zip(names, values, strict=True), key=lambda kv: -float(kv[1]))
    triton_dir = os.environ["TRITON_CACHE_DIR"]
    cubins = glob.glob(os.path.join(triton_dir, "**", "*.cubin"), recursive=True)
    kernels = sorted(os.path.basename(c)[: -len(".cubin")] for c in cubins)
    print(
        json.dumps(
            dict(
                scenario=args.scenario,
                layer=args.layer,
                layers=args.layers,
                first_call_s=None if first is None else round(first, 1),
                second_call_s=None if second is None else round(second, 3),
                compile_times=[(n, round(float(v), 1)) for n, v in times[:18]],
                triton_kernels=len(kernels),
                flex_kernels=[k for k in kernels if "flex" in k or "tem_" in k],
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
