"""VMoBA under diffusers' Ulysses context parallelism and FSDP2: 2 CPU processes (gloo).

Each spawned worker runs a group of checks on both ranks (process start-up and imports dominate
on CPU) and rank 0 writes its measurements; the tests assert on them. The oracle is always the
same model optimized in one process, with the same config and inputs: under Ulysses each rank
runs VMoBA on the whole sequence of half the heads, which must give exactly that model's output
and, summed over the ranks, its gradients.

CPU quirks of diffusers 0.42 context parallelism, worked around here and in
``examples/context_parallel.py`` only: ``enable_parallelism`` computes a device index modulo
``torch.accelerator.device_count()``, which is 0 on CPU (patched to 1 for that one call, with
``unittest.mock``), and its hooks call ``logger.warning_once``, which exists once transformers is
imported (imported here).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from compat_rows import compat_row
from sdpa_spy import KernelSpy

pytest.importorskip("diffusers")
if not torch.distributed.is_available():  # pragma: no cover - every CI torch has it
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# Each fixture starts a 2-process gloo group and compiles tiny models in it: tens of seconds.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]

WORLD = 2
CHUNKS = {"block_size": 16, "chunk_1d": (1,), "chunk_2d": (2, 2), "chunk_3d": (1, 2, 2)}


# ---------------------------------------------------------------------------------- harness


def enable_cp(model: torch.nn.Module, **config: Any) -> None:
    """``model.enable_parallelism(ContextParallelConfig(**config))`` on CPU (see the module
    docstring for the scoped patch)."""
    from diffusers import ContextParallelConfig

    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        model.enable_parallelism(config=ContextParallelConfig(**config))


def shard(model: torch.nn.Module, blocks: str = "blocks") -> None:
    """FSDP2 as users apply it: each block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in getattr(model, blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _entry(rank: int, init: str, worker: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        import transformers  # noqa: F401  (diffusers' logger.warning_once; see module docstring)

        results = globals()[worker]()
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def spawn(worker: str) -> dict[str, Any]:
    """Run ``worker()`` on 2 gloo ranks; rank 0's result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp, "init").as_uri()
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_entry, args=(init, worker, out), nprocs=WORLD, join=True)
        return torch.load(out, weights_only=False)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


class FlexSpy:
    """Counts executions of the FlexAttention operator (VMoBA's kernel; dense SDPA never calls
    it). Installed after the first call, so it counts runs of the compiled graphs, not traces."""

    def __init__(self) -> None:
        from torch._higher_order_ops.flex_attention import FlexAttentionHOP

        self.count = 0
        original = FlexAttentionHOP.__call__

        def counted(hop, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(hop, *args, **kwargs)

        self._patch = mock.patch.object(FlexAttentionHOP, "__call__", counted)

    def __enter__(self) -> FlexSpy:
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._patch.__exit__(*exc)


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------------- workers


def _build(family: str, **overrides: Any):
    import tiny_models as tm

    model, args, kwargs = tm.build(family, **overrides)
    kwargs["return_dict"] = False  # diffusers' CP output hooks take tensors, not output classes
    if family == "ltx_video":
        # diffusers 0.42.1 cannot run LTX-Video under Ulysses with a text mask, eagerly and
        # without vmoba_compile ("output with shape [1, 1, 72, 16] doesn't match the broadcast
        # shape [1, 2, 72, 16]" in its cross-attention): run it without one.
        kwargs["encoder_attention_mask"] = None
    return model, args, kwargs


def _inference_worker() -> dict[str, Any]:
    from vmoba_compile import VMoBAConfig, optimize

    config = VMoBAConfig(**CHUNKS)
    res: dict[str, Any] = {}
    for family in ("wan", "ltx_video"):
        controls = family == "wan"  # the run-time controls on one family (CPU time)
        torch._dynamo.reset()
        model, args, kwargs = _build(family, num_layers=2)
        one = optimize(model, config, lowering="aot_eager")
        with torch.no_grad():
            want = _first(one(*args, **kwargs))
            with FlexSpy() as spy:
                one(*args, **kwargs)
            if controls:
                one.vmoba.dense_layers = {1}
                want_d1 = _first(one(*args, **kwargs))
            dense = _first(model(*args, **kwargs))
        flex_per_call = spy.count / len(one.report.rewritten)

        torch._dynamo.reset()
        cp_model, _, _ = _build(family, num_layers=2)
        enable_cp(cp_model, ulysses_degree=WORLD)
        opt = optimize(cp_model, config, lowering="aot_eager")
        with torch.no_grad(), KernelSpy() as kernels:
            got = _first(opt(*args, **kwargs))
        with torch.no_grad():
            graphs = _unique_graphs()
            with FlexSpy() as spy:
                again = _first(opt(*args, **kwargs))
        res[family] = dict(
            err=_err(got, want),
            err_again=_err(again, want),
            vmoba_vs_dense=_err(want, dense),
            steady=_unique_graphs() == graphs,  # a second step compiles nothing
            rewritten=sorted((c.module, c.layer_index) for c in opt.report.rewritten),
            one_rewritten=sorted((c.module, c.layer_index) for c in one.report.rewritten),
            flex_expected=flex_per_call * len(opt.report.rewritten),
            flex_cp=spy.count,
            report=str(opt.report),
            kernel_seq_lens=kernels.decided,
            op_kernel_decisions=kernels.op_decisions,
            video_tokens=opt.report.rewritten[0].shape,
            one_process_path=one.parallel_plan is None and one.report.parallel is None,
        )
        if not controls:
            continue
        wan_want = want
        with torch.no_grad():
            opt.vmoba.dense_layers = {1}
            got_d1 = _first(opt(*args, **kwargs))
            opt.vmoba.dense_layers = set()
            opt.vmoba.dense_steps = 1
            opt.vmoba.reset()
            got_warm = _first(opt(*args, **kwargs))  # step 0: dense warm-up
            got_after = _first(opt(*args, **kwargs))  # step 1: VMoBA
            graphs = _unique_graphs()
            opt.vmoba.reset()  # a second generation: warm-up and VMoBA steps compile nothing
            opt(*args, **kwargs)
            opt(*args, **kwargs)
        res[family].update(
            err_dense_layer=_err(got_d1, want_d1),
            dense_layer_changes=_err(got_d1, got),
            err_warmup=_err(got_warm, dense),
            err_after_warmup=_err(got_after, want),
            steady_controls=_unique_graphs() == graphs,
        )

    # FSDP2 before and after context parallelism: the same one-process output.
    model, args, kwargs = _build("wan", num_layers=2)
    for order in ("fsdp_then_cp", "cp_then_fsdp"):
        torch._dynamo.reset()
        model, _, _ = _build("wan", num_layers=2)
        if order == "fsdp_then_cp":
            shard(model)
            enable_cp(model, ulysses_degree=WORLD)
        else:
            enable_cp(model, ulysses_degree=WORLD)
            shard(model)
        opt = optimize(model, config, lowering="aot_eager")
        with torch.no_grad():
            got = _first(opt(*args, **kwargs))
        res[order] = dict(
            err=_err(got, wan_want),
            rewritten=sorted((c.module, c.layer_index) for c in opt.report.rewritten),
            report=str(opt.report),
        )
    res["refusals"] = _refusals()
    return res


def _refusals() -> dict[str, Any]:
    """Setups VMoBA refuses under context parallelism: the report's reason and fix, and nothing
    exchanged (diffusers' own attention stays). None is run: diffusers 0.42.1 cannot compile
    ulysses_anything (its all-to-all reads a process group inside a fake kernel), nor run ring
    attention with the native backend (no log-sum-exp) or Ulysses with 3 heads on 2 ranks."""
    from diffusers.models._modeling_parallel import ContextParallelOutput

    from vmoba_compile import VMoBAConfig, optimize

    config = VMoBAConfig(**CHUNKS)
    out: dict[str, Any] = {}
    cases = {
        "ring": ("wan", {}, dict(ring_degree=WORLD)),
        "heads": ("wan", dict(num_attention_heads=3), dict(ulysses_degree=WORLD)),
        "anything": ("wan", {}, dict(ulysses_degree=WORLD, ulysses_anything=True)),
        "family": ("hunyuan_video", {}, dict(ulysses_degree=WORLD)),
    }
    for name, (family, overrides, cp) in cases.items():
        torch._dynamo.reset()
        model, _, _ = _build(family, **overrides)
        if family == "hunyuan_video":  # no _cp_plan in diffusers: the user passes one
            from diffusers import ContextParallelConfig

            with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
                model.enable_parallelism(
                    config=ContextParallelConfig(**cp),
                    cp_plan={"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
                )
        else:
            enable_cp(model, **cp)
        opt = optimize(model, config, lowering="aot_eager")
        out[name] = dict(report=str(opt.report), exchanged=len(opt.parallel_plan.exchanged))
    model, _, _ = _build("wan")
    enable_cp(model, ulysses_degree=WORLD)
    try:
        optimize(model, config, regional=False)
        out["whole_model"] = "no error"
    except RuntimeError as e:
        out["whole_model"] = str(e)
    return out


def _training_worker() -> dict[str, Any]:
    """Gradients of ``mean(out ** 2)`` through our all-to-all against one process's. Keep-all
    config (CPU FlexAttention has no backward kernel): the rewritten calls run the dense math
    of VMoBA's keep-all path, through the pass's exchange and AOTAutograd's backward. One case
    runs the sparse config with FlexAttention's CPU device check lifted (its eager math path
    differentiates, as in test_regional.py): a sparse forward paired with a dense backward
    would miss one process's sparse gradients."""
    import torch.distributed as dist
    import torch.nn.attention.flex_attention as fa

    from vmoba_compile import VMoBAConfig, optimize

    keep_all = VMoBAConfig(threshold=1.0, **CHUNKS)
    sparse = VMoBAConfig(**CHUNKS)
    lift = mock.patch.object(fa, "_validate_device", lambda q, k, v: None)
    lift.start()

    def grads(model: torch.nn.Module, opt: Any, args: tuple, kwargs: dict) -> dict:
        _first(opt(*args, **kwargs)).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    # The one-process references are the same on every rank (seeded builds, same inputs): each
    # rank computes one of the two and the ranks exchange them.
    references = (keep_all, sparse)
    torch._dynamo.reset()
    model, args, kwargs = _build("wan", num_layers=2)
    model.train()
    config = references[dist.get_rank() % len(references)]
    mine = grads(model, optimize(model, config, lowering="aot_eager"), args, kwargs)
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, {n: g.detach().clone() for n, g in mine.items()})
    wants = {c: gathered[i] for i, c in enumerate(references)}
    res: dict[str, Any] = {}
    for name, config, cp, fsdp, ckpt in [
        ("cp", keep_all, True, False, False),
        ("fsdp", keep_all, False, True, False),
        ("cp_fsdp_checkpointing", keep_all, True, True, True),
        ("cp_sparse_checkpointing", sparse, True, False, True),
    ]:
        want = wants[config]
        torch._dynamo.reset()
        model, _, _ = _build("wan", num_layers=2)
        model.train()
        if ckpt:
            model.enable_gradient_checkpointing()
        if cp:
            enable_cp(model, ulysses_degree=WORLD)
        if fsdp:
            shard(model)
        opt = optimize(model, config, lowering="aot_eager")
        got = grads(model, opt, args, kwargs)
        errs = []
        for n, g in got.items():
            if hasattr(g, "full_tensor"):  # FSDP2: averaged over its group (both CP ranks)
                g = g.full_tensor() * (WORLD if cp else 1)
            elif cp:  # each CP rank holds a partial gradient: sum them
                g = g.clone()
                dist.all_reduce(g)
            errs.append(_err(g, want[n]))
        res[name] = dict(
            err=max(errs),
            names=sorted(got) == sorted(want),
            rewritten=len(opt.report.rewritten),
            report=str(opt.report),
        )
    res["sparse_vs_keep_all"] = max(
        _err(wants[sparse][n], wants[keep_all][n]) for n in wants[sparse]
    )
    lift.stop()
    return res


# ---------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def inference() -> dict[str, Any]:
    return spawn("_inference_worker")


@compat_row(
    tool="Ulysses context parallelism, FSDP2",
    packages=("torch", "diffusers"),
    result="VMoBA (see [multi_gpu.md](multi_gpu.md))",
)
@pytest.mark.parametrize("family", ["wan", "ltx_video"])
def test_ulysses_inference_equals_one_process(inference: dict, family: str) -> None:
    r = inference[family]
    assert r["vmoba_vs_dense"] > 1e-3, "the test cannot tell VMoBA from dense"
    assert r["err"] < 1e-5 and r["err_again"] < 1e-5, r["report"]
    # every video self-attention layer rewritten, as in one process
    assert r["rewritten"] == r["one_rewritten"] and len(r["rewritten"]) == 2, r["report"]
    assert "Ulysses degree 2" in r["report"] and "rank in: [" in r["report"]
    assert r["one_process_path"], "without a parallel setup optimize must run its usual path"


@pytest.mark.parametrize("family", ["wan", "ltx_video"])
def test_ulysses_repeated_step_compiles_nothing(inference: dict, family: str) -> None:
    assert inference[family]["steady"], "a repeated step compiled a new graph"


def test_ulysses_dense_controls(inference: dict) -> None:
    r = inference["wan"]
    assert r["err_dense_layer"] < 1e-5 and r["dense_layer_changes"] > 1e-4
    assert r["err_warmup"] < 1e-5, "dense warm-up under CP must equal the dense model"
    assert r["err_after_warmup"] < 1e-5
    assert r["steady_controls"], "a second generation with the same controls compiled anew"


@pytest.mark.parametrize("family", ["wan", "ltx_video"])
def test_guard_rewritten_calls_really_run_vmoba(inference: dict, family: str) -> None:
    """Every call the report lists as rewritten ran the VMoBA kernel on this rank: as many
    FlexAttention runs per forward as the one-process model makes for the same calls."""
    r = inference[family]
    assert r["flex_cp"] > 0
    assert r["flex_cp"] == r["flex_expected"], r["report"]


@pytest.mark.parametrize("family", ["wan", "ltx_video"])
def test_ulysses_kernel_decided_once_on_the_full_sequence(inference: dict, family: str) -> None:
    """The kernel is decided where the call is rewritten, on the sequence the attention sees
    after the exchange (S, not the rank's S / P), and the op runs that decision (it decides
    nothing itself), so the report names the kernel that ran."""
    r = inference[family]
    # the report's shape: "[B, H/P, S, D] kv S (rank in: [B, H, S/P, D] kv S/P)"
    full = int(r["video_tokens"].split("]")[0].split(",")[2])
    assert len(r["kernel_seq_lens"]) == len(r["rewritten"]), r["report"]
    assert set(r["kernel_seq_lens"]) == {full}, (r["kernel_seq_lens"], r["report"])
    assert r["op_kernel_decisions"] == 0


@pytest.mark.parametrize("order", ["fsdp_then_cp", "cp_then_fsdp"])
def test_fsdp2_and_ulysses_equal_one_process(inference: dict, order: str) -> None:
    r = inference[order]
    assert r["err"] < 1e-5, r["report"]
    assert [layer for _, layer in r["rewritten"]] == [0, 1], r["report"]
    assert "FSDP2 shards 3 modules" in r["report"]


@pytest.mark.parametrize(
    "case, reason",
    [
        ("ring", "ring attention (ring_degree=2)"),
        ("heads", "3 attention heads are not divisible by ulysses_degree=2"),
        ("anything", "ulysses_anything splits heads and tokens unevenly"),
        ("family", "HunyuanVideo joins text and video tokens"),
    ],
)
def test_refusals_name_reason_and_fix(inference: dict, case: str, reason: str) -> None:
    r = inference["refusals"][case]
    assert "VMoBA REFUSED" in r["report"] and reason in r["report"], r["report"]
    assert "Fix:" in r["report"]
    assert r["exchanged"] == 0, "a refused setup must keep diffusers' own attention"


@pytest.fixture(scope="module")
def training() -> dict[str, Any]:
    return spawn("_training_worker")


@pytest.mark.parametrize("case", ["cp", "fsdp", "cp_fsdp_checkpointing", "cp_sparse_checkpointing"])
def test_training_gradients_equal_one_process(training: dict, case: str) -> None:
    if case == "cp_sparse_checkpointing":
        assert training["sparse_vs_keep_all"] > 1e-4, "sparse and dense gradients do not differ"
    r = training[case]
    assert r["names"] and r["rewritten"] == 2, r["report"]
    assert r["err"] < 1e-6, f"{case}: max gradient error {r['err']}"


def test_whole_model_compile_refused_under_cp(inference: dict) -> None:
    msg = inference["refusals"]["whole_model"]
    assert "runs under context parallelism" in msg and "without regional=False" in msg, msg
