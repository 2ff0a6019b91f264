"""The demo command (README's main job) and the selection maps it draws."""

from __future__ import annotations

import re
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_models as tm  # noqa: E402
from sdpa_spy import record_sdpa  # noqa: E402

from vmoba_compile import VMoBAConfig, reference_mask  # noqa: E402
from vmoba_compile.adapters import find_adapter  # noqa: E402
from vmoba_compile.diagnostics import selection_maps  # noqa: E402


def test_demo_runs_and_writes_the_png(tmp_path) -> None:
    png = tmp_path / "demo.png"
    cmd = [sys.executable, "-m", "vmoba_compile", "demo", "--lowering", "aot_eager"]
    run = subprocess.run(
        [*cmd, "--png", str(png), "--repeats", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "3 of 6 attention calls rewritten" in out, out
    densities = [float(d) for d in re.findall(r"density (\d\.\d+)", out)]
    assert len(densities) == 3 and all(0 < d < 1 for d in densities), out
    assert re.search(r"relative error 0\.\d+", out)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (3 * 256 + 2 * 6, 256)


def test_selection_maps_equal_the_reference_selection() -> None:
    """Block granularity: the map of each layer is the reference mask of the same q, k."""
    model, args, kwargs = tm.build("cogvideox")
    config = VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 2, 2))
    layers = selection_maps(model, config, *args, **kwargs)
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    listed = adapter.self_attention_modules(model)
    calls = [c for c in record_sdpa(model, args, kwargs) if c.module in listed]
    assert [s.module for s in layers] == [c.module for c in calls] and layers
    for sel, call in zip(layers, calls, strict=True):
        layout = grid.layout_for(call.query_len)
        assert sel.layout == layout
        assert sel.partition == config.partition_for(sel.layer_index).value
        ref = reference_mask(
            call.query, call.key, layout=layout, config=config, layer_index=sel.layer_index
        )
        assert torch.equal(sel.token_map, ref[0, 0])
        assert abs(sel.density - ref.float().mean().item()) < 1e-6
        assert 0 < sel.density < 1


def test_wan_pipeline_example_runs_offline() -> None:
    script = "examples/wan_pipeline.py"
    run = subprocess.run(
        [sys.executable, script, "--lowering", "aot_eager", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 of 6 attention calls rewritten" in run.stdout
    assert "video (1, 9, 3, 64, 96), finite: True" in run.stdout
    assert "step=0" in run.stdout  # the pipeline callback reset the step count after the run
