"""Plots and tables of the quality results (run anywhere, no GPU): loss curves of the dense and
VMoBA training runs, PSNR / recall against block density for every variant of the sweep, and a
strip of frames (dense sample vs VMoBA sample from the same noise).

Run: ``python benchmarks/quality/plots.py RESULTS_DIR`` (the folder with train_*.jsonl,
final_val.jsonl, eval*.json, samples.pt); writes PNGs, summary.md and summary.csv into it (the
CSV: one row per training run, exported-weights validation and sweep configuration, the numbers
of summary.md's tables). Needs matplotlib (``pip install -e .[plots]``).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

CSV_COLUMNS = (
    "kind", "source", "name", "knob", "scope", "steps", "median_step_s", "first_step_s",
    "mean_train_loss", "final_val_loss", "mean_density", "psnr_db", "ssim", "mean_recall",
)  # fmt: skip


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_runs(folder: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Returns the training runs of ``folder`` by name (their step rows, without the final
    validation rows) and, by name, the last final validation loss each run wrote (``"-"``
    when none)."""
    runs, finals = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "train_*.jsonl"))):
        name = os.path.basename(path)[len("train_") : -len(".jsonl")]
        rows = read_jsonl(path)
        if any("loss" in r for r in rows):
            runs[name] = [r for r in rows if "loss" in r]
            done = [r["final_val_loss"] for r in rows if "final_val_loss" in r]
            finals[name] = f"{done[-1]:.5f}" if done else "-"
    return runs, finals


def _moving_average(values: list[float], k: int) -> list[float]:
    """Returns the mean of each value with up to ``k - 1`` values before it."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
            for i in range(len(values))]  # fmt: skip


def _plot_run(ax, name: str, rows: list[dict]) -> list[tuple[int, float]]:
    """Draws the run's smoothed train loss and its validation points on ``ax``; returns the
    validation points as ``(step, val_loss)``."""
    loss = [r["loss"] for r in rows]
    k = 50
    ax.plot(range(len(loss)), _moving_average(loss, k), label=f"{name} train (avg {k})")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", ls="--", label=f"{name} validation")
    return val


def _last_validations(val: list[tuple[int, float]]) -> str:
    """Returns the mean of the last 5 validation losses with their steps, ``"-"`` if none."""
    tail = val[-5:]
    if not tail:
        return "-"
    return f"{sum(v for _, v in tail) / len(tail):.4f} ({tail[0][0]}-{tail[-1][0]})"


def _run_row(
    name: str, rows: list[dict], val: list[tuple[int, float]], window: tuple[int, int], final: str
) -> tuple[str, dict]:
    """Returns the markdown line and the CSV row of one training run: steps run, median step
    time from step 10, first step time, mean train loss over ``window``, the last validations
    and the final validation ``final``."""
    loss = [r["loss"] for r in rows]
    steps = sorted(r["step_s"] for r in rows if "val_loss" not in r and r["step"] >= 10)
    mean = sum(loss[window[0] : window[1]]) / (window[1] - window[0])
    line = (
        f"| {name} | {len(rows)} | {steps[len(steps) // 2]:.4f} | {rows[0]['step_s']:.1f} "
        f"| {mean:.4f} | {_last_validations(val)} | {final} |"
    )
    row = dict(kind="train", source=f"train_{name}.jsonl", name=name, steps=len(rows),
               median_step_s=f"{steps[len(steps) // 2]:.4f}",
               first_step_s=f"{rows[0]['step_s']:.1f}", mean_train_loss=f"{mean:.4f}",
               final_val_loss="" if final == "-" else final)  # fmt: skip
    return line, row


def _exported_validation(folder: str, table: list[dict]) -> list[str]:
    """Returns a markdown table per ``final_val*.jsonl`` of ``folder`` (the final validation of
    exported weights); their rows are appended to ``table``."""
    lines: list[str] = []
    for final in sorted(glob.glob(os.path.join(folder, "final_val*.jsonl"))):
        lines += [
            "",
            "| weights | attention | steps | final validation loss (16 fixed batches) |",
            "|---|---|---|---|",
        ]
        for r in read_jsonl(final):
            lines.append(
                f"| `{os.path.basename(r['weights'])}` | {r['attention']} | {r['step']} "
                f"| {r['final_val_loss']:.4f} |"
            )
            table.append(
                dict(kind="final_val", source=os.path.basename(final),
                     name=os.path.basename(r["weights"]), knob=r["attention"], steps=r["step"],
                     final_val_loss=f"{r['final_val_loss']:.5f}")
            )  # fmt: skip
    return lines


def _save_loss_plot(fig, ax, folder: str) -> None:
    """Labels the loss-curve axes and writes ``loss_curves.png`` into ``folder``."""
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss_curves.png"), dpi=120)


def training(folder: str, table: list[dict]) -> list[str]:
    """Train-loss curves (moving average of 50 steps; the same batches and noise in every run)
    and validation points; a table over the steps every run reached with the final validation
    the run wrote at its end (16 fixed batches), and the final validation of exported weights
    computed apart (``final_val.jsonl``); their rows are appended to ``table``."""
    runs, finals = _read_runs(folder)
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
        val = _plot_run(ax, name, rows)
        line, row = _run_row(name, rows, val, window, finals[name])
        lines.append(line)
        table.append(row)
    lines += _exported_validation(folder, table)
    _save_loss_plot(fig, ax, folder)
    return lines


def sweep(folder: str, table: list[dict]) -> list[str]:
    """PSNR and recall against density for every variant of ``eval.json`` (the plots), and a
    table of every ``eval*.json`` of the folder; its rows are appended to ``table``."""
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(folder, "eval*.json"))):
        with open(path) as f:
            rows = json.load(f)["rows"]
        variants: dict[str, list[dict]] = {}
        for r in rows:
            variants.setdefault(r["variant"], []).append(r)
        if os.path.basename(path) == "eval.json":
            plot_sweep(folder, variants)
        lines += [""] if lines else []
        lines += [
            f"`{os.path.basename(path)}`:",
            "",
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
                table.append(
                    dict(kind="sweep", source=os.path.basename(path), name=variant,
                         knob=r["knob"], scope=_scope(r.get("cfg", "")),
                         mean_density=f"{r['mean_density']:.3f}",
                         psnr_db=f"{r['psnr_db']:.2f}", ssim=f"{r['ssim']:.4f}",
                         mean_recall=f"{r['mean_recall']:.4f}")
                )  # fmt: skip
    return lines


def _scope(cfg: str) -> str:
    """The scope the row ran with, from its recorded config (``repr(VMoBAConfig)``, either
    form), not from its name: a sweep's names once said "head" for query-scope rows."""
    found = re.search(r"scope=(?:<Scope\.(\w+)|'(\w+)')", cfg)
    return (found.group(1) or found.group(2)).lower() if found else ""


def plot_sweep(folder: str, variants: dict[str, list[dict]]) -> None:
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
    table: list[dict] = []
    lines = training(folder, table)
    lines += [""] + sweep(folder, table)
    frames(folder)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
