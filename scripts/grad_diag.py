"""Where do non-finite gradients come from? (GPU diagnostic for the 55K-token training step.)

Run (GPU, repo root)::

    python scripts/grad_diag.py model --variants dense-ckpt,vmoba-ckpt [--layers 3]
    python scripts/grad_diag.py op [--layers 3]

``model``: the Wan-2.1-1.3B config at ``--layers`` layers, bf16, one training step
(forward, ``out.float().square().mean()``, backward; no optimizer) per variant:
``dense|vmoba|eager`` x ``ckpt|nockpt``, plus ``-inf`` (an inference forward under ``no_grad``
first, as ``bench_model`` does) and ``-nomix`` / ``-mix`` (inductor's mix-order reductions
off / on; torch.compile's default is on, optimize's off);
``eager`` runs the model uncompiled with VMoBA attention (``vmoba_eager``: only flex is
compiled). ``--options a=1,b=false``: inductor options of the compiled variants. For every
variant: the loss, whether the output is finite, the parameters whose gradient is not finite
(grouped by block, with NaN / inf counts), whether those entries sit where they sat in the first
run that had some, the relative difference of each ``scale_shift_table`` gradient from the first
variant's, and against the first variant the cosine
similarity of each block's gradient over the entries finite in both.

``op``: the same model run eagerly with VMoBA attention (``vmoba_eager``; only flex is compiled),
per-layer finiteness of dq / dk / dv (tensor hooks), then each layer's captured q, k, v through
``vmoba_attention`` alone in bf16 and in float32 (same selection: gates are float32 either way),
and random q, k, v of the same shape: output and gradient errors of bf16 against float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_model import TINY, WAN_1_3B, parse_options, wan_inputs  # noqa: E402

import vmoba_compile as vc  # noqa: E402
from vmoba_compile import diagnostics  # noqa: E402


def _model(cfg: dict, device: str, dtype: torch.dtype, ckpt: bool):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(**cfg).to(device, dtype).train()
    if ckpt:
        m.enable_gradient_checkpointing()
    return m


def _block(name: str) -> str:
    hit = re.match(r"blocks\.(\d+)\.", name)
    return f"block{hit.group(1)}" if hit else name.split(".")[0]


def run_model(args, device, dtype, cfg, inputs, lowering) -> None:
    ref = nan_at = None
    for variant in args.variants.split(","):
        kind, ckpt, *extra = variant.split("-")
        torch._dynamo.reset()
        m = _model(cfg, device, dtype, ckpt == "ckpt")
        config = vc.VMoBAConfig(block_size=16) if device == "cpu" else vc.VMoBAConfig()
        options = parse_options(args.options) if args.options else {}
        if "nomix" in extra or "mix" in extra:  # inductor's mix-order reductions off / on
            options["triton.mix_order_reduction"] = "mix" in extra
        opts = {"options": options} if options else {}
        if kind == "dense":
            backend = "aot_eager" if device == "cpu" else "inductor"
            run = torch.compile(m, dynamic=False, backend=backend, **opts)
        elif kind == "eager":  # VMoBA attention, model not compiled (only flex is)

            def run(*a, m=m, config=config, **kw):
                with diagnostics.vmoba_eager(m, config):
                    return m(*a, **kw)

        else:
            run = vc.optimize(m, config, lowering=lowering, **opts)
        t0 = time.perf_counter()
        try:
            if "inf" in extra:
                with torch.no_grad():
                    run(**inputs)
            out = run(**inputs)[0]
            loss = out.float().square().mean()
            loss.backward()
        except Exception:  # an inductor nan_asserts failure names the kernel's buffer
            print(json.dumps({"variant": variant, "error": traceback.format_exc()[-6000:]}))
            continue
        if device == "cuda":
            torch.cuda.synchronize()
        grads = {n: p.grad.float().cpu() for n, p in m.named_parameters() if p.grad is not None}
        bad = [n for n, g in grads.items() if not bool(g.isfinite().all())]
        row = {
            "variant": variant,
            "seconds": round(time.perf_counter() - t0, 1),
            "loss": loss.item(),
            "out_finite": bool(out.isfinite().all()),
            "grads": len(grads),
            "nonfinite_grads": len(bad),
            "nonfinite_by_block": {},
        }
        for n in bad:
            gb = grads[n]
            detail = {
                "shape": list(gb.shape),
                "nan": int(gb.isnan().sum()),
                "inf": int(gb.isinf().sum()),
            }
            if n.endswith(
                "scale_shift_table"
            ):  # shift, scale, gate (attn); shift, scale, gate (ffn)
                detail["chunks_finite"] = [bool(c.isfinite().all()) for c in gb.unbind(-2)]
            row.setdefault("detail", {})[n] = detail
            row["nonfinite_by_block"].setdefault(_block(n), []).append(
                n.split(".", 2)[-1] if n.startswith("blocks.") else n
            )
        if nan_at is None and bad:
            nan_at = {n: grads[n].isnan().nonzero().tolist()[:8] for n in bad}
        elif bad:  # the same entries again? (a race or uninitialized memory moves them)
            row["nan_entries_same_as_first_nonfinite_run"] = all(
                grads[n].isnan().nonzero().tolist()[:8] == at for n, at in nan_at.items()
            ) and set(bad) == set(nan_at)
        if ref is None:
            ref = grads
        else:
            cos = {}
            for n, g in grads.items():
                b = _block(n)
                dot, na, nb = cos.get(b, (0.0, 0.0, 0.0))
                r = ref[n]
                ok = g.isfinite() & r.isfinite()  # cosine over the entries finite in both
                g, r = torch.where(ok, g, 0), torch.where(ok, r, 0)
                cos[b] = (dot + float((g * r).sum()), na + float(g.square().sum()),
                          nb + float(r.square().sum()))  # fmt: skip
            row["modulation_rel_diff_vs_first"] = {
                n: round(float((grads[n] - ref[n]).norm() / ref[n].norm()), 5)
                for n in grads
                if n.endswith("scale_shift_table") and ref[n].isfinite().all()
            }
            row["cos_vs_first"] = {
                b: round(d / math.sqrt(a * c), 4) if a * c > 0 else None
                for b, (d, a, c) in cos.items()
            }
        print(json.dumps(row), flush=True)
        del m, run, out, loss, grads
        if device == "cuda":
            torch.cuda.empty_cache()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / (b.float().norm() + 1e-30))


def _op_grads(q, k, v, gout, layout, config, layer):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = vc.vmoba_attention(q, k, v, layout=layout, config=config, layer_index=layer)
    out.backward(gout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def run_op(args, device, dtype, cfg, inputs) -> None:
    config = vc.VMoBAConfig(block_size=16) if device == "cpu" else vc.VMoBAConfig()
    m = _model(cfg, device, dtype, False)
    seen = []

    def hook_qkv(name):
        def hook(grad):
            seen.append((name, bool(grad.isfinite().all()), float(grad.float().abs().max())))

        return hook

    # Eager model, VMoBA attention; q/k/v of each self-attention call kept and their gradients
    # watched by a mode inside vmoba_eager's, which sees each SDPA call first and hands it on.
    t, h, w = (int(x) for x in args.grid.split("x"))
    layout = vc.VideoLayout(t, h, w)
    captured = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, fargs=(), kwargs=None):
            kwargs = kwargs or {}
            a = {**dict(zip(("query", "key", "value"), fargs, strict=False)), **kwargs}
            q, k, v = (a.get(n) for n in ("query", "key", "value"))
            if (
                func is F.scaled_dot_product_attention
                and q.shape[2] == k.shape[2] == layout.seq_len
            ):
                i = len(captured)
                kw = {"layout": layout, "layer_index": i}
                captured.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), kw))
                for name, x in (("dq", q), ("dk", k), ("dv", v)):
                    if x.requires_grad:
                        x.register_hook(hook_qkv(f"layer{i}.{name}"))
            return func(*fargs, **kwargs)

    with diagnostics.vmoba_eager(m, config), Record():
        out = m(**inputs)[0]
    loss = out.float().square().mean()
    loss.backward()
    bad = [n for n, p in m.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    row = {"eager_model": True, "loss": loss.item(), "out_finite": bool(out.isfinite().all())}
    row.update(nonfinite_params=bad[:20], n_nonfinite=len(bad), qkv_grads=seen)
    print(json.dumps(row), flush=True)
    del m, out, loss
    g = torch.Generator(device=device).manual_seed(1)
    for i, (q, k, v, kw) in enumerate(captured):
        layout, layer = kw["layout"], kw["layer_index"]
        for source in ("captured", "random"):
            if source == "random":
                q, k, v = (torch.randn(x.shape, generator=g, device=device, dtype=dtype)
                           for x in (q, k, v))  # fmt: skip
            gout = torch.randn(q.shape, generator=g, device=device, dtype=torch.float32)
            lo = _op_grads(q, k, v, gout, layout, config, layer)
            hi = _op_grads(q.float(), k.float(), v.float(), gout, layout, config, layer)
            row = {"layer": i, "source": source, "layout": str(layout)}
            for name, a, b in zip(("out", "dq", "dk", "dv"), lo, hi, strict=True):
                row[name] = {
                    "finite": bool(a.isfinite().all()),
                    "ref_finite": bool(b.isfinite().all()),
                    "rel_err": round(_rel(a, b), 5),
                    "absmax": float(a.float().abs().max()),
                }
                if not row[name]["finite"]:
                    bad_rows = (~a.isfinite()).any(-1)  # [B, H, S]
                    row[name]["nonfinite_rows"] = int(bad_rows.sum())
                    row[name]["first_rows"] = bad_rows.nonzero()[:5].tolist()
            print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["model", "op"])
    p.add_argument("--grid", default="24x36x64")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--variants", default="dense-ckpt,vmoba-ckpt")
    p.add_argument("--options", default="", help="inductor options for optimize: a=1,b=false")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny dims, aot_eager)")
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    base = TINY if args.tiny else WAN_1_3B
    cfg = dict(base, num_layers=args.layers)
    inputs = wan_inputs(args.grid, device, dtype, cfg["text_dim"])
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"# {name} | torch {torch.__version__} | grid {args.grid} | layers {args.layers}",
        flush=True,
    )
    if args.mode == "model":
        run_model(args, device, dtype, cfg, inputs, "aot_eager" if args.tiny else "inductor")
    else:
        run_op(args, device, dtype, cfg, inputs)


if __name__ == "__main__":
    main()
