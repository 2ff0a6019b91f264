"""Plots and tables of the quality results (run anywhere, no GPU): loss curves of the dense and
VMoBA training runs, PSNR / recall against block density for every variant of the sweep, and a
strip of frames (dense sample vs VMoBA sample from the same noise).

Run: ``python benchmarks/quality/plots.py RESULTS_DIR`` (the folder with train_dense.jsonl,
train_vmoba.jsonl, eval.json, samples.pt); writes PNGs and summary.md into it. Needs matplotlib
(``pip install -e .[plots]``).
"""

from __future__ import annotations

import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _training_runs(folder: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Per run, its training rows (final validation rows apart) and its final validation."""
    runs, finals = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "train_*.jsonl"))):
        name = os.path.basename(path)[len("train_") : -len(".jsonl")]
        rows = read_jsonl(path)
        if any("loss" in r for r in rows):
            runs[name] = [r for r in rows if "loss" in r]  # final validation rows apart
            done = [r["final_val_loss"] for r in rows if "final_val_loss" in r]
            finals[name] = f"{done[-1]:.5f}" if done else "-"
    return runs, finals


def _run_line(ax, name: str, rows: list[dict], window: tuple[int, int], final: str) -> str:
    """Plot one run's curves on ``ax``; its table line."""
    loss = [r["loss"] for r in rows]
    k = 50
    smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1])
              for i in range(len(loss))]  # fmt: skip
    ax.plot(range(len(loss)), smooth, label=f"{name} train (avg {k})")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", ls="--", label=f"{name} validation")
    steps = sorted(r["step_s"] for r in rows if "val_loss" not in r and r["step"] >= 10)
    mean = sum(loss[window[0] : window[1]]) / (window[1] - window[0])
    tail = val[-5:]
    last = "-"
    if tail:
        last = f"{sum(v for _, v in tail) / len(tail):.4f} ({tail[0][0]}-{tail[-1][0]})"
    return (
        f"| {name} | {len(rows)} | {steps[len(steps) // 2]:.4f} | {rows[0]['step_s']:.1f} "
        f"| {mean:.4f} | {last} | {final} |"
    )


def _final_lines(folder: str) -> list[str]:
    """The table of the exported weights' final validation (``final_val.jsonl``), if any."""
    final = os.path.join(folder, "final_val.jsonl")
    if not os.path.exists(final):
        return []
    lines = [
        "",
        "| weights | attention | steps | final validation loss (16 fixed batches) |",
        "|---|---|---|---|",
    ]
    for r in read_jsonl(final):
        lines.append(
            f"| `{os.path.basename(r['weights'])}` | {r['attention']} | {r['step']} "
            f"| {r['final_val_loss']:.4f} |"
        )
    return lines


def training(folder: str) -> list[str]:
    """Train-loss curves (moving average of 50 steps; the same batches and noise in every run)
    and validation points; a table over the steps every run reached with the final validation
    the run wrote at its end (16 fixed batches), and the final validation of exported weights
    computed apart (``final_val.jsonl``)."""
    runs, finals = _training_runs(folder)
    if not runs:
        return []
    common = min(len(rows) for rows in runs.values())
    window = (max(common - 200, 1), common)  # the last 200 steps every run made
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [
        f"| run | steps run | median step (s), steps >= 10 | first step (s, compile) "
        f"| mean train loss, steps {window[0]}-{window[1] - 1} "
        f"| mean of the last 5 one-batch val losses (steps) | final validation, 16 batches |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in runs.items():
        lines.append(_run_line(ax, name, rows, window, finals[name]))
    lines += _final_lines(folder)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss_curves.png"), dpi=120)
    return lines


def sweep(folder: str) -> list[str]:
    path = os.path.join(folder, "eval.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = json.load(f)["rows"]
    variants: dict[str, list[dict]] = {}
    for r in rows:
        variants.setdefault(r["variant"], []).append(r)
    for metric, label, name in (
        ("psnr_db", "PSNR vs dense samples (dB)", "psnr_vs_density.png"),
        ("mean_recall", "attention recall (dense softmax mass kept)", "recall_vs_density.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant, rs in variants.items():
            rs = sorted(rs, key=lambda r: r["mean_density"])
            ax.plot([r["mean_density"] for r in rs], [r[metric] for r in rs], marker="o",
                    label=variant)  # fmt: skip
        if metric == "psnr_db":
            ax.axhline(28, color="gray", ls="--", lw=1)
            ax.axvline(0.35, color="gray", ls=":", lw=1)
        ax.set_xlabel("mean block density (share of query-key blocks computed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=120)
    lines = [
        "| variant | knob | mean density | PSNR (dB) | SSIM | mean recall | recall per layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rs in variants.items():
        for r in sorted(rs, key=lambda r: r["mean_density"]):
            per = " ".join(f"{v:.3f}" for v in r["recall_per_layer"])
            lines.append(
                f"| {variant} | {r['knob']} | {r['mean_density']:.3f} | {r['psnr_db']:.2f} "
                f"| {r['ssim']:.4f} | {r['mean_recall']:.4f} | {per} |"
            )
    return lines


def frames(folder: str) -> None:
    path = os.path.join(folder, "samples.pt")
    if not os.path.exists(path):
        return
    samples = torch.load(path)
    names = list(samples)
    clip = samples[names[0]]  # [3, F, H, W] uint8
    picks = range(0, clip.shape[1], max(clip.shape[1] // 4, 1))
    fig, axes = plt.subplots(len(names), len(picks), figsize=(2 * len(picks), 2 * len(names)))
    for i, name in enumerate(names):
        for j, f in enumerate(picks):
            ax = axes[i][j]
            ax.imshow(samples[name][:, f].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
            if i == 0:
                ax.set_title(f"frame {f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "samples.png"), dpi=100)


def main() -> None:
    folder = sys.argv[1]
    lines = training(folder)
    lines += [""] + sweep(folder)
    frames(folder)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
