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


@pytest.mark.slow
def test_train_resumes_and_evaluate_reports(tmp_path) -> None:
    ckpt, export = str(tmp_path / "t.pt"), str(tmp_path / "w.pt")
    tiny = ("benchmarks/quality/train.py", "--tiny", "--final-val-batches", "2", "--export", export)
    first = [json.loads(line) for line in _run(*tiny, "--steps", "2", "--ckpt", ckpt).splitlines()]
    assert [r["step"] for r in first] == [0, 1, 2]  # two steps, then the final validation
    second = _run(*tiny, "--steps", "3", "--ckpt", ckpt)
    assert "resumed from" in second and '"step": 2' in second
    final = json.loads(second.splitlines()[-1])
    assert final["step"] == 3 and final["final_val_batches"] == 2
    # The exported weights, evaluated alone, give the run's final validation loss: the number
    # that compares runs is a function of the weights, not of the run's state.
    again = json.loads(_run(*tiny[:4], "--eval-weights", export).splitlines()[-1])
    assert again["step"] == 3 and again["final_val_loss"] == pytest.approx(final["final_val_loss"])
    first_loss = first[-1]["final_val_loss"]
    assert first_loss != pytest.approx(final["final_val_loss"])  # a training step changed it
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


@pytest.mark.slow
def test_bench_model_tiny_reports_both_variants_without_recompiles(tmp_path) -> None:
    """The end-to-end benchmark's CPU smoke run (aot_eager, tiny dims): both variants train,
    the VMoBA one with every layer's call rewritten, neither recompiles across steps, and
    --profile prints the profiler's tables. (The 2x4x4 grid keeps every chunk, so the rewritten
    calls take the op's dense path: CPU FlexAttention has no backward.)"""
    out = tmp_path / "m.json"
    text = _run(
        "benchmarks/bench_model.py", "--tiny", "--grid", "2x4x4", "--layers", "2", "--steps", "2",
        "--train-steps", "2", "--no-forward", "--profile", "--out", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense torch.compile", "vmoba optimize"]
    assert all(r["train_recompiles"] == 0 and r["train_step_ms"] > 0 for r in rows)
    assert "cold_compile_s" not in rows[0]  # --no-forward: no inference compile
    assert rows[1]["rewritten_calls"] == 2
    assert text.count("-- one training step, by self_cpu_time_total") == 2


def test_every_sweep_config_has_the_settings_its_name_says(monkeypatch) -> None:
    """The evaluation's names are what the README's tables print: each must be set explicitly,
    not inherited from defaults that later change (the default scope became "query" and turned
    the "head" rows into query-scope rows)."""
    monkeypatch.syspath_prepend("benchmarks/quality")
    import evaluate

    from vmoba_compile.config import Granularity, Scope, Selection

    for name, (_, knob, cfg) in evaluate.configs(tiny=False).items():
        words = name.split()
        if name.startswith("recurrent"):
            assert [p.value for p in cfg.schedule] == ["1d", "2d", "3d"], name
        else:
            assert [p.value for p in cfg.schedule] == [words[0]], name
        if "topk" in name:
            assert cfg.selection is Selection.TOPK and cfg.topk == knob, name
            continue
        assert cfg.selection is Selection.THRESHOLD and cfg.threshold == knob, name
        assert cfg.scope is (Scope.QUERY if "query" in words else Scope.HEAD), name
        token = "token" in words
        assert cfg.granularity is (Granularity.TOKEN if token else Granularity.BLOCK), name
