"""Layer numbering: which VMoBA layer (and so which partition) each video self-attention module is.

A family adapter names its model's self-attention modules, and that numbering is final. Without
one (``optimize(model, layout=...)`` and the structural fallback) the candidates are the
attention modules by class name, less those marked as cross-attention; an unmarked
cross-attention module is among them. Numbering it would shift every later layer one step along
the 1D-2D-3D schedule, so a two-partition schedule could run 1D in every self-attention layer.

Here such a numbering *learns*: when a compiled graph shows a candidate's call to be
cross-attention (its query and key lengths differ), the module leaves the numbering and the
modules after it move up one index, so layer indices count video self-attention modules only.
A graph's cross-attention calls are learned before any of its calls is decided. A graph holds
the layer index it was compiled with, so an index that a compiled graph already holds never
changes: where learning would move one (a cross-attention module compiled in a later graph
than a later-numbered self-attention module that runs before it, or one that also made a
self-attention call), the numbering stays as it is, and the optimized model's run-time warning
names the module and the fix (mark it as cross-attention). Blocks compiled one variant at a
time find their variant by the numbering as it stands when they are called
(:class:`~vmoba_compile.regional.RegionalBlocks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

__all__ = ["LayerNumbering"]


class LayerNumbering(Mapping[str, int]):
    """Module path -> layer index of the video self-attention modules, in model order.

    Args:
        candidates: the modules numbered when the model was optimized, in model order.
        learns: whether cross-attention calls may take a module out (no adapter, or the
            structural one); a family adapter's numbering is fixed.
    """

    def __init__(self, candidates: Iterable[str], learns: bool) -> None:
        self.candidates = tuple(candidates)
        self.learns = learns
        self.cross: tuple[str, ...] = ()  # candidates taken out, in the order learned
        self._held: dict[str, int] = {}  # module -> the index a compiled graph holds
        self._index = {m: i for i, m in enumerate(self.candidates)}

    def __getitem__(self, module: str) -> int:
        return self._index[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"LayerNumbering({self._index}, cross={list(self.cross)})"

    def copy(self) -> LayerNumbering:
        """The same numbering and learned cross-attention modules, no index held by a graph
        (for a copy of the model, or :func:`~vmoba_compile.explain`'s own compile)."""
        twin = LayerNumbering(self.candidates, self.learns)
        twin.cross, twin._index = self.cross, dict(self._index)
        return twin

    def hold(self, module: str) -> None:
        """A compiled graph decided a call of ``module`` by its index: the index is fixed."""
        if module in self._index:
            self._held.setdefault(module, self._index[module])

    def note(self, module: str, cross: bool) -> None:
        """What one decided call of ``module`` teaches: a cross-attention call takes the
        module out (:meth:`learn_cross`); any other decision fixes its index (:meth:`hold`)."""
        if cross:
            self.learn_cross(module)
        else:
            self.hold(module)

    def learn_cross(self, module: str) -> bool:
        """A compiled graph showed a call of candidate ``module`` to be cross-attention: take
        it out of the numbering unless that moves an index a graph holds (or its own).
        Returns whether the numbering changed."""
        if not self.learns or module not in self._index or module in self._held:
            return False
        kept = [m for m in self.candidates if m != module and m not in self.cross]
        index = {m: i for i, m in enumerate(kept)}
        if any(index.get(m) != i for m, i in self._held.items()):
            return False
        self.cross, self._index = (*self.cross, module), index
        return True

    def final(self, module: str) -> bool:
        """Whether ``module``'s index can no longer change: every candidate before it is held
        by a graph or taken out (or the numbering does not learn)."""
        if not self.learns:
            return True
        for m in self.candidates:
            if m == module:
                return True
            if m not in self._held and m not in self.cross:
                return False
        return True
