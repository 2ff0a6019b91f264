"""The benchmark tables that benchmarks/README.md prints from saved runs (pure Python, no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(variant: str, args: dict, **row) -> dict:
    return {"header": "GPU", "args": args, "rows": [dict(variant=variant, **row)]}


def test_bench_model_md_divides_by_the_dense_whole_model_run(monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend("benchmarks")
    import bench_model

    dense_fwd = _run("dense torch.compile", {}, cold_compile_s=73.3, forward_ms=1200.0)
    dense_train = _run("dense torch.compile", {}, train_step_ms=6000.0, train_peak_gib=20.0)
    # A dense regional run comes first but is not the baseline: whole-model dense is.
    regional = _run("dense torch.compile", {"regional": True}, train_step_ms=5000.0)
    vmoba = _run(
        "vmoba optimize", {}, forward_ms=600.0, train_step_ms=3000.0, train_peak_gib=19.0,
        train_density_mean=0.269,
    )  # fmt: skip
    whole = _run("vmoba optimize", {"whole_model": True}, forward_ms=800.0)
    table = bench_model.markdown_table([regional, dense_fwd, dense_train, vmoba, whole])
    lines = table.splitlines()
    assert len(lines) == 2 + 5 and all(line.count("|") == 9 for line in lines)
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert cells["`optimize` (default)"][1:6] == [
        "600 ms (2.00x)", "-", "-", "3,000 ms (2.00x)", "19.00 GiB (-5.0%)",
    ]  # fmt: skip
    assert cells["`optimize` (default)"][-1] == "0.269 |"
    assert cells["`optimize(regional=False)`"][1] == "800 ms (1.50x)"
    assert cells["dense, blocks compiled"][4] == "5,000 ms (1.20x)"
    assert lines[3].split(" | ")[1] == "73.3 s"  # dense's own row: no speedup against itself
    assert lines[3].split(" | ")[2] == "1,200 ms"

    # Another kernel's runs are labelled as such, and a FlashAttention-4 dense run is a row of
    # its own, not the baseline the speedups divide.
    fa4_dense = _run("dense torch.compile", {"dense_attention": "fa4"}, forward_ms=1000.0)
    flash = _run("vmoba optimize", {"kernel": "flash"}, forward_ms=500.0)
    lines = bench_model.markdown_table([fa4_dense, dense_fwd, flash]).splitlines()[2:]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines}
    assert cells["dense `torch.compile`, FlashAttention-4"][1] == "1,000 ms (1.20x)"
    assert cells['`optimize(kernel="flash")`'][1] == "500 ms (2.40x)"

    # The command line reads the saved files.
    paths = []
    for i, run in enumerate([dense_fwd, vmoba]):
        paths.append(str(tmp_path / f"{i}.json"))
        (tmp_path / f"{i}.json").write_text(json.dumps(run))
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_model.py", "--md", *paths],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| `optimize` (default) | - | 600 ms (2.00x) |" in out.stdout


def test_bench_model_density_spy_reads_the_masks_block_density(monkeypatch) -> None:
    """The density bench_model records from a mask's tensors (as the materialize and FA4 ops
    receive them) equals the BlockMask's own share of computed blocks, with and without the
    query-side tables a backward adds."""
    monkeypatch.syspath_prepend("benchmarks")
    import bench_model
    from test_kernels import _masked_inputs

    from vmoba_compile.masks import block_mask_from_pieces

    for backward in (False, True):
        pieces = _masked_inputs(1, backward)[4]
        monkeypatch.setattr(bench_model, "_MASKS", [])
        bench_model._record_density(pieces.tensors())
        want = 1 - block_mask_from_pieces(pieces).sparsity() / 100
        assert abs(bench_model._MASKS[0] - want) < 1e-6 and 0 < want < 1, (backward, want)


def test_bench_model_configs_parse_presets_and_fields(monkeypatch) -> None:
    """``--configs`` entries: a preset and field overrides on top of the run's base, tuples
    written with '/', and a clear exit on two preset names."""
    import pytest

    monkeypatch.syspath_prepend("benchmarks")
    import bench_model

    from vmoba_compile import VMoBAConfig

    got = bench_model.config_of("fast, threshold=0.3", block_size=16, kernel="triton")
    assert got == VMoBAConfig.preset("fast", threshold=0.3, block_size=16, kernel="triton")
    got = bench_model.config_of("schedule=2d/3d,selection=topk,topk=8,chunk_2d=3/4")
    assert got == VMoBAConfig(schedule=("2d", "3d"), selection="topk", topk=8, chunk_2d=(3, 4))
    assert bench_model.config_of("") == VMoBAConfig()
    with pytest.raises(SystemExit, match="two preset names"):
        bench_model.config_of("fast,quality")


def test_bench_model_md_names_the_config_of_each_run(monkeypatch) -> None:
    monkeypatch.syspath_prepend("benchmarks")
    import bench_model

    run = _run("vmoba optimize [fast,threshold=0.3]", {"regional": True}, forward_ms=10.0)
    line = bench_model.markdown_table([run]).splitlines()[2]
    assert "optimize(regional=True, VMoBAConfig.preset('fast'), threshold=0.3)" in line


def test_frontier_joins_speed_runs_with_the_sweeps_by_config(monkeypatch, tmp_path) -> None:
    """A bench_model run's config (short repr) meets the sweep row of the same config (full
    repr with enum reprs), whatever kernel it ran on; a config no sweep ran has no quality."""
    monkeypatch.syspath_prepend("benchmarks/quality")
    import frontier

    sweep = {"rows": [
        {"cfg": "VMoBAConfig(schedule=(<Partition.D2: '2d'>,), threshold=0.25, "
                "scope=<Scope.QUERY: 'query'>, block_size=128)", "psnr_db": 20.3,
         "mean_density": 0.156},
        {"cfg": "VMoBAConfig(threshold=0.6)", "psnr_db": 24.2, "mean_density": 0.41},
    ]}  # fmt: skip
    (tmp_path / "eval_a.json").write_text(json.dumps(sweep))
    runs = [
        _run("dense torch.compile", {}, forward_ms=1000.0),
        _run("dense torch.compile", {"dense_attention": "fa4"}, forward_ms=800.0),
        _run("vmoba optimize [fast]", {}, forward_ms=400.0,
             config="VMoBAConfig(schedule=('2d',), threshold=0.25, kernel='flash')"),
        _run("vmoba optimize [threshold=0.3]", {}, forward_ms=500.0,
             config="VMoBAConfig(threshold=0.3)"),
    ]  # fmt: skip
    lines = frontier.frontier(runs, frontier.quality_rows(str(tmp_path)))
    fast, other = lines[2], lines[3]
    assert "| 2.00x |" in fast and "20.30 (eval_a.json)" in fast and "0.156" in fast
    assert "| 1.60x |" in other and other.endswith("| - | - |")
    pts = frontier.points(runs, frontier.quality_rows(str(tmp_path)))
    assert [round(p["speedup"], 2) for p in pts] == [2.0, 1.6]
    png = tmp_path / "frontier.png"
    assert frontier.plot(pts, str(png), "test") == 1  # only the run a sweep ran has quality
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pytest

    with pytest.raises(ValueError, match="not a VMoBAConfig repr"):
        frontier.config_from_repr("__import__('os')")
    old = [
        _run("dense torch.compile", {}, forward_ms=1000.0),
        _run("vmoba optimize", {}, forward_ms=5.0),
    ]
    with pytest.raises(SystemExit, match="records no config"):
        frontier.points(old, {})
