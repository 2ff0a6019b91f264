"""``python -m vmoba_compile demo``: a small Wan-shaped transformer, optimized, end to end.

Offline (random weights, diffusers' ``WanTransformer3DModel`` class), CPU by default. Prints the
rewrite report, each layer's block density, the output error against the dense model and against
the model run with ``vmoba_reference`` attention, and timings of dense vs optimized; draws the
selected (query, key) pairs of each layer into a PNG (:func:`~vmoba_compile.figure.plot_selection`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from typing import Any, cast

import torch

from .api import optimize
from .config import VMoBAConfig
from .diagnostics import selection_maps
from .figure import plot_selection


def _wan(layers: int, heads: int, head_dim: int, device: str, dtype: torch.dtype):
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("the demo needs diffusers: pip install 'vmoba_compile[models]'") from e
    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=64,
        ffn_dim=4 * heads * head_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=128,
    )
    # cast: mypy does not see diffusers' ModelMixin as an nn.Module
    model = cast(torch.nn.Module, wan).to(device).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def _inputs(grid: tuple[int, int, int], device: str, dtype: torch.dtype) -> dict[str, Any]:
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, t, 2 * h, 2 * w, generator=g).to(device, dtype),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=g).to(device, dtype),
        "return_dict": False,
    }


def _time(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


logger = logging.getLogger(__name__)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def _progress(verbose: bool):
    """With ``--verbose``, vmoba_compile's INFO records (what is compiling) go to stderr while
    the demo runs; the library itself sets no handler or level, so it is quiet by default."""
    if not verbose:
        yield
        return
    log = logging.getLogger("vmoba_compile")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmoba_compile demo", description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--grid", default=None, help="frames x height x width in tokens")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--png", default="vmoba_demo.png")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--lowering",
        default="inductor",
        choices=["inductor", "aot_eager"],
        help="aot_eager skips inductor (seconds instead of a minute on a small CPU)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="log what compiles (blocks, partitions, grid)"
    )
    args = p.parse_args(argv)
    with _progress(args.verbose):
        return _run(p, args)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    gpu = args.device == "cuda"
    grid_text = args.grid or ("16x30x52" if gpu else "4x8x12")
    try:
        grid = tuple(int(v) for v in grid_text.lower().split("x"))
        assert len(grid) == 3 and min(grid) >= 1
    except (ValueError, AssertionError):
        p.error(f"--grid must look like 4x8x12 (frames x height x width tokens); got {grid_text}")
    dtype = torch.bfloat16 if gpu else torch.float32
    block = 128 if gpu else 16
    if gpu:  # chunk shapes picked from the grid
        config = VMoBAConfig(block_size=block)
    else:  # small chunks on the small CPU grid
        config = VMoBAConfig(block_size=block, chunk_1d=(1,), chunk_2d=(4, 4), chunk_3d=(2, 4, 4))

    model = _wan(args.layers, 2 if not gpu else 12, 16 if not gpu else 128, args.device, dtype)
    inputs = _inputs(grid, args.device, dtype)
    print(f"Wan-shaped transformer, {args.layers} layers, grid {grid_text}, {args.device} {dtype}")
    print(f"{config}\n")

    opt = optimize(model, config, lowering=args.lowering)
    logger.info("the dense comparison: torch.compile of the whole model (inductor)")
    dense_model = torch.compile(model, dynamic=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = opt(**inputs)[0]
        compile_s = time.perf_counter() - t0
        dense = dense_model(**inputs)[0]
        opt_ms = _time(lambda: opt(**inputs), args.device, args.repeats)
        dense_ms = _time(lambda: dense_model(**inputs), args.device, args.repeats)
    print(opt.report)
    print(f"\n(first optimized call, compile included: {compile_s:.1f} s)")

    layers = selection_maps(model, config, **inputs)
    print("\nper-layer selection (share of query-key pairs computed):")
    for sel in layers:
        print(
            f"  layer {sel.layer_index} {sel.partition}  {sel.module:16}  density {sel.density:.3f}"
        )
    print(
        f"\noutput vs dense model: relative error {_rel(out, dense):.4f} "
        f"(the price of skipping {1 - sum(s.density for s in layers) / len(layers):.0%} of the "
        f"attention pairs)"
    )
    print(
        f"timing (median of {args.repeats}): dense compiled {dense_ms:.1f} ms, "
        f"VMoBA {opt_ms:.1f} ms"
    )
    if not gpu:
        print("  (CPU timings say nothing about GPU speed; run --device cuda on a GPU)")
    written = plot_selection(layers, args.png, config=config)
    if written.suffix == ".png":
        print(f"\nwrote {written}: one panel per layer, rows = query tokens, columns = key tokens")
    else:
        print(f"\nwrote {written} (install matplotlib or Pillow for the picture)")
    return 0
