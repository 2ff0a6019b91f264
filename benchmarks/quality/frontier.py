"""The density/quality/speed frontier as one table (run anywhere, no GPU): each VMoBA run of
``benchmarks/bench_model.py --configs ... --out RUN.json`` joined, by configuration, with the rows
of the quality sweeps (``evaluate.py``'s ``eval*.json``) that ran the same configuration.

Run: ``python benchmarks/quality/frontier.py --runs RUN.json ... --evals
benchmarks/quality/results``.
Speedups divide the fastest dense run's forward time (every ``--runs`` file that holds one) by
each VMoBA run's; a configuration no sweep ran has no quality cells ("-"). ``--plot PNG`` also
draws the frontier: speedup against PSNR from dense samples, one point per configuration and sweep
(needs matplotlib: ``pip install -e .[plots]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re

from vmoba_compile import VMoBAConfig
from vmoba_compile.config import PRESETS


def config_from_repr(text: str) -> VMoBAConfig:
    """A config from the repr a result recorded, either form: the dataclass's full repr with
    enums as ``<Scope.HEAD: 'head'>`` (older sweeps) or the short one
    (``VMoBAConfig(threshold=0.6)``)."""
    if not re.fullmatch(r"VMoBAConfig\(.*\)", text.strip()):
        raise ValueError(f"not a VMoBAConfig repr: {text[:80]!r}")
    plain = re.sub(r"<\w+\.\w+: '([^']*)'>", r"'\1'", text)
    return eval(plain, {"__builtins__": {}, "VMoBAConfig": VMoBAConfig})


def _key(cfg: VMoBAConfig) -> VMoBAConfig:
    """What decides the selection (and so the quality): the kernel and its options do not."""
    return dataclasses.replace(cfg, kernel="auto", kernel_options=None)


def quality_rows(folder: str) -> dict[VMoBAConfig, list[dict]]:
    out: dict[VMoBAConfig, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "eval*.json"), recursive=True)):
        with open(path) as f:
            for row in json.load(f)["rows"]:
                row = dict(row, source=os.path.relpath(path, folder))
                out.setdefault(_key(config_from_repr(row["cfg"])), []).append(row)
    return out


def points(runs: list[dict], quality: dict[VMoBAConfig, list[dict]]) -> list[dict]:
    """One entry per VMoBA run with a forward time: its config, forward time, speedup over the
    fastest dense forward among ``runs``, and the quality rows that ran the same selection."""
    rows = [row for run in runs for row in run["rows"]]
    dense = [
        r["forward_ms"] for r in rows if r["variant"].startswith("dense") and "forward_ms" in r
    ]
    if not dense:
        raise SystemExit("frontier: no dense run with a forward time among --runs")
    out = []
    for r in rows:
        if r["variant"].startswith("dense") or not r.get("forward_ms"):
            continue
        if not r.get("config"):
            raise SystemExit(
                f"frontier: the row {r['variant']!r} records no config (bench_model.py rows "
                "carry one since its --configs option); rerun it with --configs"
            )
        cfg = config_from_repr(r["config"])
        out.append(
            dict(
                cfg=cfg, row=r, speedup=min(dense) / r["forward_ms"],
                quality=quality.get(_key(cfg), []),
            )
        )  # fmt: skip
    return out


def frontier(runs: list[dict], quality: dict[VMoBAConfig, list[dict]]) -> list[str]:
    lines = [
        "| config | forward | speedup over the fastest dense | density (run) "
        "| PSNR vs dense samples (dB), per sweep | density (sweep) |",
        "|---|---|---|---|---|---|",
    ]
    for pt in points(runs, quality):
        cfg, r, hits = pt["cfg"], pt["row"], pt["quality"]
        psnr = " / ".join(f"{h['psnr_db']:.2f} ({h['source']})" for h in hits) or "-"
        dens = " / ".join(f"{h['mean_density']:.3f}" for h in hits) or "-"
        lines.append(
            f"| `{cfg!r}` | {r['forward_ms']:,.0f} ms | {pt['speedup']:.2f}x "
            f"| {r.get('forward_density_mean', '-')} | {psnr} | {dens} |"
        )
    return lines


def plot(pts: list[dict], path: str, title: str) -> int:
    """Speedup (x) against PSNR from dense samples (y), one marker per sweep that ran the point's
    configuration, each point labelled by its preset name where it is one. Returns the points
    drawn; a point no sweep ran is left out (it has no quality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {VMoBAConfig.preset(n): n for n in PRESETS}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors: dict[str, str] = {}
    drawn = 0
    for pt in pts:
        label = names.get(_key(pt["cfg"]), repr(pt["cfg"]).removeprefix("VMoBAConfig"))
        for h in pt["quality"]:
            new = h["source"] not in colors
            color = colors.setdefault(h["source"], f"C{len(colors)}")
            ax.scatter(pt["speedup"], h["psnr_db"], color=color, label=h["source"] if new else None)
            ax.annotate(label, (pt["speedup"], h["psnr_db"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
            drawn += 1
    ax.set_xlabel("forward speedup over the fastest dense run")
    ax.set_ylabel("PSNR of samples vs dense samples (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if colors:
        ax.legend(title="sweep", fontsize=7, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return drawn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", required=True, help="bench_model.py --out files")
    p.add_argument("--evals", required=True, help="folder searched for eval*.json")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the frontier here")
    p.add_argument("--title", default="", help="the plot's title (the runs' GPU, model, grid)")
    args = p.parse_args()
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    quality = quality_rows(args.evals)
    print("\n".join(frontier(runs, quality)))
    if args.plot and not plot(points(runs, quality), args.plot, args.title):
        raise SystemExit("frontier: no run's configuration is in a sweep; nothing to plot")


if __name__ == "__main__":
    main()
