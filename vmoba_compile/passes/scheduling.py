"""Kernel order of a compiled graph: keep the program order that fusion scrambles.

Why: with activation checkpointing, the VMoBA model's training backward (Wan-1.3B config, 55,296
tokens, 8 layers, H100, torch 2.11) peaked at 26.9 GiB against dense ``torch.compile``'s 10.1 GiB,
and 30 layers ran out of memory. The FX graph inductor receives was not the cause: its peak does
not grow with depth (tiny Wan on the CPU, 2 and 8 layers) and on the H100 it is alike for dense
and VMoBA. After fusion, inductor re-sorts its kernels depth-first, visiting them by their
earliest member and placing each one's inputs first, so a kernel that fused an early node with a
later one brings the later one's whole input chain (recomputed activations) forward. Inductor's
peak-memory pass (``reorder_for_peak_memory``) then estimates three other orders and keeps the
lowest: for the dense graph its LPMF order got 7.7 GiB; for the VMoBA graph none beat the
re-sorted order's 25 GiB (35-58 GiB), so that one ran.

:func:`keep_program_order` is inductor's ``_post_fusion_custom_pass`` (installed as
:data:`PROGRAM_ORDER_PASS`, a scheduler pass whose ``uuid()`` hashes this file, so inductor's FX
graph cache keeps working with it; a plain function would make inductor bypass that cache on
every compile, and each new process would pay the cold compile again): a Kahn topological sort
that, of the kernels whose inputs are ready, always runs the one that came first in the program
(smallest ``min_order``); nothing is pulled forward by a fused neighbour. Replayed on the recorded
planning graph of that backward (``scripts/memory_graph.py``), the same fused kernels in this
order peak at 8.7 GiB instead of 25.8 (dense's graph: 8.4). Measured on the H100 with the pass,
the 8-layer step peaks at 10.3 GiB (dense 10.1) and 30 layers at 19.5 GiB (dense 19.4)
(``docs/design.md``). Inductor's peak-memory pass still runs afterwards and
keeps whichever order it estimates lowest, ours included.
"""

from __future__ import annotations

import heapq
from typing import Any

from .._compat import SchedulerPassBase, hash_for_files

__all__ = ["PROGRAM_ORDER_PASS", "ProgramOrderPass", "keep_program_order"]


def keep_program_order(nodes: list[Any]) -> list[Any]:
    """Inductor scheduler pass (``config._post_fusion_custom_pass``): the fused kernels in a
    topological order that follows the program order (``min_order``) wherever the dependencies
    allow it.

    The dependencies are the ones inductor's own topological sort obeys: each node's
    ``unmet_dependencies`` (reads, and the weak dependencies that order mutations) that name a
    buffer written by another node of ``nodes``. If they do not form a DAG (never seen), the input
    order is returned unchanged.
    """
    writer = {name: i for i, node in enumerate(nodes) for name in node.get_buffer_names()}
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        sources = {writer[d.name] for d in node.unmet_dependencies if writer.get(d.name, i) != i}
        waiting[i] = len(sources)
        for j in sources:
            readers[j].append(i)

    def rank(i: int) -> tuple[int, int]:
        return (getattr(nodes[i], "min_order", i), i)

    ready = [rank(i) for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[Any] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, rank(j))
    if len(order) != len(nodes):
        return list(nodes)
    return order


class ProgramOrderPass(SchedulerPassBase):
    """:func:`keep_program_order` as an inductor scheduler pass that its FX graph cache accepts.

    ``uuid()`` is a hash of this module's source: a changed pass gets a new cache key, an
    unchanged one lets a second process load the first one's compiled graphs.
    """

    def __call__(self, nodes: list[Any]) -> list[Any]:
        return keep_program_order(nodes)

    def uuid(self) -> Any:
        return hash_for_files((__file__,))

    def __repr__(self) -> str:
        return "ProgramOrderPass()"


PROGRAM_ORDER_PASS = ProgramOrderPass()
