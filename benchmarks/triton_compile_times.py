"""Compile every Triton kernel of an inductor output-code log for the GPU it was made for, on any
host (no GPU needed), and print the seconds each one takes: where a cold compile goes.

Run: ``python benchmarks/triton_compile_times.py LOG [--match REGEX] [--top N]`` where LOG holds
inductor's generated code: the output of a run with ``TORCH_LOGS=output_code`` (log prefixes are
stripped) or an inductor ``output_code.py`` file. Needs torch and triton (the CUDA build of torch
runs this on a CPU-only host; ``pip install torch==2.11.0`` from PyPI gives the GPU image's
versions).

Each kernel is compiled with every launch config inductor would compile for it (its own
``pointwise`` / ``reduction`` / ``persistent_reduction`` heuristics, evaluated as on a CUDA host;
templates carry theirs) for the target named in its ``triton_meta`` (``cc=90``: sm_90). The
times are one core's: inductor compiles kernels in parallel worker processes, so a cold compile
waits at least for its slowest kernel.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from unittest import mock

_LOG_PREFIX = re.compile(r"^V\d+ [\d:.]+ \d+ [^\]]*\] \[[\d/]+\] \[__output_code\] ?", re.M)
_KERNEL = re.compile(r"= async_compile\.triton\('([^']+)', '''(.*?)''', device_str='cuda'\)", re.S)


def kernels(text: str) -> list[tuple[str, str]]:
    """(name, source) of every Triton kernel in an output-code log."""
    return [(m.group(1), m.group(2)) for m in _KERNEL.finditer(_LOG_PREFIX.sub("", text))]


def launch_configs(name: str, source: str):
    """The kernel's JIT function, its triton_meta, and the configs inductor compiles for it:
    a list of (constexpr values, num_warps, num_stages)."""
    import torch
    from torch._inductor.runtime import triton_heuristics as th

    seen = {}

    def capture(kind):
        original = getattr(th, kind)

        def decorator(*args, **kwargs):
            def wrap(fn):
                seen["meta"] = kwargs["triton_meta"]
                if kind == "template":
                    seen["configs"] = [({}, kwargs["num_warps"], kwargs["num_stages"])]
                    return fn
                # Evaluated as on the GPU host: some heuristics branch on CUDA's presence.
                with mock.patch.object(torch.cuda, "is_available", lambda: True):
                    cfgs = original(*args, **kwargs, return_configs=True)
                seen["configs"] = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in cfgs]
                return fn

            return wrap

        return decorator

    kinds = ("pointwise", "reduction", "persistent_reduction", "template")
    # Triton reads a kernel's source back from its file.
    path = os.path.join(tempfile.mkdtemp(prefix="kernel_"), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    no_driver = mock.patch("torch._inductor.runtime.triton_helpers.set_driver_to_gpu", lambda: None)
    with mock.patch.multiple(th, **{k: capture(k) for k in kinds}), no_driver:
        scope = {"__file__": path, "__name__": f"kernel_{name}"}
        exec(compile(source, path, "exec"), scope)
    return scope[name], seen["meta"], seen["configs"]


def compile_seconds(fn, meta, constexprs: dict, num_warps: int, num_stages: int) -> float:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = meta["device"].cc
    target = GPUTarget("cuda", cc, 32)
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names}
    attrs = meta.get("configs", [{}])[0]
    src = ASTSource(fn, signature=dict(meta["signature"]), constexprs=consts, attrs=attrs)
    t0 = time.perf_counter()
    triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log")
    p.add_argument("--match", default="", help="only kernels whose name matches this regex")
    p.add_argument("--top", type=int, default=20, help="print the N slowest kernels")
    args = p.parse_args()
    # A fresh Triton cache: every compile is cold.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_compile_times_")
    with open(args.log) as f:
        found = [(n, s) for n, s in kernels(f.read()) if re.search(args.match, n)]
    rows = []
    for name, source in found:
        fn, meta, configs = launch_configs(name, source)
        for constexprs, warps, stages in configs:
            try:
                sec = compile_seconds(fn, meta, constexprs, warps, stages)
            except Exception as e:  # report and go on: one kernel must not hide the others
                print(f"{name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            rows.append((sec, name, constexprs, warps, stages))
            print(f"{sec:7.2f} s  {name}  {constexprs} warps={warps} stages={stages}", flush=True)
    rows.sort(key=lambda r: -r[0])
    print(f"\n{len(found)} kernels, {len(rows)} compiles, {sum(r[0] for r in rows):.1f} s in all")
    print(f"slowest {args.top}:")
    for sec, name, constexprs, warps, stages in rows[: args.top]:
        print(f"{sec:7.2f} s  {name[:100]}  {constexprs} warps={warps} stages={stages}")


if __name__ == "__main__":
    main()
