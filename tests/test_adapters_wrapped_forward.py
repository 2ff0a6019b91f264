"""Models whose ``forward`` another tool replaced on the instance (cache-dit, diffusers and
accelerate hooks): adapters bind the inputs to what the call really takes, and VMoBA runs on the
blocks that really run.

cache-dit 1.5.3 replaces ``transformer.forward`` with
``update_wrapper(partial(wrapper, transformer), wrapper)``: ``__wrapped__`` is the unbound
``wrapper(self, *args, **kwargs)``, and ``inspect.signature`` follows it, so the first input
would bind to ``self``. During the call it swaps ``transformer.blocks`` for its cached blocks
(holding the same block modules), which skip the later blocks on cached steps.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from compat_rows import compat_row
from conftest import ATOL_F32, max_err

pytest.importorskip("diffusers")

import tiny_models as tm  # noqa: E402
from test_api import KEEP_ALL, SPARSE, first, reference_forward  # noqa: E402

from vmoba_compile import optimize  # noqa: E402
from vmoba_compile.adapters import find_adapter  # noqa: E402
from vmoba_compile.adapters.base import bind_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _pass_through(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def _cache_dit_style(model: torch.nn.Module) -> None:
    model.forward = functools.update_wrapper(functools.partial(_pass_through, model), _pass_through)


def _hook_style(model: torch.nn.Module) -> None:  # diffusers' HookRegistry, accelerate
    old = model.forward
    model.forward = functools.update_wrapper(functools.partial(_pass_through, model), old)


def _plain_wrapper(model: torch.nn.Module) -> None:
    old = model.forward

    @functools.wraps(old)
    def forward(*args, **kwargs):
        return old(*args, **kwargs)

    model.forward = forward


@pytest.mark.parametrize("patch", [_cache_dit_style, _hook_style, _plain_wrapper, None])
@pytest.mark.parametrize("positional", [True, False])
def test_bind_inputs_binds_what_the_call_takes(patch, positional: bool) -> None:
    model, args, kwargs = tm.build("wan")
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    if not positional:  # the same inputs by keyword
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        args = ()
    want = bind_inputs(model, args, kwargs)
    assert want["hidden_states"].dim() == 5
    if patch is not None:
        patch(model)
    got = bind_inputs(model, args, kwargs)
    assert got.keys() == want.keys()
    assert all(got[k] is want[k] for k in want), sorted(got)
    with torch.no_grad():  # the patched forward really takes these inputs
        assert first(model(*args, **kwargs)).shape == want["hidden_states"].shape


cache_dit = pytest.importorskip("cache_dit")


def _cached_wan() -> tuple[torch.nn.Module, tuple, dict, list[int]]:
    model, args, kwargs = tm.build("wan")
    # One block always computed, the other cached whenever the residual moved by < 50%: with
    # the same inputs each step, some steps skip blocks.1.
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=0.5
    )
    cache_dit.enable_cache(model, cache_config=config)
    ran: list[int] = []
    model.blocks[1].register_forward_pre_hook(lambda *_: ran.append(1))
    return model, args, kwargs, ran


@compat_row(
    tool="cache-dit DBCache (`cache_dit.enable_cache(model)`, before or after `optimize`)",
    packages=("cache-dit",),
    result='VMoBA in every block run; the blocks it skips counted "no graph"',
)
@pytest.mark.parametrize("config", [SPARSE[1], KEEP_ALL], ids=["sparse", "keep_all"])
@pytest.mark.parametrize("cache_first", [True, False])
def test_cache_dit_blocks_run_vmoba_by_the_account(config, cache_first: bool) -> None:
    """cache-dit before or after optimize(model): each step equals the cached model run with
    the reference attention, and the account counts a VMoBA call exactly when a block ran."""
    if cache_first:
        model, args, kwargs, ran = _cached_wan()
        opt = optimize(model, config, lowering="aot_eager")
    else:
        model, args, kwargs = tm.build("wan")
        opt = optimize(model, config, lowering="aot_eager")
        config_cd = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=0,
            max_warmup_steps=0,
            residual_diff_threshold=0.5,
        )
        cache_dit.enable_cache(model, cache_config=config_cd)
        ran = []
        model.blocks[1].register_forward_pre_hook(lambda *_: ran.append(1))
    assert find_adapter(model).grid(model, args, kwargs).video_tokens == 72
    ref_model, _, _, ref_ran = _cached_wan()
    steps = 4
    for step in range(steps):
        with torch.no_grad():
            out = first(opt(*args, **kwargs))
            ref = reference_forward(ref_model, args, kwargs, config)
        assert max_err(out, ref) < ATOL_F32 * 10, f"step {step}: {max_err(out, ref)}"
    assert len(ran) == len(ref_ran) < steps  # cache-dit skipped blocks.1 on some step
    ex = opt.report.executions
    assert ex["blocks.0.attn1"].vmoba_forward == steps
    assert ex["blocks.1.attn1"].vmoba_forward == len(ran)
    assert all(e.no_graph == 0 for e in ex.values())


@compat_row(
    tool="cache-dit on the optimized wrapper (`BlockAdapter(transformer=optimized)`)",
    packages=("cache-dit",),
    result="refused: a clear error with the fix",
)
def test_cache_dit_on_the_optimized_wrapper_is_refused() -> None:
    """cache-dit's BlockAdapter on the optimized model patches the wrapper, which the model never
    calls: the call raises instead of running uncached as if cached."""
    model, args, kwargs = tm.build("wan")
    opt = optimize(model, lowering="aot_eager")
    adapter = cache_dit.BlockAdapter(
        transformer=opt,
        blocks=opt.blocks,
        blocks_name="blocks",
        forward_pattern=cache_dit.ForwardPattern.Pattern_2,
    )
    cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1))
    with pytest.raises(
        RuntimeError, match=r"replaced on the optimized wrapper.*enable_cache\(model\)"
    ):
        opt(*args, **kwargs)
