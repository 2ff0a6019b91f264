"""Layer indices count video self-attention modules only (:mod:`vmoba_compile.numbering`).

Without a family adapter the candidates are attention modules by class name; one that is
cross-attention but unmarked must not take a layer index, or every later layer runs the next
partition of the schedule. The property: whatever the blocks hold, in whatever order, with the
whole model or block by block compiled, the optimized model runs (by its outputs and its
account) exactly what the same model with every cross-attention module marked runs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import _CHUNKS, TOY_LAYOUT, ToyAttention, toy_inputs

from vmoba_compile import VMoBAConfig, explain, optimize
from vmoba_compile.numbering import LayerNumbering


class ToyBlock(torch.nn.Module):
    """Attention modules of the given kinds, registered in that order and called in ``order``
    (registration order by default)."""

    def __init__(
        self, kinds: list[str], order: list[int] | None = None, graph_break: bool = False
    ) -> None:
        super().__init__()
        self.attns = torch.nn.ModuleList(ToyAttention(k) for k in kinds)
        self.order = order if order is not None else list(range(len(kinds)))
        self.graph_break = graph_break  # between the calls: each in a graph of its own

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for i in self.order:
            x = self.attns[i](x, ctx)
            if self.graph_break:
                torch._dynamo.graph_break()
        return x


class ToyDiT(torch.nn.Module):
    def __init__(self, blocks: list[list[str]]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyBlock(kinds) for kinds in blocks)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        return x


def _marked(model: ToyDiT) -> ToyDiT:
    """A copy with every cross-attention module marked (``is_cross_attention = True``)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, ToyAttention) and m.kind == "cross":
            m.is_cross_attention = True
    return twin


def _plan(opt) -> list[tuple[str, int, str]]:
    return sorted({(c.module, c.layer_index, c.partition) for c in opt.report.rewritten})


def _self_modules(model: ToyDiT) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ToyAttention) and m.kind == "self"]


blocks_strategy = st.lists(
    st.lists(st.sampled_from(["self", "cross"]), min_size=1, max_size=3), min_size=2, max_size=5
).filter(lambda bs: any("self" in b for b in bs))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=blocks_strategy,
    schedule=st.sampled_from([("1d", "2d", "3d"), ("3d", "1d"), ("2d", "1d", "3d")]),
    regional=st.booleans(),
)
def test_unmarked_cross_attention_takes_no_layer(blocks, schedule, regional) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ToyDiT(blocks)
    config = VMoBAConfig(schedule=schedule, **_CHUNKS)
    x, c = toy_inputs()
    want_opt = optimize(_marked(model), config, layout=TOY_LAYOUT, lowering="aot_eager",
                        regional=regional)  # fmt: skip
    opt = optimize(model, config, layout=TOY_LAYOUT, lowering="aot_eager", regional=regional)
    selfs = _self_modules(model)
    expected = [(m, i, config.partition_for(i).value) for i, m in enumerate(selfs)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "numbered as video" warning
        want = want_opt(x, c)
        got = opt(x, c)
        again = opt(x, c)
    assert _plan(want_opt) == sorted(expected)
    assert _plan(opt) == sorted(expected), opt.report
    assert torch.equal(got, want) and torch.equal(again, want)
    ran = opt.report.executions
    assert [ran[m].vmoba_forward for m in selfs] == [2] * len(selfs), opt.report
    crosses = [n for n, m in model.named_modules() if getattr(m, "kind", None) == "cross"]
    assert all(ran[m].vmoba_forward == 0 for m in crosses if m in ran)
    assert list(opt._vmoba_layer_of) == selfs
    # explain follows the same rule (its own trace learns, the model's numbering is untouched)
    report = explain(model, (x, c), config=config, layout=TOY_LAYOUT)
    assert sorted({(r.module, r.layer_index, r.partition) for r in report.rewritten}) == sorted(
        expected
    )


@pytest.mark.parametrize("graph_break", [False, True])
def test_a_numbering_never_moves_an_index_a_graph_holds(graph_break: bool) -> None:
    """A cross-attention module numbered before a self-attention module it runs after: in one
    graph, the graph's cross-attention calls are learned before any call is decided, so the
    self-attention module gets layer 0. In graphs of their own (a graph break between them),
    taking it out would move the index the first graph already holds: the numbering stays and
    the run-time warning names the module and the fix."""
    model = ToyDiT([["self"], ["self"]])
    model.blocks[0] = ToyBlock(["cross", "self"], order=[1, 0], graph_break=graph_break)
    opt = optimize(model, VMoBAConfig(**_CHUNKS), layout=TOY_LAYOUT, lowering="aot_eager")
    x, c = toy_inputs()
    if not graph_break:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            opt(x, c)
        assert _plan(opt) == [("blocks.0.attns.1", 0, "1d"), ("blocks.1.attns.0", 1, "2d")]
        return
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"blocks\.0\.attns\.0 is numbered"):
        opt(x, c)
    assert _plan(opt) == [("blocks.0.attns.1", 1, "2d"), ("blocks.1.attns.0", 2, "3d")]


def test_layer_numbering_unit() -> None:
    n = LayerNumbering(["a", "b", "c", "d"], learns=True)
    n.hold("a")
    assert n.learn_cross("b") and dict(n) == {"a": 0, "c": 1, "d": 2} and n.cross == ("b",)
    assert not n.final("d") and n.final("c")
    n.hold("d")  # d holds 2: taking c out would move it
    assert not n.learn_cross("c") and dict(n) == {"a": 0, "c": 1, "d": 2}
    assert not n.learn_cross("a")  # a holds its index: it made a non-cross call
    twin = n.copy()
    assert dict(twin) == dict(n) and twin.learn_cross("c") and dict(twin) == {"a": 0, "d": 1}
    fixed = LayerNumbering(["a", "b"], learns=False)
    assert not fixed.learn_cross("a") and dict(fixed) == {"a": 0, "b": 1}
