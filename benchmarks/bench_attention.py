"""One attention layer at Wan-2.1-1.3B shapes: VMoBA vs dense attention, on a GPU.

Run: ``python benchmarks/bench_attention.py [--grids 24x36x64,...] [--batch 1] [--out FILE]``.
Each row: median ms (triton.testing.do_bench), speedup over cuDNN SDPA, achieved block density
(fraction of query-key block pairs the kernel computes), time outside the attention kernel
(permutation, scoring, selection, mask building), and relative error of the output against dense.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention
from vmoba_compile.attention import permute, plan_blocks, plan_for, unpermute


def header(args) -> str:
    import triton

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return (
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
        f"{triton.__version__} | git {sha.stdout.strip() or '?'} | bf16 | B={args.batch} H=12 D=128 "
        f"| do_bench median, warmup 25 ms, rep 100 ms"
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grids", default="21x30x52,24x36x64,21x45x80")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--configs", default="")
    args = p.parse_args()
    print(header(args), flush=True)
    dev = "cuda"
    configs = {
        "block-topk": VMoBAConfig(selection="topk", topk=4, scope="query"),
        "block-thr0.25-head": VMoBAConfig(selection="threshold", threshold=0.25, scope="head"),
        "token-topk": VMoBAConfig(selection="topk", topk=4, granularity="token"),
    }
    configs = {
        k: v for k, v in configs.items() if not args.configs or k in args.configs.split(",")
    }
    def flex_c(*a, **kw):
        return torch.compile(flex_attention, dynamic=False)(*a, **kw)

    rows = []
    for g in args.grids.split(","):
        t, y, x = (int(v) for v in g.split("x"))
        layout = VideoLayout(t, y, x)
        s = layout.seq_len
        q, k, v = (
            torch.randn(
                args.batch, 12, s, 128, device=dev, dtype=torch.bfloat16, requires_grad=True
            )
            for _ in range(3)
        )
        with torch.no_grad():
            dense_out = F.scaled_dot_product_attention(q, k, v)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        base = {}
        for name, fn in [
            ("cudnn", cudnn),
            ("sdpa-default", lambda: F.scaled_dot_product_attention(q, k, v)),
            ("flex-dense", lambda: flex_c(q, k, v)),
        ]:
            for bwd in (False, True):
                ms = bench(fn, bwd)
                base.setdefault(name, {})[bwd] = ms
                rows.append(dict(grid=g, tokens=s, method=name, backward=bwd, ms=ms, density=1.0))
        for cname, cfg in configs.items():
            for layer in range(3):
                torch._dynamo.reset()  # fresh caches: never hit the recompile limit (trap 7)
                part = cfg.partition_for(layer).value
                fn_c = torch.compile(
                    lambda q, k, v, cfg=cfg, layer=layer: vmoba_attention(
                        q, k, v, layout=layout, config=cfg, layer_index=layer
                    ),
                    dynamic=False,
                )
                plan = plan_for(layout, cfg, layer)

                def sel_only(cfg=cfg, plan=plan):
                    qp, kp = permute(q, plan), permute(k, plan)
                    return plan_blocks(qp, kp, plan, cfg).block_mask

                def sel_tensors(sel_only=sel_only):
                    bm = sel_only()
                    return bm.kv_indices, bm.full_kv_indices, bm.q_indices, bm.full_q_indices

                sel_c = torch.compile(sel_tensors, dynamic=False)
                with torch.no_grad():
                    bm = sel_only()  # eager (a BlockMask cannot leave a compiled region)
                    density = float(bm.to_dense().float().mean())
                    out = fn_c(q, k, v)
                    err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
                    qp, kp, vp = permute(q, plan), permute(k, plan), permute(v, plan)
                kernel_ms = bench(
                    lambda bm=bm, qp=qp, kp=kp, vp=vp: flex_c(qp, kp, vp, block_mask=bm), False
                )
                over_ms = bench(sel_c, False)
                for bwd in (False, True):
                    ms = bench(lambda fn_c=fn_c: fn_c(q, k, v), bwd)
                    rows.append(
                        dict(
                            grid=g,
                            tokens=s,
                            method=f"vmoba-{cname}-{part}",
                            backward=bwd,
                            ms=ms,
                            density=density,
                            speedup=base["cudnn"][bwd] / ms,
                            target=0.75 / density,
                            err_vs_dense=err,
                            outside_kernel_ms=(ms - kernel_ms) if not bwd else None,
                            select_mask_ms=over_ms,
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    print(
        "\n| grid | tokens | method | pass | ms | speedup vs cuDNN | density | 0.75/d | outside kernel ms | rel err vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r.get("speedup")
        print(
            f"| {r['grid']} | {r['tokens']} | {r['method']} | {'fwd+bwd' if r['backward'] else 'fwd'} "
            f"| {r['ms']:.2f} | {sp and f'{sp:.2f}x' or '-'} | {r['density']:.3f} "
            f"| {r.get('target') and f'{r['target']:.2f}x' or '-'} "
            f"| {r.get('outside_kernel_ms') is not None and f'{r['outside_kernel_ms']:.2f}' or '-'} "
            f"| {r.get('err_vs_dense') is not None and f'{r['err_vs_dense']:.3f}' or '-'} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header=header(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
