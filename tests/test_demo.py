"""The demo command (README's main job) and the selection maps it draws."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.slow
def test_demo_runs_and_writes_the_png(tmp_path) -> None:
    png = tmp_path / "demo.png"
    cmd = [sys.executable, "-m", "vmoba_compile", "demo", "--lowering", "aot_eager", "--verbose"]
    run = subprocess.run(
        [*cmd, "--png", str(png), "--repeats", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "3 of 6 attention calls rewritten" in out, out
    densities = [float(d) for d in re.findall(r"density (\d\.\d+)", out)]
    assert len(densities) == 3 and all(0 < d < 1 for d in densities), out
    assert re.search(r"relative error 0\.\d+", out)
    # --verbose: what compiles, on stderr (the report on stdout stays the demo's output)
    assert run.stderr.count("[vmoba_compile.regional] compiling block variant") == 3, run.stderr
    assert "partitions 3d, grid 4x8x12" in run.stderr
    width, height = _png_size(png)
    assert width > 2 * height > 400  # three labelled panels side by side


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _block_imports(monkeypatch, *names: str) -> None:
    """Make ``import name`` (and its submodules) fail for this test only."""
    for mod in list(sys.modules):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            monkeypatch.setitem(sys.modules, mod, None)
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)


def test_selection_figure_with_matplotlib_then_pillow_then_text(tmp_path, monkeypatch) -> None:
    """The figure draws each layer in its partition's colour with matplotlib; without it, with
    Pillow; without either, the text summary (one line per layer with its density). The token
    order it draws is chunk by chunk: each chunk's tokens share one chunk coordinate."""
    pytest.importorskip("PIL")
    from PIL import Image

    from vmoba_compile.figure import _COLORS, plot_selection

    model, args, kwargs = tm.build("wan")
    config = VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), threshold=0.25)
    layers = selection_maps(model, config, *args, **kwargs)
    assert [s.partition for s in layers] == ["1d", "2d"]
    lay, two_d = layers[1].layout, layers[1]
    start = 0
    for size in two_d.chunk_sizes:  # 2D chunks of 2x2 tokens
        tokens = two_d.chunk_order[start : start + size]
        h, w = (tokens % (lay.height * lay.width)) // lay.width, tokens % lay.width
        assert len({(int(a) // 2, int(b) // 2) for a, b in zip(h, w, strict=True)}) == 1
        start += size

    def colours(path) -> set[str]:
        rgb = Image.open(path).convert("RGB")
        seen = {c for _, c in rgb.getcolors(maxcolors=rgb.width * rgb.height)}
        return {p for p, c in _COLORS.items() if c in seen}

    drawn = []
    if importlib.util.find_spec("matplotlib") is not None:
        out = plot_selection(layers, tmp_path / "mpl.png", config=config)
        assert out == tmp_path / "mpl.png" and colours(out) == {"1d", "2d"}
        width, height = _png_size(out)
        assert width > 1.5 * height > 450
        drawn.append(out.read_bytes())
    _block_imports(monkeypatch, "matplotlib")
    out = plot_selection(layers, tmp_path / "pil.png", config=config)
    assert out == tmp_path / "pil.png" and colours(out) == {"1d", "2d"}
    assert _png_size(out)[0] > 2 * 256
    assert out.read_bytes() not in drawn  # not the matplotlib figure
    _block_imports(monkeypatch, "PIL")
    out = plot_selection(layers, tmp_path / "none.png", config=config)
    assert out == tmp_path / "none.txt" and not (tmp_path / "none.png").exists()
    text = out.read_text()
    assert "grid 3x4x6" in text and "threshold 0.25" in text
    for sel in layers:
        assert f"layer {sel.layer_index} {sel.partition}" in text
        assert f"density {sel.density:.3f}" in text


def test_selection_maps_equal_the_reference_selection() -> None:
    """Block granularity: the map of each layer is the reference mask of the same q, k."""
    model, args, kwargs = tm.build("cogvideox")
    config = VMoBAConfig(
        block_size=16,
        chunk_1d=(1,),
        chunk_2d=(2, 2),
        chunk_3d=(1, 2, 2),
        threshold=0.25,
        scope="head",
    )  # sparse enough on this tiny grid that every layer drops some blocks
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


@pytest.mark.slow
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


def test_attention_recall_is_the_dense_mass_inside_the_reference_mask() -> None:
    from vmoba_compile import VideoLayout
    from vmoba_compile.diagnostics import attention_recall

    layout = VideoLayout(3, 4, 6, text_tokens=5, text_position="suffix")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, layout.seq_len, 8, generator=g) for _ in range(2))
    k = k[:, :2]  # GQA 4:2
    config = VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 2, 2))
    for layer in range(3):
        got = attention_recall(q, k, layout=layout, config=config, layer_index=layer, rows=7)
        mask = reference_mask(q, k, layout=layout, config=config, layer_index=layer)
        p = torch.softmax(q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)
                          / 8**0.5, dim=-1)  # fmt: skip
        want = float((p * mask).sum() / p.sum())
        assert abs(got - want) < 1e-5, (layer, got, want)
        assert 0 < got < 1
    keep = VMoBAConfig(threshold=1.0, block_size=16, chunk_1d=(1,))
    assert attention_recall(q, k, layout=layout, config=keep, layer_index=0) == 1.0


def test_synthetic_videos_are_seeded_and_move() -> None:
    sys.path.insert(0, "benchmarks/quality")
    from synthetic_video import MOTIONS, make_batch

    a, la = make_batch(3, frames=6, height=16, width=24, seed=7)
    b, lb = make_batch(3, frames=6, height=16, width=24, seed=7)
    c, _ = make_batch(3, frames=6, height=16, width=24, seed=8)
    assert a.shape == (3, 3, 6, 16, 24) and torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert all(0 <= int(v) < len(MOTIONS) for v in la)
    frame_change = (a[:, :, 1:] - a[:, :, :-1]).abs().mean()
    assert frame_change > 1e-3  # objects and camera move


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_vmoba_eager_equals_the_reference_inside_its_block_only(family: str) -> None:
    """Eager VMoBA (used by the quality sweeps) computes what the pass computes (the reference
    model with the same schedule), HunyuanVideo's text key padding included; outside the
    ``with`` block the model is dense again."""
    from test_api import first, reference_forward, sparse_config

    from vmoba_compile.diagnostics import vmoba_eager

    model, args, kwargs = tm.build(family)
    config = sparse_config(family)
    with torch.no_grad():
        dense = first(model(*args, **kwargs))
        with vmoba_eager(model, config):
            out = first(model(*args, **kwargs))
        after = first(model(*args, **kwargs))
        ref = reference_forward(model, args, kwargs, config)
    assert (out.double() - ref.double()).abs().max() < 1e-3
    assert (out - dense).abs().max() > 1e-4, "eager VMoBA left the model dense"
    assert torch.equal(after, dense)


def test_vmoba_eager_refuses_a_checkpointed_training_forward() -> None:
    """With gradient checkpointing the backward recomputes blocks outside the override, which
    torch.utils.checkpoint reports only deep in the backward (CheckpointError): vmoba_eager says
    so at the forward call instead; an inference forward of the same model still runs. (CPU
    FlexAttention has no backward, so training without checkpointing is a GPU matter.)"""
    from test_api import first, sparse_config

    from vmoba_compile.diagnostics import vmoba_eager

    model, args, kwargs = tm.build("wan")
    config = sparse_config("wan")
    model.train()
    model.enable_gradient_checkpointing()
    with vmoba_eager(model, config):
        with torch.no_grad():
            first(model(*args, **kwargs))
        with pytest.raises(RuntimeError, match="disable_gradient_checkpointing"):
            model(*args, **kwargs)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_vmoba_eager_rewrites_exactly_the_calls_the_pass_rewrites(family: str) -> None:
    """One eligibility rule: the calls vmoba_eager runs as VMoBA (and selection_maps draws) are
    the calls the pass's report lists as rewritten, with the same layer indices and layouts
    (HunyuanVideo: its text key-padding mask included)."""
    from unittest import mock

    from test_api import sparse_config

    from vmoba_compile import diagnostics as dg
    from vmoba_compile import explain, optimize

    model, args, kwargs = tm.build(family)
    config = sparse_config(family)
    report = explain(optimize(model, config, lowering="aot_eager"), args, kwargs)
    want = sorted((c.module, c.layer_index) for c in report.rewritten)
    assert want, "the test needs rewritten calls"
    seen = []

    real = dg.vmoba_attention

    def spy(*a, **kw):
        seen.append((kw["layer_index"], kw["layout"], kw["text_key_mask"] is not None))
        return real(*a, **kw)

    with (
        mock.patch.object(dg, "vmoba_attention", spy),
        torch.no_grad(),
        dg.vmoba_eager(model, config),
    ):
        model(*args, **kwargs)
    assert sorted(layer for layer, _, _ in seen) == sorted(layer for _, layer in want)
    drawn = dg.selection_maps(model, config, *args, **kwargs)
    assert sorted((s.module, s.layer_index) for s in drawn) == want
    assert [s.layout for s in drawn] == [layout for _, layout, _ in seen]
    assert any(padded for *_, padded in seen) == (family == "hunyuan_video")
