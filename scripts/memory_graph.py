"""Inductor's peak-memory planning graphs, for studying the order of a compiled backward offline.

Run a compile with ``TORCH_TRACE=DIR`` and the inductor option
``reorder_for_peak_memory_debug=true`` (e.g. ``bench_model.py --options
reorder_for_peak_memory_debug=true``); inductor then writes each graph's fused nodes, their buffers,
sizes and dependencies into the trace. This script:

- ``extract DIR OUT``: copies every such graph out of the trace as ``OUT/<graph>.json`` (the trace
  itself is too large to keep);
- ``simulate FILE.json[.gz]``: replays the graph in its recorded order (the order inductor had
  after fusion) and in the order :func:`~vmoba_compile.passes.keep_program_order` gives it,
  and reports each one's peak and the largest buffers alive there, counted the way inductor's
  ``estimate_peak_memory`` counts them.

Two recorded graphs (8-layer Wan-1.3B training backward, 55,296 tokens, H100, torch 2.11) are in
``benchmarks/results/h100_2026-11-27_model8_*_backward_memory_graph.json.gz``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sys


def extract(trace_dir: str, out: str) -> list[str]:
    """Each planning-graph artifact of the trace: a metadata line naming ``*_fused``, then its
    payload as tab-indented lines."""
    os.makedirs(out, exist_ok=True)
    graphs: dict[str, list[str]] = {}
    for path in glob.glob(os.path.join(trace_dir, "*.log")):
        payload = None
        with open(path) as f:
            for line in f:
                if line.startswith("\t"):
                    if payload is not None:
                        payload.append(line[1:])
                    continue
                m = re.search(r'"artifact": \{"name": "([^"]+_fused)"', line)
                payload = graphs.setdefault(re.sub(r"[^\w.-]", "_", m.group(1)), []) if m else None
    written = []
    for name, lines in graphs.items():
        dest = os.path.join(out, f"{name}.json")
        with open(dest, "w") as g:
            g.write("".join(lines))
        written.append(dest)
    return written


def load(path: str) -> tuple[list[dict], dict[str, dict]]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        g = json.load(f)
    return g["nodes"], {b["name"]: b for b in g["buffers"]}


def consumers(nodes: list[dict], bufs: dict[str, dict]) -> dict[str, set[str]]:
    """Buffer name -> names of the nodes that read it (a buffer's ``deps`` are the buffers its
    defining node reads)."""
    owner = {b: n["name"] for n in nodes for b in n["buffer_names"]}
    users: dict[str, set[str]] = {b: set() for b in bufs}
    for b in bufs.values():
        if b["name"] in owner:
            for d in b["deps"]:
                users.setdefault(d, set()).add(owner[b["name"]])
    return users


def peak(order: list[dict], bufs: dict[str, dict], users: dict[str, set[str]]):
    """Peak bytes of ``order`` and the buffers alive there, counted as inductor's
    ``estimate_peak_memory`` does: a buffer is allocated at its node's step (an input at step 0)
    and freed after its last reader's step (an output stays to the end)."""
    pos = {n["name"]: i for i, n in enumerate(order)}
    owner = {b: i for i, n in enumerate(order) for b in n["buffer_names"]}
    steps = len(order)
    mem = [0] * (steps + 1)
    span = {}
    for b in bufs.values():
        if not b["is_input"] and b["name"] not in owner:
            continue
        start = 0 if b["is_input"] else owner[b["name"]]
        readers = [pos[u] for u in users.get(b["name"], ()) if u in pos]
        stop = steps - 1 if b["is_output"] else max(readers, default=start)
        span[b["name"]] = (start, stop)
        mem[start] += b["size_alloc"]
        mem[stop + 1] -= b["size_free"]
    cur, best, at = 0, 0, 0
    for i in range(steps):
        cur += mem[i]
        if cur > best:
            best, at = cur, i
    live = [n for n, (s, e) in span.items() if s <= at <= e]
    return best, at, live


class _Node:
    """A recorded node as the scheduler pass sees one: its buffers, the buffers it reads, and its
    program position (the smallest ``opN`` index in its name: inductor names operations in the
    order it created them)."""

    def __init__(self, node: dict, bufs: dict[str, dict]) -> None:
        self.node = node
        self.names = set(node["buffer_names"])
        self.unmet_dependencies = [
            _Dep(d) for b in node["buffer_names"] for d in bufs[b]["deps"] if d not in self.names
        ]
        self.min_order = min((int(i) for i in re.findall(r"op(\d+)", node["name"])), default=0)

    def get_buffer_names(self) -> set[str]:
        return self.names


class _Dep:
    def __init__(self, name: str) -> None:
        self.name = name


def program_order(nodes: list[dict], bufs: dict[str, dict]) -> list[dict]:
    from vmoba_compile.passes.scheduling import keep_program_order

    return [n.node for n in keep_program_order([_Node(n, bufs) for n in nodes])]


def main() -> None:
    if sys.argv[1] == "extract":
        for p in extract(sys.argv[2], sys.argv[3]):
            print(p, os.path.getsize(p))
    elif sys.argv[1] == "simulate":
        nodes, bufs = load(sys.argv[2])
        users = consumers(nodes, bufs)
        print(f"{len(nodes)} nodes, {len(bufs)} buffers")
        for label, order in (("recorded", nodes), ("program", program_order(nodes, bufs))):
            best, at, live = peak(order, bufs, users)
            print(f"{label} order: peak {best / 2**30:.2f} GiB at node {at}; largest alive:")
            for name in sorted(live, key=lambda n: -bufs[n]["size_free"])[:8]:
                print(f"  {bufs[name]['size_free'] / 2**20:9.1f} MiB {name}")


if __name__ == "__main__":
    main()
