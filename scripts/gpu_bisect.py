"""Find which compiled stage of the op faults on the GPU; one stage per process (faults are sticky).

Usage: python scripts/gpu_bisect.py            # runs every stage in a subprocess, prints a table
       python scripts/gpu_bisect.py STAGE TEXT # one stage
"""

import os
import subprocess
import sys

import torch

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention
from vmoba_compile._compat import plan_index
from vmoba_compile.attention import permute, plan_blocks, plan_for

DEVICE = os.environ.get("DEVICE", "cuda")
OUT = os.environ.get("OUT", ".")
STAGES = ["index", "permute", "blocks", "fwd", "fwdbwd"]


def stage(name: str, text: int) -> None:
    if os.environ.get("NO_MATERIALIZE") == "1":  # variant: mask_mod captures left fusable
        import vmoba_compile.masks as masks

        masks.materialize_for_mask_mod = lambda *xs: list(xs)
    layout = VideoLayout(8, 16, 16, text_tokens=text, text_position="prefix")
    cfg = VMoBAConfig(block_size=128, chunk_1d=(2,), chunk_2d=(4, 4), chunk_3d=(2, 4, 8))
    plan = plan_for(layout, cfg, 0)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(2, 4, layout.seq_len, 64, device=DEVICE, generator=g) for _ in range(3))

    def f_index(q):
        idx = plan_index(plan, q.device)
        return idx.token + 0, idx.slots + 0

    def f_permute(q):
        return permute(q, plan)

    def f_blocks(q, k):
        idx = plan_index(plan, q.device)
        qp, kp = permute(q, plan, idx), permute(k, plan, idx)
        bm = plan_blocks(qp, kp, plan, cfg, idx=idx).block_mask
        return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices

    def f_fwd(q, k, v):
        return vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=0)

    fns = {"index": (f_index, (q,)), "permute": (f_permute, (q,)), "blocks": (f_blocks, (q, k))}
    fns["fwd"] = fns["fwdbwd"] = (f_fwd, (q, k, v))
    fn, args = fns[name]
    if name == "fwdbwd":
        args = tuple(a.clone().requires_grad_() for a in args)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    out = compiled(*args)
    if name == "fwdbwd":
        out.sum().backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    eager = fn(*(a.detach() for a in args))
    outs = out if isinstance(out, tuple) else (out,)
    eagers = eager if isinstance(eager, tuple) else (eager,)
    worst = max(
        (o.double() - e.double()).abs().max().item() for o, e in zip(outs, eagers, strict=True)
    )
    print(f"RESULT {name} text={text}: ran, max |compiled - eager| = {worst:.3g}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        stage(sys.argv[1], int(sys.argv[2]))
        sys.exit(0)
    stages = os.environ.get("STAGES", ",".join(STAGES)).split(",")
    for text in [int(t) for t in os.environ.get("TEXTS", "77").split(",")]:
        for name in stages:
            r = subprocess.run(
                [sys.executable, __file__, name, str(text)],
                capture_output=True,
                text=True,
                timeout=240,
            )
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
            err = [ln for ln in r.stderr.splitlines() if "Error" in ln or "error" in ln][-2:]
            kernels = [ln.strip() for ln in r.stderr.splitlines() if "triton_" in ln][-2:]
            tag = "no-materialize " if os.environ.get("NO_MATERIALIZE") == "1" else ""
            print(
                f"{tag}{lines[0]}"
                if lines
                else f"{tag}FAIL {name} text={text} rc={r.returncode}: {err} kernels: {kernels}"
            )
            sys.stdout.flush()
            with open(
                f"{sys.argv[1] if len(sys.argv) == 2 else '.'}/bisect_{name}_{text}.log", "w"
            ) as f:
                f.write(r.stdout + "\n----- stderr\n" + r.stderr)
