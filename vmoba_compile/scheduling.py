"""Kernel order of a compiled graph: keep the program order that fusion scrambles.

Why: with activation checkpointing, the VMoBA model's training backward (Wan-1.3B config, 55,296
tokens, 8 layers, H100, torch 2.11) peaked at 26.9 GiB against dense ``torch.compile``'s 10.1 GiB,
and 30 layers ran out of memory. The FX graph inductor receives is in a good order (one layer's
recomputation at a time: ``benchmarks/README.md``, eighth session). After fusion, inductor re-sorts
its kernels with a depth-first topological sort by each kernel's earliest member; a kernel that
fused an early node with a later one pulls the later one's inputs, and their whole chains of
recomputed activations, ahead of where they were needed, for several layers at once. Inductor's
peak-memory pass (``reorder_for_peak_memory``) then tries three other orders and keeps the one with
the lowest estimate: for the dense graph its LPMF order gets 7.7 GiB, for the VMoBA graph none of
them beats the scrambled 25 GiB (36-58 GiB estimated), so that one ran.

:func:`keep_program_order` is inductor's ``_post_fusion_custom_pass``: a Kahn topological sort
that, of the kernels whose inputs are ready, always runs the one that came first in the program
(smallest ``min_order``). A kernel is never moved before its inputs are computed, and nothing is
pulled forward by a fused neighbour. Replayed on the recorded planning graph of that backward
(``scripts/memory_graph.py``), this order's estimated peak is 8.7 GiB (dense: 8.4). Inductor's
peak-memory pass still runs afterwards and keeps whichever order it estimates lowest, ours
included, so the pass cannot raise the estimate it is judged by.
"""

from __future__ import annotations

import heapq
from typing import Any

__all__ = ["keep_program_order"]


def keep_program_order(nodes: list[Any]) -> list[Any]:
    """Inductor scheduler pass (``config._post_fusion_custom_pass``): the fused kernels in a
    topological order that follows the program order (``min_order``) wherever the dependencies
    allow it.

    The dependencies are the ones inductor's own topological sort obeys: each node's
    ``unmet_dependencies`` (reads, and the weak dependencies that order mutations) that name a
    buffer written by another node of ``nodes``. If they do not form a DAG (never seen), the input
    order is returned unchanged.
    """
    writer: dict[str, Any] = {}
    for node in nodes:
        for name in node.get_buffer_names():
            writer[name] = node
    position = {id(node): i for i, node in enumerate(nodes)}
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        sources = {
            position[id(writer[dep.name])]
            for dep in node.unmet_dependencies
            if dep.name in writer and writer[dep.name] is not node
        }
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
