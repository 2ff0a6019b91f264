"""How far do_bench's time of one flex call lies from the kernel's own GPU time, and why.

``bench_attention.py`` reports the op and the kernel alone by ``triton.testing.do_bench``
(median, L2 flushed by a 256 MB memset before every call) and the kernels of one call by
torch.profiler (five calls back to back, no flush). The ninth session's 1D row mixed the two: op
11.13 ms by do_bench against 10.29 ms of flex kernel and 0.26 ms of other kernels by the
profiler, 0.58 ms "between kernels". This times the same calls every way, in one process:

- ``do_bench``: as the benchmarks (flush before each call, median);
- ``events``: a CUDA event pair around each call, no flush, median;
- ``events+flush``: the same with do_bench's flush before each call;
- ``profiler``: the kernels' GPU time per call over 5 and over 50 back-to-back calls, and over 20
  calls with the flush between them.

for the default config's layer 0 (1D, no permutation) at 55,296 tokens: the flex kernel with the
op's own mask (``kernel``) and the whole compiled op (``op``).
Run (GPU): ``python benchmarks/timer_check.py [--grid 24x36x64] [--out F.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_attention import bench, finish
from torch.profiler import ProfilerActivity, profile

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention
from vmoba_compile._compat import compiled_flex_attention
from vmoba_compile.attention import permute, plan_blocks, plan_for


def flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")


def events(fn, iters: int, flush: torch.Tensor | None) -> float:
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def profiled(fn, iters: int, flush: torch.Tensor | None) -> dict:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            if flush is not None:
                flush.zero_()
            fn()
        torch.cuda.synchronize()
    flex, other = 0.0, 0.0
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us <= 0 or evt.key.startswith(("cudaLaunch", "cuLaunch", "Memset")):
            continue
        if "flex_attention" in evt.key:
            flex += us
        elif not (flush is not None and "fill" in evt.key.lower()):
            other += us
    return {"flex_kernel_ms": flex / iters / 1e3, "other_kernels_ms": other / iters / 1e3}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", default="24x36x64")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    t, y, x = (int(v) for v in args.grid.split("x"))
    layout, cfg = VideoLayout(t, y, x), VMoBAConfig()
    q, k, v = (
        torch.randn(1, 12, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    plan = plan_for(layout, cfg, args.layer)
    flex = compiled_flex_attention()
    opts = cfg.flex_kernel_options("cuda", backward=False)
    op = torch.compile(
        lambda q, k, v: vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=args.layer),
        dynamic=False,
    )
    rows = []
    with torch.no_grad():
        qp, kp, vp = (permute(z, plan) for z in (q, k, v))
        bm = plan_blocks(qp, kp, plan, cfg, q_tables=False).block_mask
        fns = {
            "kernel": lambda: flex(qp, kp, vp, block_mask=bm, kernel_options=opts),
            "op": lambda: op(q, k, v),
        }
        flush = flush_buffer()
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            row = {
                "what": name,
                "do_bench_ms": bench(fn, False),
                "events_ms": events(fn, 50, None),
                "events_flush_ms": events(fn, 50, flush),
                "profiler_5": profiled(fn, 5, None),
                "profiler_50": profiled(fn, 50, None),
                "profiler_flush_20": profiled(fn, 20, flush),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = (
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | grid {args.grid} "
        f"layer {args.layer} ({cfg.partition_for(args.layer).value})"
    )
    finish(head, rows, args.out)


if __name__ == "__main__":
    main()
