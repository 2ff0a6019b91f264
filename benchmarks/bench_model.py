"""A Wan-2.1-1.3B-config transformer end to end: ``optimize(model)`` vs dense ``torch.compile``.

Run (GPU): ``python benchmarks/bench_model.py [--grid 24x36x64] [--layers 30] [--steps 20]
[--train-steps 5] [--variant dense|vmoba|both] [--regional | --whole-model] [--profile]``
(one variant per process, so each compiles cold and measures its own peak memory; training uses
activation checkpointing, as 55K-token training does in practice).
Smoke (CPU, tiny): ``python benchmarks/bench_model.py --tiny``
Table of saved runs (``--out`` files): ``python benchmarks/bench_model.py --md a.json b.json``

For each of dense (``torch.compile(model, dynamic=False)``) and VMoBA (``optimize(model)``, which
compiles this model block by block by default):
cold compile time (first call), inference forward latency (median), training step latency
(forward, backward, AdamW; median), peak memory of each, and the number of graphs Dynamo compiled
over ``--steps`` steps after the first (0 = no recompiles). Random weights, bf16 on GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import time
from collections.abc import Iterator

import torch

import vmoba_compile as vc
from vmoba_compile.api import safe_inductor_defaults

WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
    eps=1e-6,
)
# Wan 2.1 14B (its diffusers config): 40 heads x 128, 40 layers; random weights.
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
PRESETS = {"1.3b": WAN_1_3B, "14b": WAN_14B}
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64)


def header(device: str) -> str:
    sha = (
        os.environ.get("GIT_SHA")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    return f"{name} | torch {torch.__version__} | triton {tv} | git {sha or '?'}"


def parse_options(text: str) -> dict:
    """``"a=1,b.c=false"`` -> ``{"a": 1, "b.c": False}`` (inductor options)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        low = value.strip().lower()
        out[key.strip()] = {"true": True, "false": False}.get(
            low, int(low) if low.lstrip("-").isdigit() else value
        )
    return out


def _field_value(text: str) -> object:
    """One ``--configs`` value: ``true``/``false``, an int, a float, ``a/b`` a tuple (schedule
    ``2d/3d``, chunk ``3/4``), else the string."""
    if "/" in text:
        return tuple(_field_value(v) for v in text.split("/"))
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(low)
        except ValueError:
            pass
    return text.strip()


def config_of(spec: str, **base: object) -> vc.VMoBAConfig:
    """A ``--configs`` entry: an optional preset name and ``field=value`` overrides, on top
    of ``base`` (the run's block size and kernel)."""
    name, fields = None, dict(base)
    for item in filter(None, (i.strip() for i in spec.split(","))):
        key, eq, value = item.partition("=")
        if eq:
            fields[key.strip()] = _field_value(value)
        elif name is None:
            name = key
        else:
            raise SystemExit(f"--configs {spec!r}: two preset names ({name}, {key})")
    if name is None:
        return vc.VMoBAConfig(**fields)  # type: ignore[arg-type]
    return vc.VMoBAConfig.preset(name, **fields)


def wan_inputs(grid: str, device, dtype, text_dim: int, text: int = 512) -> dict:
    """Seeded inputs of one Wan forward call: latents for the ``frames x height x width`` token
    ``grid`` (patch 1 x 2 x 2), timestep 500 and ``text`` tokens of random text embedding."""
    t, h, w = (int(v) for v in grid.split("x"))
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, t, 2 * h, 2 * w, generator=g).to(device, dtype),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, text, text_dim, generator=g).to(device, dtype),
        "return_dict": False,
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, steps: int) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profile_step(step, device: str, rows: int = 20) -> str:
    """One more training step under torch.profiler: the kernels (or ops on CPU) by device time,
    then the ops by memory they allocated; where a step's time and memory go."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        step()
        sync(device)
    avg = prof.key_averages()
    by_time = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    by_mem = "self_cuda_memory_usage" if device == "cuda" else "self_cpu_memory_usage"
    return "\n".join(
        [
            f"-- one training step, by {by_time}:",
            avg.table(sort_by=by_time, row_limit=rows, max_name_column_width=90),
            f"-- by {by_mem}:",
            avg.table(sort_by=by_mem, row_limit=rows, max_name_column_width=90),
        ]
    )


KINDS = (  # kernel-name fragments -> kind, first match wins
    ("flex_attention", "flex attention"),
    ("cute", "FlashAttention-4 (flash_attn.cute)"),
    ("cudnn", "dense attention (cuDNN / flash)"),
    ("fmha", "dense attention (cuDNN / flash)"),
    ("flash", "dense attention (cuDNN / flash)"),
    ("gemm", "GEMM"),
    ("nvjet", "GEMM"),
    ("xmma", "GEMM"),
    ("cutlass", "GEMM"),
    ("triton_", "other Triton kernels"),
)


def forward_by_kind(fn) -> dict:
    """GPU time of one inference forward by kind of kernel (:data:`KINDS`; the rest "other"),
    in ms, and the number of kernels: where the forward's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    count = 0
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us <= 0 or evt.key.startswith(("cudaLaunch", "cuLaunch")):
            continue
        name = evt.key.lower()
        kind = next((k for frag, k in KINDS if frag in name), "other")
        out[kind] = out.get(kind, 0.0) + us / 1e3
        count += evt.count
    return {**{k: round(v, 2) for k, v in sorted(out.items())}, "kernels": count}


_MASKS: list | None = None


def _record_density(xs: list[torch.Tensor]) -> None:
    """Record the block density of one mask from its tensors in ``MaskPieces.tensors()`` order
    (the kv tables first: partial counts, partial indices, full counts, full indices)."""
    if _MASKS is not None:
        pairs = xs[0].float().mean() + xs[2].float().mean()
        _MASKS.append(float(pairs) / xs[1].shape[-1])


def _mask_spy(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``vmoba_compile::materialize`` on CUDA (the Triton path's tables, every table of one
    mask), recording the mask's density."""
    _record_density(xs)
    return [x.clone() for x in xs]


def _flash_spy(q, k, v, tensors, *static):
    """``vmoba_compile::flash_block_sparse`` on CUDA (the FlashAttention-4 path's forward),
    recording the mask's density, then the op's own kernel."""
    _record_density(tensors)
    return vc.kernels.flash._flash_forward._init_fn(q, k, v, tensors, *static)


def _flash_train_spy(q, k, v, tables, *rest):
    """``vmoba_compile::flash_block_train`` on CUDA (the FlashAttention-4 training path's
    forward), likewise."""
    _record_density(tables)
    return vc.kernels.flash._train_forward._init_fn(q, k, v, tables, *rest)


def mask_densities(step) -> list[float]:
    """The block density of every VMoBA mask one more ``step`` builds (computed query-key block
    pairs over all pairs of the padded sequence, mean over batch and heads), in call order."""
    global _MASKS
    if not getattr(mask_densities, "registered", False):
        torch.library.register_kernel("vmoba_compile::materialize", "cuda", _mask_spy)
        torch.library.register_kernel("vmoba_compile::flash_block_sparse", "cuda", _flash_spy)
        torch.library.register_kernel("vmoba_compile::flash_block_train", "cuda", _flash_train_spy)
        mask_densities.registered = True
    _MASKS = []
    try:
        step()
        torch.cuda.synchronize()
        return [round(d, 3) for d in _MASKS]
    finally:
        _MASKS = None


def memory_at_peak(step, rows: int = 25, dump: str | None = None) -> str:
    """One more training step with CUDA allocation history: replays its allocations and frees,
    and lists the blocks alive at the step's peak by the line (source shown) that allocated them;
    where a peak's bytes come from."""
    import linecache
    from collections import defaultdict

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if dump:
        import pickle

        with open(dump, "wb") as f:
            pickle.dump(snap, f)
    blocks = [b for seg in snap["segments"] for b in seg["blocks"]]
    # alive after the step: parameters, optimizer state (their allocations predate the trace)
    base = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    live: dict[int, tuple[int, list]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, list]] = {}
    for e in snap["device_traces"][0] if snap["device_traces"] else []:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif e["action"] in ("free_completed",) and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]

    def where(frames) -> str:
        for fr in frames:  # the first frame outside torch's own Python: the generated code or ours
            fn = fr.get("filename", "")
            if not fn.endswith(".py") or ("/torch/" in fn and "torchinductor" not in fn):
                continue
            src = linecache.getline(fn, fr.get("line", 0)).strip()
            return f"{os.path.basename(fn)}:{fr.get('line')} {fr.get('name')} | {src[:110]}"
        return "?"

    by = defaultdict(lambda: [0, 0])
    for size, frames in at_peak.values():
        k = where(frames)
        by[k][0] += size
        by[k][1] += 1
    lines = [
        f"-- memory at the step's peak: {peak / 2**30:.2f} GiB allocated during the step, on top "
        f"of what was alive before it (after the step {base / 2**30:.2f} GiB are alive); "
        f"by allocating line:"
    ]
    for k, (size, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{size / 2**30:8.3f} GiB {n:5d} blocks  {k}")
    return "\n".join(lines)


INSTALL = 'pip install "vmoba_compile[flash]"'


_FA4_DENSE_CALLS = [0]  # calls that ran (counted in the op, outside any traced code)


@torch.library.custom_op("vmoba_bench::fa4_dense", mutates_args=())
def _fa4_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention on FlashAttention-4's own forward: ``[B, H, S, D]`` in, output and
    log-sum-exp out."""
    from flash_attn.cute.interface import _flash_attn_fwd

    _FA4_DENSE_CALLS[0] += 1
    b, h, s, _ = q.shape
    out = q.new_empty(b, h, s, v.shape[-1])
    lse = q.new_empty(b, h, s, dtype=torch.float32)
    t = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    _flash_attn_fwd(*t, softmax_scale=scale, return_lse=True, out=out.transpose(1, 2), lse=lse)
    return out, lse


@_fa4_dense.register_fake
def _(q, k, v, scale):
    b, h, s, _ = q.shape
    return q.new_empty(b, h, s, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("vmoba_bench::fa4_dense_backward", mutates_args=())
def _fa4_dense_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    from flash_attn.cute.interface import _flash_attn_bwd

    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
    t = [x.transpose(1, 2) for x in (q, k, v, out, grad_out.contiguous())]
    dq, dk, dv = (g.transpose(1, 2) for g in grads)
    _flash_attn_bwd(*t, lse, softmax_scale=scale, dq=dq, dk=dk, dv=dv)
    return tuple(grads)


@_fa4_dense_backward.register_fake
def _(q, k, v, out, lse, grad_out, scale):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _fa4_dense_setup(ctx, inputs, output):
    ctx.scale = inputs[3]
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.mark_non_differentiable(output[1])


def _fa4_dense_grads(ctx, grad_out, _grad_lse):
    return (*_fa4_dense_backward(*ctx.saved_tensors, grad_out, ctx.scale), None)


_fa4_dense.register_autograd(_fa4_dense_grads, setup_context=_fa4_dense_setup)


class _FA4DenseSDPA(torch.overrides.TorchFunctionMode):
    """Unmasked, non-causal, dropout-free bf16/fp16 CUDA SDPA calls as :func:`_fa4_dense`
    (everything else as called). Active from trace to the last timed call: Dynamo traces the
    mode, so the compiled graphs hold the FA4 ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            names = ("query", "key", "value")  # diffusers passes them by keyword
            q, k, v = (*args[:3], *(kwargs.get(n) for n in names[len(args[:3]) :]))
            rest = {n: a for n, a in kwargs.items() if n not in names}
            plain = len(args) <= 3 and rest.get("attn_mask") is None and not rest.get("dropout_p")
            plain = plain and not rest.get("is_causal") and q.shape[1] == k.shape[1]
            if plain and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
                return _fa4_dense(q, k, v, rest.get("scale"))[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def fa4_dense_attention(variant: str, train_steps: int, checkpointing: bool) -> Iterator[None]:
    """Every plain SDPA call of the dense model on FlashAttention-4 (forward and backward), the
    kernel VMoBA's FlashAttention-4 path uses. FA4's own interface is called: torch 2.11's
    ``activate_flash_attention_impl("FA4")`` unpacks two values from ``_flash_attn_fwd``, which
    returns five in flash-attn-4 4.0.0b36 (``ValueError: too many values to unpack``, H200), and
    diffusers' FA4 backend (``flash_4_hub``) loads its kernel from the Hugging Face Hub."""
    if variant != "dense":
        raise SystemExit("--dense-attention fa4 measures the dense variant: add --variant dense")
    if train_steps and checkpointing:
        raise SystemExit(
            "--dense-attention fa4 measures forward calls and training without checkpointing: "
            "a torch function mode is thread-local, and autograd's CUDA thread recomputes the "
            "checkpointed blocks without it (torch.utils.checkpoint.CheckpointError: a "
            "different number of tensors saved). Add --train-steps 0 or --no-checkpointing."
        )
    missing = vc.kernels.flash_unavailable()
    if missing is not None:
        raise SystemExit(f"--dense-attention fa4: {missing}")
    before = _FA4_DENSE_CALLS[0]
    with _FA4DenseSDPA():
        yield
    if _FA4_DENSE_CALLS[0] == before:
        raise SystemExit("--dense-attention fa4: no SDPA call of the model went to FA4")


def run_variant(
    name, make_model, inputs, device, steps, train_steps, forward=True, profile=False,
    memory=False, dump=None, lr=1e-5,
) -> dict:  # fmt: skip
    from diffusers import WanTransformer3DModel  # noqa: F401  (fail early without diffusers)

    torch._dynamo.reset()
    model, wrapped = make_model()
    row = {"variant": name}
    first = graphs_compiled()  # the counter spans the process's runs
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if forward:
        with torch.no_grad():
            t0 = time.perf_counter()
            wrapped(**inputs)
            sync(device)
            row["cold_compile_s"] = time.perf_counter() - t0
            before = graphs_compiled()
            row["forward_ms"] = median_ms(lambda: wrapped(**inputs), device, steps)
            row["forward_recompiles"] = graphs_compiled() - before
        if device == "cuda":
            row["forward_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if isinstance(wrapped, vc.VMoBAModule):
                with torch.no_grad():
                    d = mask_densities(lambda: wrapped(**inputs))
                row["forward_density_mean"] = round(sum(d) / max(len(d), 1), 3)
        if profile and device == "cuda":
            row["forward_gpu_ms_by_kind"] = forward_by_kind(lambda: wrapped(**inputs))
        print(json.dumps(dict(row, partial=True)), flush=True)  # a run cut later still reports
    if train_steps:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)

        def step():
            out = wrapped(**inputs)[0]
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step()
        sync(device)
        row["train_cold_s"] = time.perf_counter() - t0
        row["graphs_compiled"] = graphs_compiled() - first  # > 1 per variant: graph breaks
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = graphs_compiled()
        row["train_step_ms"] = median_ms(step, device, train_steps)
        row["train_recompiles"] = graphs_compiled() - before
        # non-finite weights make threshold selection keep every chunk (density 1.0)
        row["params_finite"] = all(bool(p.isfinite().all()) for p in model.parameters())
        if device == "cuda":
            row["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(dict(row, partial=True)), flush=True)
        if device == "cuda" and isinstance(wrapped, vc.VMoBAModule):
            d = mask_densities(step)  # forward and recomputation of every layer
            row["train_density_mean"] = round(sum(d) / max(len(d), 1), 3)
            row["train_densities"] = d
        if profile:
            print(profile_step(step, device), flush=True)
        if memory and device == "cuda":
            print(memory_at_peak(step, dump=dump), flush=True)
    if isinstance(wrapped, vc.VMoBAModule):
        row["config"] = repr(wrapped.config_vmoba)
        row["rewritten_calls"] = len(wrapped.report.rewritten)
        kernels = [c.kernel for c in wrapped.report.rewritten]
        row["kernels"] = {k: kernels.count(k) for k in sorted(set(map(str, kernels)))}
    return row


def probe_cost(model: torch.nn.Module, inputs: dict, device: str) -> dict:
    """Seconds of the structural fallback's probe (``StructuralAdapter.grid`` on a fresh
    adapter: the stem run plus ``2 + ceil(log2 N)`` eager runs with attention as identity)
    and of one eager dense forward, on the same model and inputs."""
    from vmoba_compile.adapters.structural import StructuralAdapter

    with torch.no_grad():
        model(**inputs)  # warm-up (cuDNN / cuBLAS handles)
        forward_ms = median_ms(lambda: model(**inputs), device, 3)
    sync(device)
    t0 = time.perf_counter()
    grid = StructuralAdapter().grid(model, (), inputs)
    sync(device)
    probe_s = time.perf_counter() - t0
    verified = len(grid.order_verified or ())
    return {
        "variant": "structural probe",
        "probe_s": probe_s,
        "dense_eager_forward_s": forward_ms / 1e3,
        "probe_over_forward": probe_s / (forward_ms / 1e3),
        "grid": str(grid),
        "modules_verified": verified,
        "modules_refused": len(grid.order_refused),
        "first_refused": grid.order_refused[0] if grid.order_refused else None,
    }


def _run_name(args: dict, variant: str) -> str:
    """How a saved run compiled: dense or ``optimize``, whole model or blocks, and with which
    attention kernel where it is not the default."""
    if variant.startswith("dense"):
        name = "dense, blocks compiled" if args.get("regional") else "dense `torch.compile`"
        return name + (", FlashAttention-4" if args.get("dense_attention") == "fa4" else "")
    kernel = args.get("kernel", "auto")
    suffix = "" if kernel == "auto" else f', kernel="{kernel}"'
    spec = variant.partition("[")[2].rstrip("]")
    if spec:  # a --configs entry: the preset / fields the run set
        fields = [f"VMoBAConfig.preset({i!r})" if "=" not in i else i for i in spec.split(",")]
        suffix += ", " + ", ".join(fields)
    if args.get("whole_model"):
        return f"`optimize(regional=False{suffix})`"
    if args.get("regional"):
        return f"`optimize(regional=True{suffix})`"
    return f"`optimize({suffix.lstrip(', ')})`" if suffix else "`optimize` (default)"


def markdown_table(runs: list[dict]) -> str:
    """The results of saved runs (``--out`` files) as one markdown table, a row per variant run.

    Speedups divide the first dense whole-model row's time that has the metric by each row's;
    peak memory is given with its change against that row's. A metric a run did not measure
    (``--no-forward``, ``--train-steps 0``) is "-".
    """
    rows = [(run, row) for run in runs for row in run["rows"]]

    def base(key: str) -> float | None:
        for run, row in rows:
            dense = row["variant"].startswith("dense") and not run["args"].get("regional")
            dense = dense and run["args"].get("dense_attention", "sdpa") == "sdpa"
            if dense and row.get(key):
                return row[key]
        return None

    def time(row: dict, key: str) -> str:
        value, ref = row.get(key), base(key)
        if not value:
            return "-"
        return f"{value:,.0f} ms" + (f" ({ref / value:.2f}x)" if ref and ref != value else "")

    def peak(row: dict, key: str) -> str:
        value, ref = row.get(key), base(key)
        if not value:
            return "-"
        change = f" ({100 * (value / ref - 1):+.1f}%)" if ref and ref != value else ""
        return f"{value:.2f} GiB{change}"

    def seconds(row: dict, key: str) -> str:
        return f"{row[key]:.1f} s" if row.get(key) else "-"

    lines = [
        "| run | cold forward compile | forward | forward peak | cold training compile "
        "| training step | training peak | density |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, row in rows:
        density = row.get("train_density_mean") or row.get("forward_density_mean")
        cells = [
            _run_name(run["args"], row["variant"]),
            seconds(row, "cold_compile_s"),
            time(row, "forward_ms"),
            peak(row, "forward_peak_gib"),
            seconds(row, "train_cold_s"),
            time(row, "train_step_ms"),
            peak(row, "train_peak_gib"),
            "-" if density is None else f"{density:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--grid", default="24x36x64",
        help="frames x height x width in tokens (480p: 24x36x64; 720p, 81 frames: 21x45x80)",
    )  # fmt: skip
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="1.3b",
        help="the Wan 2.1 config: 1.3b (12 heads, 30 layers) or 14b (40 heads, 40 layers)",
    )  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=20, help="timed forward calls")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (0: none)")
    p.add_argument("--variant", choices=["dense", "vmoba", "both"], default="both")
    p.add_argument(
        "--no-checkpointing", action="store_true",
        help="train without activation checkpointing (at 55K tokens 30 layers do not fit then)",
    )  # fmt: skip
    p.add_argument(
        "--lr", type=float, default=1e-5,
        help="AdamW learning rate of the timed steps (0: same kernels, weights unchanged)",
    )  # fmt: skip
    p.add_argument("--text", type=int, default=512, help="text tokens (cross-attention)")
    p.add_argument(
        "--profile", action="store_true",
        help="profile one more forward (GPU time by kind of kernel, in the row) and, after the "
        "timed training steps, print torch.profiler tables of one more step",
    )  # fmt: skip
    p.add_argument(
        "--memory", action="store_true",
        help="after the timed training steps, list the CUDA blocks alive at one more step's peak "
        "by the source line that allocated them",
    )  # fmt: skip
    p.add_argument("--memory-dump", default=None, help="with --memory: pickle the snapshot here")
    p.add_argument(
        "--no-forward", action="store_true",
        help="training only: skip the inference compile and timing (its graph is a separate "
        "compile; a time-limited run can measure the two in separate processes)",
    )  # fmt: skip
    p.add_argument(
        "--options", default="",
        help="inductor options of both variants' compiles, over optimize's safe defaults "
        "(mix-order reductions off); triton.mix_order_reduction=true measures with them",
    )  # fmt: skip
    compile_mode = p.add_mutually_exclusive_group()
    compile_mode.add_argument(
        "--regional", action="store_true",
        help="compile the blocks, not the whole model: optimize(regional=True) and, for dense, "
        "each block's module.compile() (diffusers' compile_repeated_blocks)",
    )  # fmt: skip
    compile_mode.add_argument(
        "--whole-model", action="store_true",
        help="optimize(regional=False): VMoBA compiles the whole model (the default, "
        "regional=None, compiles the blocks of this model)",
    )  # fmt: skip
    p.add_argument(
        "--kernel", choices=["auto", "flash", "triton"], default="auto",
        help="VMoBAConfig.kernel of the vmoba variant (auto: FlashAttention-4 where installed)",
    )  # fmt: skip
    p.add_argument(
        "--configs", default="",
        help="';'-separated VMoBA configs of the vmoba variant, one run each: a preset name "
        "(VMoBAConfig.preset: fast, balanced, quality) and/or comma-separated field=value "
        "overrides, e.g. 'fast;threshold=0.25;selection=topk,topk=8' (default: the defaults)",
    )  # fmt: skip
    p.add_argument(
        "--dense-attention", choices=["sdpa", "fa4"], default="sdpa",
        help="the dense variant's attention: SDPA's own choice (cuDNN or FlashAttention-2), or "
        "fa4: FlashAttention-4's own forward and backward for every unmasked SDPA call",
    )  # fmt: skip
    p.add_argument(
        "--probe", action="store_true",
        help="time the structural fallback's token-order probe on this model (what a model no "
        "adapter names pays once per input shape) against one eager dense forward, and exit",
    )  # fmt: skip
    p.add_argument(
        "--float8", choices=["none", "train", "dynamic"], default="none",
        help="torchao float8 on the blocks' linears, both variants: train (Float8Linear) or "
        "dynamic (float8 weights and dynamic activations, inference; Hopper)",
    )  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny dims, aot_eager")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--md", nargs="+", metavar="JSON", default=None,
        help="print the markdown table of saved runs (--out files; dense first) and exit",
    )  # fmt: skip
    return p.parse_args()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def variants_of(args, cfg, device, dtype) -> list:
    """The runs to measure, ``(name, build)``: ``build()`` returns the eager model and the
    compiled one."""
    from diffusers import WanTransformer3DModel

    base = dict(block_size=16 if args.tiny else 128, kernel=args.kernel)
    specs = args.configs.split(";") if args.configs else [""]
    configs = {spec.strip(): config_of(spec, **base) for spec in specs}
    lowering = "aot_eager" if args.tiny else "inductor"
    # Both variants start from the same inductor options: the dense baseline needs the
    # mix-order workaround as much as optimize (its scale_shift_table gradients are garbage
    # without it, benchmarks/README.md), and the comparison stays like for like.
    inductor = {}  # the tiny run lowers with aot_eager: no inductor options
    if not args.tiny:
        inductor = {"options": {**safe_inductor_defaults(), **parse_options(args.options)}}

    def build():
        torch.manual_seed(0)
        if args.tiny:
            m = WanTransformer3DModel(**cfg).to(device, dtype).eval()
        else:  # made on the GPU in bf16: the 14B config's float32 weights would not fit
            with torch.device(device), _default_dtype(dtype):
                m = WanTransformer3DModel(**cfg).eval()
        if args.train_steps and not args.no_checkpointing:
            m.enable_gradient_checkpointing()  # only active with gradients: inference unchanged
        float8_linears(m, args.float8)
        return m

    def dense():
        m = build()
        backend = "aot_eager" if args.tiny else "inductor"
        if args.regional:
            for block in m.blocks:
                block.compile(dynamic=False, backend=backend, **inductor)
            return m, m
        return m, torch.compile(m, dynamic=False, backend=backend, **inductor)

    def vmoba(config):
        m = build()
        regional = True if args.regional else (False if args.whole_model else None)
        return m, vc.optimize(m, config, lowering=lowering, regional=regional, **inductor)

    variants = [("dense torch.compile", dense)] if args.variant != "vmoba" else []
    if args.variant != "dense":
        for spec, config in configs.items():
            name = "vmoba optimize" + (f" [{spec}]" if spec else "")
            variants.append((name, functools.partial(vmoba, config)))
    return variants


def _block_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The linears float8 takes: the transformer blocks' (attention, feed-forward), whose
    dims are multiples of 16; the embedders and the output projection stay in bf16, as in
    torchao's recipes."""
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.startswith("blocks.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def float8_linears(model: torch.nn.Module, how: str) -> None:
    """torchao float8 on the blocks' linears, before compiling (the user's order: quantize,
    then optimize): ``train`` swaps them for ``Float8Linear`` (dynamic tensorwise scaling,
    forward and backward); ``dynamic`` quantizes the weights to float8 and each activation
    dynamically (inference; CUDA compute capability >= 8.9)."""
    if how == "none":
        return
    if not any(_block_linear(m, n) for n, m in model.named_modules()):
        raise ValueError(f"--float8 {how}: no linear of the blocks has dims divisible by 16")
    if how == "train":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=_block_linear)
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(), filter_fn=_block_linear)


def print_rows(rows: list[dict]) -> None:
    """Each row as JSON, then a markdown table of the metrics, one column per variant."""
    for r in rows:
        print(json.dumps(r))
    keys = [k for k in rows[0] if k != "variant"]
    print("\n| metric | " + " | ".join(r["variant"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        cells = [f"{r.get(k, '-'):.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
                 for r in rows]  # fmt: skip
        print(f"| {k} | " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    if args.md:
        runs = []
        for path in args.md:
            with open(path) as f:
                runs.append(json.load(f))
        print(markdown_table(runs))
        return

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = dict(TINY if args.tiny else PRESETS[args.preset])
    cfg["num_layers"] = args.layers = args.layers or cfg["num_layers"]
    t, h, w = (int(v) for v in args.grid.split("x"))
    inputs = wan_inputs(args.grid, device, dtype, cfg["text_dim"], args.text)
    if args.probe:
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        row = probe_cost(WanTransformer3DModel(**cfg).to(device, dtype).eval(), inputs, device)
        print(header(device), f"| grid {args.grid} = {t * h * w} tokens | {args.layers} layers")
        print(json.dumps(row))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {"header": header(device), "args": vars(args), "rows": [row]}, f, indent=1
                )
        return
    variants = variants_of(args, cfg, device, dtype)
    how = (
        "regional (blocks compiled)"
        if args.regional
        else "dense whole model; VMoBA " + ("whole model" if args.whole_model else "default")
    )
    print(
        header(device),
        f"| Wan {args.preset} config | grid {args.grid} = {t * h * w} tokens "
        f"| {args.layers} layers | {how}",
    )
    opts = (args.steps, args.train_steps, not args.no_forward, args.profile, args.memory)
    opts += (args.memory_dump, args.lr)
    with contextlib.ExitStack() as stack:
        if args.dense_attention == "fa4":
            stack.enter_context(
                fa4_dense_attention(args.variant, args.train_steps, not args.no_checkpointing)
            )
        rows = [run_variant(n, f, inputs, device, *opts) for n, f in variants]
    print_rows(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header(device), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
