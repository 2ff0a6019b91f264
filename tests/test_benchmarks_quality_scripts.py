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
@pytest.mark.parametrize("float8", ["none", "train"])
def test_bench_model_tiny_reports_both_variants_without_recompiles(tmp_path, float8) -> None:
    """The end-to-end benchmark's CPU smoke run (aot_eager, tiny dims): both variants train,
    the VMoBA one with every layer's call rewritten, neither recompiles across steps, and
    --profile prints the profiler's tables; with --float8 train the blocks' linears are
    torchao's Float8Linear in both variants. (The 2x4x4 grid keeps every chunk, so the rewritten
    calls take the op's dense path: CPU FlexAttention has no backward.)"""
    out = tmp_path / "m.json"
    text = _run(
        "benchmarks/bench_model.py", "--tiny", "--grid", "2x4x4", "--layers", "2", "--steps", "2",
        "--train-steps", "2", "--no-forward", "--profile", "--out", str(out), "--float8", float8,
    )  # fmt: skip
    # Float8Linear's matmuls are aten::_scaled_mm (float8 operands, their scales)
    assert ("aten::_scaled_mm" in text) == (float8 == "train")
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


def test_plots_summary_csv_holds_the_markdown_tables_numbers(tmp_path) -> None:
    """plots.py's summary.csv has one row per training run, exported-weights validation and
    sweep configuration, with the numbers summary.md prints, and the scope each sweep row ran
    with read from its recorded config, not from its name."""
    pytest.importorskip("matplotlib")
    import csv

    steps = [
        {"step": i, "loss": 1.0 / (i + 1), "step_s": 5.0 if i == 0 else 0.1} for i in range(30)
    ]
    (tmp_path / "train_dense.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [*steps, {"step": 30, "final_val_loss": 0.0812}])
    )
    (tmp_path / "final_val.jsonl").write_text(
        json.dumps({"step": 30, "final_val_loss": 0.08, "attention": "vmoba", "weights": "w.pt"})
    )
    row = dict(
        variant="recurrent, head scope", knob=0.4, mean_density=0.266, psnr_db=23.54, ssim=0.8978,
        mean_recall=0.4144, recall_per_layer=[0.4, 0.5],
        cfg="VMoBAConfig(schedule=..., scope=<Scope.QUERY: 'query'>, threshold=0.4)",
    )  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps({"rows": [row]}))
    _run("benchmarks/quality/plots.py", str(tmp_path))
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["train", "final_val", "sweep"], rows
    assert rows[0]["name"] == "dense" and rows[0]["steps"] == "30"
    assert rows[0]["final_val_loss"] == "0.08120" and rows[0]["median_step_s"] == "0.1000"
    assert rows[1]["name"] == "w.pt" and rows[1]["final_val_loss"] == "0.08000"
    assert rows[2]["scope"] == "query" and rows[2]["psnr_db"] == "23.54"
    md = (tmp_path / "summary.md").read_text()
    assert "| 0.266 | 23.54 | 0.8978 | 0.4144 |" in md and "0.08120" in md
    assert (tmp_path / "psnr_vs_density.png").exists()
