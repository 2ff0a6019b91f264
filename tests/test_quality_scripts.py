"""The quality scripts run end to end at tiny size on CPU (train, resume, evaluate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")


def _run(*args: str) -> str:
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_train_resumes_and_evaluate_reports(tmp_path) -> None:
    ckpt = str(tmp_path / "t.pt")
    first = _run("benchmarks/quality/train.py", "--tiny", "--steps", "2", "--ckpt", ckpt)
    assert [json.loads(line)["step"] for line in first.splitlines()] == [0, 1]
    second = _run("benchmarks/quality/train.py", "--tiny", "--steps", "3", "--ckpt", ckpt)
    assert "resumed from" in second and '"step": 2' in second
    names = "recurrent head thr0.25,recurrent topk2,1d only head thr0.4"
    out = _run(
        "benchmarks/quality/evaluate.py", "--tiny", "--ckpt", ckpt, "--out", str(tmp_path / "q"),
        "--samples", "1", "--steps", "2", "--configs", names,
        "--fixture", str(tmp_path / "q" / "fixture.pt"),
    )  # fmt: skip
    rows = json.loads((tmp_path / "q" / "eval.json").read_text())["rows"]
    assert [r["config"] for r in rows] == names.split(",")
    assert "| recurrent head thr0.25 |" in out
    for r in rows:
        # recall is a float32 share of softmax mass: 1 up to rounding when every block is kept
        assert 0 < r["mean_density"] <= 1 and 0 < r["mean_recall"] <= 1 + 1e-6
        assert len(r["recall_per_layer"]) == len(r["density_per_layer"]) == 2  # tiny: 2 layers
    assert {r["variant"] for r in rows} == {
        "recurrent 1D-2D-3D, head scope, threshold",
        "recurrent 1D-2D-3D, top-k (per query block)",
        "1D only, head scope, threshold",
    }
