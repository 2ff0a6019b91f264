"""Training-free quality of VMoBA on a trained checkpoint of ``train.py``.

For each configuration of a sweep (threshold and top-k): samples from the same noise and labels
with dense attention and with ``optimize(model)``; PSNR and SSIM of the VMoBA samples against the
dense ones; per-layer attention recall (dense softmax mass inside the selection) and block density
on the dense model's q/k at a mid-noise input. Writes a markdown table and JSON.

Run: ``python benchmarks/quality/evaluate.py --ckpt dense.pt --out benchmarks/quality/results``
Smoke (CPU): ``python benchmarks/quality/evaluate.py --tiny --ckpt /tmp/t.pt --out /tmp/q``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_video import MOTIONS, make_batch  # noqa: E402
from train import VideoDiT  # noqa: E402

import vmoba_compile as vc  # noqa: E402
from vmoba_compile.diagnostics import attention_recall, capture_attention, selection_maps  # noqa: E402


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - ref.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM over frames and channels (11x11 Gaussian window, sigma 1.5), videos in [-1, 1]."""
    b, c, f, h, w = x.shape
    a = ((x.float() + 1) / 2).permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    r = ((ref.float() + 1) / 2).permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    size = min(11, h, w)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    win = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(z):
        return F.conv2d(z, win)

    mu_a, mu_r = blur(a), blur(r)
    var_a = blur(a * a) - mu_a**2
    var_r = blur(r * r) - mu_r**2
    cov = blur(a * r) - mu_a * mu_r
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2)
    )
    return s.mean().item()


@torch.no_grad()
def sample(net_call, classes, noise, labels, steps: int) -> torch.Tensor:
    """Euler integration of the flow from t = 1 (noise) to t = 0."""
    x = noise.clone()
    ts = torch.linspace(1, 0, steps + 1)
    text = classes(labels)[:, None, :]
    for i in range(steps):
        t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
        v = net_call(x, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
        x = x - (ts[i] - ts[i + 1]).item() * v
    return x


def configs(tiny: bool) -> dict[str, vc.VMoBAConfig]:
    block = 16 if tiny else 128
    out = {
        f"threshold {t}": vc.VMoBAConfig(threshold=t, block_size=block) for t in (0.15, 0.25, 0.4)
    }
    out.update(
        {f"topk {k}": vc.VMoBAConfig(selection="topk", topk=k, block_size=block) for k in (2, 4)}
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--out", required=True, help="folder for results.md / results.json")
    p.add_argument("--configs", default="", help="comma-separated names (default: all)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    sweep = configs(args.tiny)
    if args.configs:
        sweep = {name: sweep[name] for name in args.configs.split(",")}

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    state = torch.load(args.ckpt, map_location=device)
    targs = state["args"]
    model = VideoDiT(**state["config"]).to(device, dtype).eval()
    model.load_state_dict(state["model"])
    height, width = (16, 24) if targs["tiny"] else (int(v) for v in targs["size"].split("x"))
    frames = 4 if targs["tiny"] else targs["frames"]
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(args.samples, 3, frames, height, width, generator=g).to(device, dtype)
    labels = (torch.arange(args.samples) % len(MOTIONS)).to(device)

    dense_net = model.net if args.tiny else torch.compile(model.net, dynamic=False)
    dense = sample(dense_net, model.classes, noise, labels, args.steps)
    # q/k of the dense model at a mid-noise input, for recall and density
    x0, _ = make_batch(1, frames, height, width, seed=99)
    x_mid = 0.5 * x0.to(device, dtype) + 0.5 * noise[:1]
    text = model.classes(labels[:1])[:, None, :]
    captured = capture_attention(
        model.net, x_mid, timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=text, return_dict=False,
    )  # fmt: skip

    rows = []
    lowering = "aot_eager" if args.tiny else "inductor"
    for name, cfg in sweep.items():
        opt = vc.optimize(model.net, cfg, lowering=lowering)
        out = sample(opt, model.classes, noise, labels, args.steps)
        recall = [
            attention_recall(c.q, c.k, layout=c.layout, config=cfg, layer_index=c.layer_index)
            for c in captured
        ]
        density = [
            s.density
            for s in selection_maps(
                model.net, cfg, x_mid, timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=text, return_dict=False,
            )
        ]  # fmt: skip
        rows.append(
            dict(
                config=name,
                psnr_db=psnr(out, dense),
                ssim=ssim(out, dense),
                mean_density=sum(density) / len(density),
                mean_recall=sum(recall) / len(recall),
                recall_per_layer=recall,
                density_per_layer=density,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        torch._dynamo.reset()  # every config compiles the same code: stay off the recompile limit

    os.makedirs(args.out, exist_ok=True)
    lines = [
        f"checkpoint {args.ckpt} (step {state['step']}), {args.samples} samples, "
        f"{args.steps} Euler steps, grid {frames}x{height}x{width} pixels",
        "",
        "| config | PSNR vs dense (dB) | SSIM | mean block density | mean recall |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['config']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['mean_density']:.3f} "
        f"| {r['mean_recall']:.4f} |"
        for r in rows
    ]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
