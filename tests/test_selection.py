"""Selection (top-k, threshold) invariants on random, ragged grids."""

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, layouts, qk_inputs, selection_of


@settings(max_examples=200)
@given(data=st.data())
def test_self_chunk_always_selected_and_topk_counts(data):
    layout = data.draw(layouts())
    config = data.draw(configs(layout, selection="topk"))
    layer = data.draw(st.integers(0, 2))
    q, k = qk_inputs(layout, data.draw(st.integers(0, 2**16)))
    bp = selection_of(q, k, layout, config, layer)
    sel, real = bp.sel, bp.unit_real
    assert bool((sel | ~bp.is_self).all()), "self chunk dropped"
    counts = sel[:, :, real].sum(-1)
    want = min(config.topk, bp.plan.num_chunks)
    assert bool((counts == want).all()), (counts.unique(), want)


@settings(max_examples=200)
@given(data=st.data())
def test_threshold_is_monotone_in_tau_and_keeps_self(data):
    layout = data.draw(layouts())
    config = data.draw(configs(layout, selection="threshold"))
    layer = data.draw(st.integers(0, 2))
    q, k = qk_inputs(layout, data.draw(st.integers(0, 2**16)))
    taus = sorted(data.draw(st.lists(st.floats(0.01, 1.2), min_size=2, max_size=4)))
    prev = None
    for tau in taus:
        cfg = dataclasses.replace(config, threshold=tau)
        bp = selection_of(q, k, layout, cfg, layer)
        sel = bp.sel[:, :, bp.unit_real]
        assert bool((sel | ~bp.is_self[bp.unit_real]).all()), "self chunk dropped"
        if bp.plan.num_chunks > 1:
            # the reference's quirk: at least one other chunk per scope
            other = sel & ~bp.is_self[bp.unit_real]
            per_scope = other.any(-1) if cfg.scope.value == "query" else other.flatten(2).any(-1)
            assert bool(per_scope.all())
        if tau >= 1:
            assert bool(sel.all()), "threshold >= 1 must keep every chunk"
        if prev is not None:
            assert bool((prev <= sel).all()), f"raising tau to {tau} removed a pair"
        prev = sel


def _sorted_and_pairwise(monkeypatch, fn):
    """``fn()`` with the sort-based ranking (eager's) and with the pairwise one (compiled's)."""
    from vmoba_compile import selection

    monkeypatch.setattr(selection, "_pairwise", lambda n: False)
    by_sort = fn()
    monkeypatch.setattr(selection, "_pairwise", lambda n: True)
    return by_sort, fn()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_pairwise_ranking_selects_what_the_sort_selects(data):
    """Under compilation TOPK and THRESHOLD rank by comparison instead of sorting; the selection
    must be the sort's, ties included (gates drawn from a few dyadic values tie often and sum
    exactly in any order)."""
    import pytest

    from vmoba_compile.config import Scope, Selection, VMoBAConfig
    from vmoba_compile.selection import select

    b, h = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    u, c = data.draw(st.integers(1, 12)), data.draw(st.integers(2, 9))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans()):
        g = torch.randint(0, 5, (b, h, u, c), generator=gen).float() / 4
    else:
        g = torch.randn(b, h, u, c, generator=gen)
    own = torch.randint(0, c, (u,), generator=gen)
    is_self = own[:, None] == torch.arange(c)
    unit_real = torch.rand(u, generator=gen) < 0.8
    if data.draw(st.booleans()):
        cfg = VMoBAConfig(selection=Selection.TOPK, topk=data.draw(st.integers(1, c - 1)))
    else:
        cfg = VMoBAConfig(
            selection=Selection.THRESHOLD,
            threshold=data.draw(st.sampled_from([0.05, 0.1, 0.25, 0.4, 0.5, 0.75, 0.9])),
            scope=data.draw(st.sampled_from(list(Scope))),
        )
    with pytest.MonkeyPatch.context() as mp:
        by_sort, pairwise = _sorted_and_pairwise(mp, lambda: select(g, is_self, unit_real, cfg))
    assert torch.equal(by_sort, pairwise), (cfg, g, by_sort ^ pairwise)
