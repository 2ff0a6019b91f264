"""One attention layer at Wan-2.1-1.3B shapes: VMoBA vs dense attention, on a GPU.

Run: ``python benchmarks/bench_attention.py [--grids 24x36x64,...] [--batch 1] [--layers 0,1,2]
[--configs NAME,...] [--sweep] [--jobs 12] [--out FILE] [--md FILE]``. TOKEN granularity's
sorted query rows against the chunk order and cuDNN: ``--grids 24x36x64 --configs
token-thr0.4,token-thr0.4-sorted,token-thr0.25,token-thr0.25-sorted``. ``--sweep`` runs the
token-count sweep (4K to 76K tokens) instead of ``--grids``, ``--md`` appends the table (with
header and command), ``--jobs`` compiles everything first in parallel processes.
Rows are printed as JSON lines as they are measured, so a run cut short still reports.
Each row: median ms (triton.testing.do_bench), speedup over cuDNN SDPA, achieved block density
(query-key block pairs the kernel computes over the block pairs of dense attention on the same
tokens), the flex kernel timed alone on the same
mask, a profile of one forward call (GPU time in the flex kernel and in every other kernel:
permutation, scoring, selection, mask building; the gap between that sum and the wall time is
host time the GPU waited for), and relative error of the output against dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention
from vmoba_compile._compat import compiled_flex_attention
from vmoba_compile.attention import _pairs as runs_as_pairs
from vmoba_compile.attention import kernel_for, kernel_mask, permute, plan_for
from vmoba_compile.config import Kernel
from vmoba_compile.diagnostics import mask_density
from vmoba_compile.kernels import flash_unavailable
from vmoba_compile.masks import plan_index
from vmoba_compile.token_rows import sorted_queries


def header(args) -> str:
    import triton

    sha = (
        os.environ.get("GIT_SHA")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    return (
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
        f"{triton.__version__} | git {sha or '?'} | bf16 | B={args.batch} H={args.heads} "
        f"D=128 | do_bench median, warmup 25 ms, rep 100 ms"
    )


def bench(fn, backward: bool):
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def step():
        out = fn()
        out.backward(grad)

    out = fn()
    grad = torch.randn_like(out)
    return do_bench(step, warmup=25, rep=100, return_mode="median", grad_to_none=None)


def finish(head: str, rows: list[dict], out: str | None) -> None:
    """Print a run's header line and write ``{"header", "rows"}`` to ``out`` (the small
    benchmarks' output; this script's own run writes its table too)."""
    print(head)
    if out:
        with open(out, "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=1)


def gpu_profile(fn, iters: int = 5) -> dict:
    """Per call: GPU time of the flex kernel, GPU time of every other kernel, kernel count, and
    the top non-flex kernels; from torch.profiler's CUDA activity over ``iters`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    flex_us, other, count = 0.0, {}, 0
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us <= 0 or evt.key.startswith(("cudaLaunch", "cuLaunch", "Memset")):
            continue
        count += evt.count
        if "flex_attention" in evt.key or "flash" in evt.key.lower():  # Triton or FA4 kernel
            flex_us += us
        else:
            other[evt.key] = other.get(evt.key, 0.0) + us
    top = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    return dict(
        flex_kernel_ms=flex_us / iters / 1e3,
        other_kernels_ms=sum(other.values()) / iters / 1e3,
        kernels_per_call=count / iters,
        top_other=[(name[:80], round(us / iters / 1e3, 4)) for name, us in top],
    )


CONFIGS = {
    # The library's defaults (threshold 0.4, query scope, chosen by benchmarks/quality), the
    # quality study's head-scope variant, and top-4.
    "block-thr0.4": VMoBAConfig(),
    "block-thr0.4-head": VMoBAConfig(scope="head"),
    "block-topk": VMoBAConfig(selection="topk", topk=4),
    # TOKEN granularity in the padded chunk order (token_order="natural") and with the query
    # rows sorted per head (the default); 0.25 is FastVideo's VMoBA threshold.
    "token-thr0.4": VMoBAConfig(granularity="token", token_order="natural"),
    "token-topk": VMoBAConfig(selection="topk", topk=4, granularity="token", token_order="natural"),
    "token-thr0.4-sorted": VMoBAConfig(granularity="token", token_order="sorted"),
    "token-thr0.25": VMoBAConfig(granularity="token", threshold=0.25, token_order="natural"),
    "token-thr0.25-sorted": VMoBAConfig(granularity="token", threshold=0.25, token_order="sorted"),
    # (query, chunk) pairs merged by log-sum-exp on FA4 (MoBA's formulation)
    "token-thr0.4-pairs": VMoBAConfig(granularity="token", token_order="pairs"),
    "token-thr0.25-pairs": VMoBAConfig(granularity="token", threshold=0.25, token_order="pairs"),
    # The default config on each kernel (the ones above run kernel="auto": FlashAttention-4
    # where it is installed and chosen, vmoba_compile.kernels.choose_kernel).
    "block-thr0.4-triton": VMoBAConfig(kernel="triton"),
    "block-thr0.4-flash": VMoBAConfig(kernel="flash"),
    "token-thr0.4-triton": VMoBAConfig(granularity="token", kernel="triton"),
    "token-thr0.4-flash": VMoBAConfig(granularity="token", kernel="flash"),
}
# FlexAttention kernel options to compare (PyTorch's H100 defaults for bf16, D=128: BLOCK_M 128,
# BLOCK_N 64, 8 warps, 3 stages; ours add CUDA_KERNEL_OPTIONS). Append "+NAME" to a config name:
# block-thr0.4+n128s2.
KERNEL_OPTIONS = {
    "torch": {},  # PyTorch's defaults (the library's CUDA defaults: vmoba_compile.config)
    "n128s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "w4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "tma": dict(USE_TMA=True),
    # forward-only variations on TMA (fwd_ options leave the backward's defaults)
    "tma-pre": dict(USE_TMA=True, PRESCALE_QK=True),
    "tma-n128": dict(USE_TMA=True, fwd_BLOCK_N=128, fwd_num_stages=2),
    "tma-s4": dict(USE_TMA=True, fwd_num_stages=4),
    "tma-safe": dict(USE_TMA=True, ROWS_GUARANTEED_SAFE=True),
}


def config_named(name: str) -> VMoBAConfig:
    """A CONFIGS entry, optionally with "+KERNEL_OPTIONS name" appended."""
    base, _, kopt = name.partition("+")
    cfg = CONFIGS[base]
    return dataclasses.replace(cfg, kernel_options=KERNEL_OPTIONS[kopt]) if kopt else cfg


def pairs_density(qp, kp, plan, cfg, idx) -> float:
    """The block density the pairs formulation computes (:mod:`vmoba_compile.token_pairs`):
    key blocks its gathered query blocks attend over the dense block pairs of the call."""
    from vmoba_compile.attention import _select
    from vmoba_compile.token_pairs import chunk_block_ranges, pair_inputs, pair_rows

    nvb, ntb, bs = plan.num_video_blocks, plan.num_text_blocks, plan.block_size
    b = qp.shape[0]
    key_valid = idx.real.expand(b, -1)
    sel, meta = pair_inputs(_select(qp, kp, plan, cfg, idx)[0], idx.real,
                            chunk_block_ranges(idx.onehot), key_valid, nvb, ntb, bs)  # fmt: skip
    h = sel.shape[1]
    work = 0
    for head in range(h):  # one head at a time: the dense block maps are large
        rows = pair_rows(sel[:, head : head + 1], *meta, nvb, ntb, bs)
        work += int(rows.tables[0].sum() + rows.tables[2].sum())
    return work / (b * h * (nvb + ntb) ** 2)


def op_mask(qp, kp, plan, cfg, idx, q_tables: bool = False):
    """``(q rows, BlockMask)`` as the op hands them to the kernel: for TOKEN granularity with
    ``token_order="sorted"`` the rows sorted per head and the mask built on them."""
    rows, bm = kernel_mask(qp, kp, plan, cfg, idx, q_tables=q_tables)
    return (qp if rows is None else sorted_queries(qp, rows)), bm


SWEEP_GRIDS = "4x32x32,8x32x32,16x32x32,16x40x52,24x36x64,21x45x80"  # 4K ... 76K tokens


def paper_selection(q: torch.Tensor, k: torch.Tensor, plan, threshold: float) -> torch.Tensor:
    """The paper's token-level selection written plainly in PyTorch (for its cost only): mean
    key per chunk, gates of every query token, per-head global threshold by sort + cumsum."""
    b, h, s, d = q.shape
    idx = plan.index(q.device)
    cid = idx.block_chunk[idx.slots // plan.block_size]  # chunk of each token, in call order
    kbar = torch.zeros(b, h, plan.num_chunks, d, device=q.device, dtype=torch.float32)
    kbar.index_add_(2, cid, k.float())
    kbar /= torch.bincount(cid, minlength=plan.num_chunks)[:, None].float()
    gates = q.float() @ kbar.transpose(-1, -2)  # [B, H, S, C]
    flat = gates.flatten(2)
    gn = (flat - flat.amin(-1, keepdim=True)) / (
        flat.amax(-1, keepdim=True) - flat.amin(-1, keepdim=True)
    )
    vals, order = gn.sort(-1, descending=True)
    keep_sorted = (vals.cumsum(-1) / vals.sum(-1, keepdim=True)) <= threshold
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.view_as(gates)


def _bench_layer(q, k, v, layout, cname, cfg, layer, *, flex, timer, base, dense_out, common,
                 compile_only) -> list[dict]:  # fmt: skip
    """The rows of one (config, layer) of :func:`bench_grid`."""
    s, rows = layout.seq_len, []
    torch._dynamo.reset()  # past Dynamo's recompile limit (8) flex would run unfused
    plan = plan_for(layout, cfg, layer)

    def op(q, k, v, cfg=cfg, layer=layer):
        return vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=layer)

    def select_and_mask(cfg=cfg, plan=plan):
        # The op's forward mask, built as the op builds it (cached index tensors, no
        # query-side tables); a BlockMask cannot leave a compiled region, so its index
        # tensors are returned.
        idx = plan_index(plan, q.device)
        qp, kp = permute(q, plan, idx), permute(k, plan, idx)
        bm = op_mask(qp, kp, plan, cfg, idx)[1]
        return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices

    choice = kernel_for(q, v, cfg, layer, backward=False)
    kern, pairs = choice.kernel, runs_as_pairs(cfg, choice)
    tc = time.perf_counter()
    op_c = torch.compile(op, dynamic=False)
    with torch.no_grad():
        qp, kp, vp = (permute(z, plan) for z in (q, k, v))
        idx = plan_index(plan, q.device)
        density = pairs_density(qp, kp, plan, cfg, idx) if pairs else None
        qp, bm = op_mask(qp, kp, plan, cfg, idx)
        density = mask_density(bm, s) if density is None else density
        out = op_c(q, k, v)
        err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
    cold_fwd_s = time.perf_counter() - tc

    def kernel_only(qp=qp, kp=kp, vp=vp, bm=bm, cfg=cfg, kern=kern):
        opts = cfg.flex_kernel_options("cuda", backward=False)  # timed without gradients
        if kern is Kernel.FLASH:
            opts = {"BACKEND": "FLASH"}
        return flex(qp, kp, vp, block_mask=bm, kernel_options=opts)

    # The pairs formulation reads no FlexAttention mask: its kernel and planning run
    # inside its op, timed as a whole.
    kernel_ms = None if pairs else timer(kernel_only, False)
    select_c = torch.compile(select_and_mask, dynamic=False)
    select_ms = None if pairs else timer(select_c, False)
    timed = {bwd: timer(lambda op_c=op_c: op_c(q, k, v), bwd) for bwd in (False, True)}
    if compile_only:
        print(f"compiled {common['grid']} B={common['batch']} {cname} layer {layer}", flush=True)
        return []
    prof = gpu_profile(lambda op_c=op_c: op_c(q, k, v))
    for bwd in (False, True):
        ms = timed[bwd]
        rows.append(
            dict(
                common,
                method=f"vmoba-{cname}-{cfg.partition_for(layer).value}",
                kernel=kernel_for(q, v, cfg, layer, backward=bwd).kernel.value,
                backward=bwd,
                ms=ms,
                density=density,
                speedup=base["cudnn", bwd] / ms if ("cudnn", bwd) in base else None,
                target=1.0 / density,
                err_vs_dense=err,
                kernel_alone_ms=None if bwd else kernel_ms,
                outside_kernel_ms=None if bwd or kernel_ms is None else ms - kernel_ms,
                select_mask_ms=select_ms,
                cold_fwd_compile_s=cold_fwd_s,
                **({} if bwd else prof),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_grid(
    grid: str,
    batch: int,
    configs: dict[str, VMoBAConfig],
    layers: list[int],
    *,
    baselines: bool = True,
    compile_only: bool = False,
    heads: int = 12,
) -> list[dict]:
    """Dense baselines and every (config, layer) of one grid; returns one row per measurement.

    ``compile_only`` runs every compiled function once and times nothing: the warm-up processes
    of ``--jobs`` fill inductor's on-disk caches so that the timed process compiles from them.
    """
    flex = compiled_flex_attention()
    t, y, x = (int(v) for v in grid.split("x"))
    layout = VideoLayout(t, y, x)
    s = layout.seq_len
    q, k, v = (
        torch.randn(batch, heads, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    with torch.no_grad():
        dense_out = F.scaled_dot_product_attention(q, k, v)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def run_once(fn, bwd):
        if not bwd:  # as bench() runs it: an inference call (no query-side tables)
            with torch.no_grad():
                fn()
        else:
            fn().backward(torch.ones_like(q))
        torch.cuda.synchronize()

    timer = (lambda fn, bwd: run_once(fn, bwd)) if compile_only else bench
    rows, base = [], {}
    common = dict(grid=grid, batch=batch, tokens=s, heads=heads)
    if baselines:
        dense_fns = [
            ("cudnn", cudnn),
            ("sdpa-default", lambda: F.scaled_dot_product_attention(q, k, v)),
            ("flex-dense", lambda: flex(q, k, v)),
        ]
        if flash_unavailable() is None:  # FA4 dense, through FlexAttention's FLASH backend
            fa4 = {"BACKEND": "FLASH"}
            dense_fns.append(("fa4-dense", lambda: flex(q, k, v, kernel_options=fa4)))
        for name, fn in dense_fns:
            for bwd in (False, True):
                base[name, bwd] = ms = timer(fn, bwd)
                rows.append(dict(common, method=name, backward=bwd, ms=ms, density=1.0))
                print(json.dumps(rows[-1]), flush=True)
        plan0 = plan_for(layout, CONFIGS["block-thr0.4"], 0)
        with torch.no_grad():
            ms = timer(lambda: paper_selection(q, k, plan0, 0.4), False)
        rows.append(
            dict(common, method="paper-plain-selection (1d, fwd only)", backward=False, ms=ms,
                 density=None)
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    for cname, cfg in configs.items():
        for layer in layers:
            rows += _bench_layer(q, k, v, layout, cname, cfg, layer, flex=flex, timer=timer,
                                 base=base, dense_out=dense_out, common=common,
                                 compile_only=compile_only)  # fmt: skip
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| grid | B | tokens | method | kernel | pass | ms | speedup vs cuDNN | density | 1/d "
        "| flex kernel alone ms | GPU ms in flex / other kernels (kernels per call) "
        "| rel err vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        prof = "-"
        if r.get("flex_kernel_ms") is not None:
            prof = (
                f"{r['flex_kernel_ms']:.2f} / {r['other_kernels_ms']:.3f} "
                f"({r['kernels_per_call']:.0f})"
            )
        cells = [
            r["grid"],
            r.get("batch", 1),
            r["tokens"],
            r["method"],
            r.get("kernel", "-"),
            "fwd+bwd" if r["backward"] else "fwd",
            _fmt(r["ms"], ".2f"),
            _fmt(r.get("speedup"), ".2f"),
            _fmt(r["density"], ".3f"),
            _fmt(r.get("target"), ".2f"),
            _fmt(r.get("kernel_alone_ms"), ".2f"),
            prof,
            _fmt(r.get("err_vs_dense"), ".3f"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def warm_up(grids, batches, configs, layers, jobs: int, heads: int = 12) -> None:
    """Compile every unit of the run in parallel processes (compilation is CPU-bound, so they
    use the host's cores); the timed run then loads the compiled code from the caches.

    Two waves: first one unit per kernel family (grid, batch, granularity, kernel options) and
    the dense baselines, then the rest. Every layer of a family hands FlexAttention inputs of the
    same shapes, so the second wave should find the family's flex kernels in Triton's cache
    (not yet measured); Triton compiling kernels was about 80 of a unit's 97 s on the H100 host
    (compile_profile.py op).
    """
    first, rest, seen = [], [], set()
    for b in batches:
        for g in grids:
            first.append(["--grids", g, "--batch", str(b), "--configs", configs[0], "--layers", ""])
            for c in configs:
                cfg = config_named(c)
                family = (g, b, cfg.granularity, cfg.kernel_options)
                for layer in layers:
                    unit = ["--grids", g, "--batch", str(b), "--configs", c, "--layers",
                            str(layer), "--no-baselines"]  # fmt: skip
                    (rest if family in seen else first).append(unit)
                    seen.add(family)
    t0 = time.perf_counter()

    def one(unit):
        cmd = [sys.executable, __file__, "--compile-only", "--heads", str(heads), *unit]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"warm-up {unit} failed:\n{done.stderr[-2000:]}", flush=True)

    for wave, units in (("first", first), ("second", rest)):
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, units))
        print(
            f"warm-up {wave} wave: {len(units)} units, {time.perf_counter() - t0:.0f} s in all",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grids", default="21x30x52,24x36x64,21x45x80")
    p.add_argument("--sweep", action="store_true", help=f"grids {SWEEP_GRIDS}")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--layers", default="0,1,2", help="layer indices (partitions 1d, 2d, 3d)")
    p.add_argument(
        "--heads", type=int, default=12,
        help="attention heads of 128 (Wan-1.3B: 12, Wan-14B: 40)",
    )  # fmt: skip
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None, help="append the markdown table to this file")
    p.add_argument(
        "--configs",
        default="",
        help="comma-separated names from CONFIGS, each optionally +NAME of KERNEL_OPTIONS",
    )
    p.add_argument(
        "--jobs", type=int, default=1,
        help="compile every measured function first in this many parallel processes (one per "
        "grid, batch, config and layer), filling inductor's caches for the timed run",
    )  # fmt: skip
    p.add_argument(
        "--compile-only", action="store_true",
        help="compile, time nothing (with --jobs: fill the caches for a later timed run)",
    )  # fmt: skip
    p.add_argument("--no-baselines", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    wanted = args.configs.split(",") if args.configs else list(CONFIGS)
    configs = {name: config_named(name) for name in wanted}
    layers = [int(v) for v in args.layers.split(",") if v]
    grids = (SWEEP_GRIDS if args.sweep else args.grids).split(",")
    batches = [int(v) for v in args.batch.split(",")]
    if args.jobs > 1:
        warm_up(grids, batches, wanted, layers, args.jobs, args.heads)
        if args.compile_only:
            return
    if not args.compile_only:
        print(header(args), flush=True)
    rows = []
    for batch in batches:
        for grid in grids:
            rows += bench_grid(
                grid, batch, configs, layers, baselines=not args.no_baselines,
                compile_only=args.compile_only, heads=args.heads,
            )  # fmt: skip
            torch.cuda.empty_cache()
    if args.compile_only:
        return
    print("\n" + table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header=header(args), rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "a") as f:
            command = "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:])
            f.write(f"\n### {header(args)}\n\n`{command}`\n\n{table(rows)}\n")


if __name__ == "__main__":
    sys.exit(main())
