"""The density/quality/speed frontier as one table (run anywhere, no GPU): each VMoBA run of
``benchmarks/bench_model.py --configs ... --out RUN.json`` joined, by configuration, with the rows
of the quality sweeps (``evaluate.py``'s ``eval*.json``) that ran the same configuration.

Run: ``python benchmarks/quality/frontier.py --runs RUN.json ... --evals
benchmarks/quality/results``.
Speedups divide the fastest dense run's forward time (every ``--runs`` file that holds one) by
each VMoBA run's; a configuration no sweep ran has no quality cells ("-").
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re

from vmoba_compile import VMoBAConfig


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


def frontier(runs: list[dict], quality: dict[VMoBAConfig, list[dict]]) -> list[str]:
    rows = [row for run in runs for row in run["rows"]]
    dense = [
        r["forward_ms"] for r in rows if r["variant"].startswith("dense") and "forward_ms" in r
    ]
    if not dense:
        raise SystemExit("frontier: no dense run with a forward time among --runs")
    lines = [
        "| config | forward | speedup over the fastest dense | density (run) "
        "| PSNR vs dense samples (dB), per sweep | density (sweep) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["variant"].startswith("dense") or not r.get("forward_ms"):
            continue
        cfg = config_from_repr(r["config"])
        hits = quality.get(_key(cfg), [])
        psnr = " / ".join(f"{h['psnr_db']:.2f} ({h['source']})" for h in hits) or "-"
        dens = " / ".join(f"{h['mean_density']:.3f}" for h in hits) or "-"
        lines.append(
            f"| `{cfg!r}` | {r['forward_ms']:,.0f} ms | {min(dense) / r['forward_ms']:.2f}x "
            f"| {r.get('forward_density_mean', '-')} | {psnr} | {dens} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", required=True, help="bench_model.py --out files")
    p.add_argument("--evals", required=True, help="folder searched for eval*.json")
    args = p.parse_args()
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    print("\n".join(frontier(runs, quality_rows(args.evals))))


if __name__ == "__main__":
    main()
