"""The scheduler pass that keeps inductor's kernels in program order (`passes.scheduling`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from torch._inductor.scheduler import Scheduler

from vmoba_compile.passes.scheduling import keep_program_order


@dataclass(frozen=True)
class Dep:
    name: str


@dataclass(eq=False)
class Node:
    """What the pass and inductor's own topological sort read of a scheduler node."""

    name: str
    min_order: int
    reads: tuple[str, ...] = ()
    size: int = 0
    unmet_dependencies: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.unmet_dependencies = {Dep(r) for r in self.reads}

    def get_buffer_names(self) -> set[str]:
        return {self.name}


def is_topological(order: list[Node]) -> bool:
    done: set[str] = set()
    names = {n.name for n in order}
    for n in order:
        if any(r in names and r not in done for r in n.reads):
            return False
        done.add(n.name)
    return True


def peak_bytes(order: list[Node]) -> int:
    """Each node's output lives from its step to its last reader's step."""
    step = {n.name: i for i, n in enumerate(order)}
    last = {n.name: step[n.name] for n in order}
    for n in order:
        for r in n.reads:
            last[r] = max(last[r], step[n.name])
    return max(
        sum(n.size for n in order if step[n.name] <= i <= last[n.name]) for i in range(len(order))
    )


def two_layers() -> list[Node]:
    """The shape of a checkpointed backward after fusion: layer B's gradient kernels (program
    order 0-5) first, then layer A's recomputation (6-8, large activations) and its gradient
    (9), which reads all three activations. One of B's kernels (min_order 2) was fused with a
    consumer of A's recomputation, so it also reads ``a3``; everything after it in B does not
    need A."""
    return [
        Node("b0", 0, size=1),
        Node("b1", 1, ("b0",), size=1),
        Node("fused", 2, ("b1", "a3"), size=1),
        Node("b3", 3, ("b1",), size=1),
        Node("b4", 4, ("b3",), size=100),
        Node("b5", 5, ("b4",), size=1),
        Node("a1", 6, (), size=100),
        Node("a2", 7, ("a1",), size=100),
        Node("a3", 8, ("a2",), size=100),
        Node("g", 9, ("a1", "a2", "a3", "fused", "b5"), size=1),
    ]


def test_a_fused_kernel_does_not_pull_recomputation_ahead() -> None:
    nodes = two_layers()
    inductor = Scheduler.topological_sort_schedule(None, nodes)  # depth-first by min_order
    ours = keep_program_order(nodes)
    assert sorted(n.name for n in ours) == sorted(n.name for n in nodes)
    assert is_topological(ours)
    # inductor's sort runs A's recomputation before B's big b4; ours after B is done with it
    names = [n.name for n in ours]
    assert names.index("b5") < names.index("a1")
    assert [n.name for n in inductor].index("a1") < [n.name for n in inductor].index("b4")
    assert peak_bytes(ours) < peak_bytes(inductor)


def test_a_cycle_leaves_the_order_unchanged() -> None:
    nodes = [Node("x", 0, ("y",)), Node("y", 1, ("x",)), Node("z", 2)]
    assert keep_program_order(nodes) == nodes


@st.composite
def dags(draw) -> list[Node]:
    n = draw(st.integers(1, 12))
    orders = draw(st.permutations(range(n)))
    nodes = []
    for i in range(n):  # node i reads only nodes made before it: a DAG in list order
        reads = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        nodes.append(Node(f"n{i}", orders[i], tuple(f"n{r}" for r in reads)))
    return nodes


@settings(max_examples=200, deadline=None)
@given(dags())
def test_any_dag_gets_a_topological_order_of_every_node(nodes: list[Node]) -> None:
    order = keep_program_order(nodes)
    assert sorted(id(n) for n in order) == sorted(id(n) for n in nodes)
    assert is_topological(order)
    by_program = sorted(nodes, key=lambda n: n.min_order)
    if is_topological(by_program):  # program order is legal: it is kept exactly
        assert order == by_program


def test_recorded_wan_backward_needs_well_under_half_the_memory(monkeypatch) -> None:
    """Inductor's planning graph of the 8-layer Wan-1.3B VMoBA training backward (55,296 tokens,
    checkpointing; recorded on the H100 with ``scripts/memory_graph.py``): in the order inductor
    had after fusion its estimated peak is 25.8 GiB (it ran out of memory at 30 layers); in the
    pass's order it must stay under 40% of that (8.7 GiB, 34%, when recorded; dense
    ``torch.compile``'s own graph reached 7.7 GiB by inductor's estimate)."""
    monkeypatch.syspath_prepend("scripts")
    import memory_graph

    path = "benchmarks/results/h100_2026-11-27_model8_vmoba_backward_memory_graph.json.gz"
    nodes, bufs = memory_graph.load(path)
    users = memory_graph.consumers(nodes, bufs)
    recorded = memory_graph.peak(nodes, bufs, users)[0]
    ours = memory_graph.peak(memory_graph.program_order(nodes, bufs), bufs, users)[0]
    assert recorded > 25 * 2**30
    assert ours < 0.4 * recorded


def test_inductor_hands_the_pass_nodes_it_can_read() -> None:
    """Against the installed torch: inductor calls the hook with scheduler nodes that have what the
    pass reads (``get_buffer_names``, ``unmet_dependencies``, ``min_order``), and the compiled
    function, scheduled by the pass, still computes the eager result."""
    import torch

    seen: list[list] = []

    def spy(nodes):
        seen.append(list(nodes))
        return keep_program_order(nodes)

    def f(x, w):
        h = torch.relu(x @ w)  # an extern matmul, then fused pointwise and reduction kernels
        return (h.sin() + h.sum(0)).cos() @ w.t(), h.amax(1)

    torch._dynamo.reset()
    compiled = torch.compile(f, options={"_post_fusion_custom_pass": spy})
    x, w = torch.randn(32, 16), torch.randn(16, 16)
    got, want = compiled(x, w), f(x, w)
    assert seen and len(seen[0]) >= 2
    for node in seen[0]:
        assert isinstance(node.min_order, int) and node.get_buffer_names()
        assert all(isinstance(d.name, str) for d in node.unmet_dependencies)
    for g, e in zip(got, want, strict=True):  # fused float32 kernels round differently;
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)  # a bad order reads garbage


_CACHE_PROBE = """
import json
import torch
from torch._dynamo.utils import counters
from vmoba_compile.api import memory_inductor_defaults, safe_inductor_defaults

def f(x, w):
    h = torch.relu(x @ w)
    return (h.sin() + h.sum(0)).cos()

options = {**safe_inductor_defaults(), **memory_inductor_defaults()}
torch.compile(f, options=options)(torch.randn(8, 8), torch.randn(8, 8))
print(json.dumps({k: int(v) for k, v in counters["inductor"].items()}))
"""


def test_pass_uuid_follows_the_source() -> None:
    """The cache key part inductor takes from the pass: stable, and a hash of this module's
    source (a changed pass must not load graphs scheduled by the old one)."""
    import hashlib
    from pathlib import Path

    from vmoba_compile import _compat
    from vmoba_compile.passes import scheduling

    if _compat.SchedulerPassBase.__module__ != "torch._inductor.custom_graph_pass":
        pytest.skip("this torch has no CustomSchedulerPass protocol")
    got = scheduling.PROGRAM_ORDER_PASS.uuid()
    assert got == scheduling.ProgramOrderPass().uuid()
    assert got == hashlib.sha256(Path(scheduling.__file__).read_bytes()).digest()


@pytest.mark.compiled
@pytest.mark.slow
def test_second_process_hits_the_fx_graph_cache(tmp_path) -> None:
    """With optimize's inductor defaults (the program-order pass installed), a second process
    loads the first one's compiled graph from inductor's FX graph cache instead of bypassing it
    (a plain function as ``_post_fusion_custom_pass`` bypasses the cache on every compile)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vmoba_compile import _compat

    if _compat.SchedulerPassBase.__module__ != "torch._inductor.custom_graph_pass":
        pytest.skip("this torch has no CustomSchedulerPass protocol")
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first.get("fxgraph_cache_miss", 0) > 0 and first.get("fxgraph_cache_bypass", 0) == 0
    assert second.get("fxgraph_cache_hit", 0) > 0, second
    assert second.get("fxgraph_cache_bypass", 0) == 0 and second.get("fxgraph_cache_miss", 0) == 0
