"""Every knob of VMoBA, validated once, in one frozen dataclass.

Shape legend used across the package: B batch, H query heads, S tokens in one attention call,
D head dim; the video grid is frames x height x width in tokens (never "H" for height).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

__all__ = [
    "CUDA_INFERENCE_KERNEL_OPTIONS",
    "CUDA_KERNEL_OPTIONS",
    "PRESETS",
    "Granularity",
    "Kernel",
    "Partition",
    "Scope",
    "Selection",
    "TokenOrder",
    "VMoBAConfig",
]


_E = TypeVar("_E", bound=Enum)


class Partition(str, Enum):
    """How the video grid is cut into chunks: frames (1D), tiles (2D) or cubes (3D)."""

    D1 = "1d"  # temporal: ct consecutive frames
    D2 = "2d"  # spatial: a cy x cx tile through all frames
    D3 = "3d"  # spatio-temporal: a ct x cy x cx cube


class Selection(str, Enum):
    """How each query unit picks chunks: a fixed count (top-k) or a share of the gate mass."""

    TOPK = "topk"
    THRESHOLD = "threshold"


class Scope(str, Enum):
    """Over what the THRESHOLD budget is shared: each query unit, or each head as a whole."""

    QUERY = "query"  # each query unit of each head on its own (reference `query_head`)
    HEAD = "head"  # all (query unit, chunk) pairs of one head: the paper's global selection


class Granularity(str, Enum):
    """What one query unit is: a query block (BLOCK) or a query token (TOKEN)."""

    BLOCK = "block"  # one query block of `block_size` tokens inside one chunk: the fast mode
    TOKEN = "token"  # one query token: exactly the paper's semantics


class TokenOrder(str, Enum):
    """In what order TOKEN granularity hands the video query rows of each head to the kernel."""

    SORTED = "sorted"  # grouped by selection pattern per head: nearly uniform query blocks
    NATURAL = "natural"  # the padded chunk order (every block partial, union mask near dense)
    # each (query, chosen chunk) a row of its own, outputs merged by log-sum-exp (MoBA's
    # formulation): work equal to the token density, on FlashAttention-4 only
    PAIRS = "pairs"


class Kernel(str, Enum):
    """Which attention kernel runs a VMoBA call's block-sparse attention."""

    AUTO = "auto"  # FlashAttention-4 where it is installed and faster, else Triton
    FLASH = "flash"  # FlashAttention-4 (CuTe DSL) through FlexAttention's FLASH backend
    TRITON = "triton"  # FlexAttention's Triton template (every device, every dtype)


def _enum(cls: type[_E], field: str, value: object) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
    allowed = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"VMoBAConfig.{field} must be one of {allowed}; got {value!r}.")


def _chunk(field: str, value: object, n: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and n == 1:
        value = (value,)
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(
            f"VMoBAConfig.{field} must be None (automatic from the grid) or a tuple of {n} ints; "
            f"got {value!r}."
        )
    if any(v < 1 for v in value):
        raise ValueError(f"VMoBAConfig.{field} entries must be >= 1; got {tuple(value)!r}.")
    return tuple(value)


def _kernel_options(value: object) -> tuple[tuple[str, int | bool], ...] | None:
    if value is None:
        return None
    try:
        items = sorted(dict(value).items())  # type: ignore[call-overload]  # checked below
    except (TypeError, ValueError):
        items = None
    if items is None or not all(
        isinstance(k, str) and k and isinstance(v, (int, bool)) for k, v in items
    ):
        raise ValueError(
            f"VMoBAConfig.kernel_options must be None (the library's defaults), {{}} (PyTorch's "
            f"defaults) or a mapping of FlexAttention kernel option names to ints or bools, e.g. "
            f"{{'BLOCK_M': 128, 'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2}}; got {value!r}."
        )
    return tuple(items)


# FlexAttention kernel options of VMoBAConfig(kernel_options=None) on CUDA. Measured on the H100
# at 55,296 tokens (benchmarks/README.md, kernel options), default config, 2D and 3D layers:
# USE_TMA (tensor-memory loads) took the forward from 12.77-12.97 to 12.04-12.15 ms and forward +
# backward from 45.79-46.46 to 44.74-44.82 ms; where TMA cannot be used (alignment, older GPUs)
# inductor falls back. PRESCALE_QK (q scaled once instead of every score) took the forward to
# 11.56-11.65 ms, but forward + backward to 49.26-49.58 ms, and with it in the forward alone the
# training gradients of CogVideoX's key-norm bias (a gradient that softmax nearly cancels) left
# the GPU test's bound (4.5 vs 3.2, relative): it is added for calls without a backward only.
def _literal(name: str, value: object) -> str:
    """``value`` as VMoBAConfig's constructor takes it: an enum by its string, a tuple of enums
    as a tuple of strings, ``kernel_options`` as a dict."""
    if isinstance(value, Enum):
        return repr(value.value)
    if name == "kernel_options" and isinstance(value, tuple):
        return repr(dict(value))
    if isinstance(value, tuple):
        items = [repr(v.value) if isinstance(v, Enum) else repr(v) for v in value]
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
    return repr(value)


CUDA_KERNEL_OPTIONS: dict[str, int | bool] = {"USE_TMA": True}
CUDA_INFERENCE_KERNEL_OPTIONS: dict[str, int | bool] = {**CUDA_KERNEL_OPTIONS, "PRESCALE_QK": True}

# Named points of the density/quality frontier (VMoBAConfig.preset). Quality: samples of the two
# 2,184-step models of benchmarks/quality against their dense samples, training-free, 16,384
# tokens (PSNR; first model / seed-1 model); end-to-end speed: benchmarks/bench_model.py
# --configs "fast;balanced;quality". "balanced" is the defaults.
PRESETS: dict[str, dict[str, object]] = {
    # 0.42-0.46 block density; 27.1 / 24.2 dB (head / query scope).
    "quality": {"threshold": 0.6},
    # 0.26-0.27; 23.5 / 20.4 dB.
    "balanced": {},
    # 0.16-0.17: the 2D partition alone at threshold 0.25 keeps the defaults' quality on the
    # seed-1 model (20.3 dB) and loses 0.8 dB on the first (22.8, head scope) at 0.6x their
    # density; the recurrent schedule at 0.25 loses 3.6-3.8 dB. Not trained with: for
    # training-free use.
    "fast": {"schedule": ("2d",), "threshold": 0.25},
}


@dataclasses.dataclass(frozen=True)
class VMoBAConfig:
    """VMoBA configuration (frozen; strings are accepted for every enum field).

    Attributes:
        schedule: partitions cycled over the rewritten self-attention layers: layer ``l`` uses
            ``schedule[l % len(schedule)]``. The paper's recurrent schedule is 1D, 2D, 3D.
        chunk_1d: ``(ct,)`` frames per temporal chunk; None picks one from the grid.
        chunk_2d: ``(cy, cx)`` spatial tile in tokens; None picks one from the grid.
        chunk_3d: ``(ct, cy, cx)`` cube in tokens; None picks one from the grid.
        selection: ``"threshold"`` (cumulative similarity, the paper's) or ``"topk"`` (MoBA's).
        topk: chunks kept per query unit in TOPK mode, self chunk included.
        threshold: share of the normalized gate mass to keep in THRESHOLD mode, in (0, 1];
            ``>= 1`` keeps every chunk.
        scope: THRESHOLD budget per query unit (``"query"``) or per head (``"head"``, global).
        granularity: ``"block"`` (fast: one selection per query block) or ``"token"`` (paper).
        block_size: tokens per attention block, for both queries and keys. 128 on GPU (smaller
            blocks break the H100 backward kernel); tests on CPU use small blocks.
        target_chunk_blocks: when a chunk shape is automatic, chunks aim at about this many
            blocks of ``block_size`` tokens (and at a whole number of blocks, to avoid padding).
        kernel_options: FlexAttention ``kernel_options`` for the attention kernel (tile sizes
            ``BLOCK_M`` / ``BLOCK_N``, ``num_warps``, ``num_stages``, ``USE_TMA``, the
            backward's ``BLOCK_M1`` ... ``BLOCK_N2``; a ``fwd_`` / ``bwd_`` prefix applies one
            to one direction), as a mapping of name to int or bool. None: on CUDA
            :data:`CUDA_KERNEL_OPTIONS`, or :data:`CUDA_INFERENCE_KERNEL_OPTIONS` for a call
            without a backward (measured on the H100), elsewhere PyTorch's defaults;
            ``{}``: PyTorch's defaults everywhere. Stored as sorted ``(name, value)`` pairs
            (hashable). ``benchmarks/bench_attention.py --configs NAME+OPTIONS`` measures
            candidates. They apply to the Triton kernel only.
        kernel: ``"auto"`` (default) runs FlashAttention-4 where :func:`vmoba_compile.kernels.
            choose_kernel` finds it installed, on a Hopper or newer GPU, for a BLOCK-granularity
            bf16/fp16 call of a supported head dim, and FlexAttention's Triton kernel otherwise;
            ``"flash"`` requires FlashAttention-4 (an error says why it cannot run);
            ``"triton"`` always uses Triton. The rewrite report says which kernel each call got.
        token_order: TOKEN granularity only: ``"sorted"`` (default; on an H100 faster than
            the chunk order in every partition, forward and training, benchmarks/README.md)
            hands each head's video
            query rows to the kernel grouped by selection (lexicographic order of their chunk
            rows, where that makes the query blocks' unions cost fewer key blocks than the
            chunk order does) and puts the output rows back, so that the block mask approaches
            the token density (:mod:`vmoba_compile.token_rows`). The result is the same up to
            float rounding. ``"natural"`` keeps the padded chunk order. ``"pairs"``: every
            (query, chosen chunk) pair is a row of its own and the outputs merge by
            log-sum-exp (MoBA's formulation, :mod:`vmoba_compile.token_pairs`), so the kernel
            computes the token density itself; it runs on FlashAttention-4 (``kernel="auto"``
            picks FA4 for it wherever FA4 can run); on Triton the rows are sorted. Checked
            against the reference on CPU with FA4's float64 stand-in; its GPU test and timings
            are pending (docs/design.md), so it is not the default.
    """

    schedule: tuple[Partition, ...] = (Partition.D1, Partition.D2, Partition.D3)
    chunk_1d: tuple[int] | None = None
    chunk_2d: tuple[int, int] | None = None
    chunk_3d: tuple[int, int, int] | None = None
    selection: Selection = Selection.THRESHOLD
    topk: int = 4
    threshold: float = 0.4
    scope: Scope = Scope.QUERY
    granularity: Granularity = Granularity.BLOCK
    block_size: int = 128
    target_chunk_blocks: int = 4
    kernel_options: tuple[tuple[str, int | bool], ...] | None = None
    kernel: Kernel = Kernel.AUTO
    token_order: TokenOrder = TokenOrder.SORTED

    if TYPE_CHECKING:
        # What the constructor accepts (the dataclass's generated __init__ at run time; the
        # fields above are what __post_init__ stores): enum fields take their string values,
        # chunks any int sequence, kernel_options a mapping.
        def __init__(
            self,
            schedule: Sequence[Partition | str] | Partition | str = ...,
            chunk_1d: Sequence[int] | int | None = None,
            chunk_2d: Sequence[int] | None = None,
            chunk_3d: Sequence[int] | None = None,
            selection: Selection | str = ...,
            topk: int = 4,
            threshold: float = 0.4,
            scope: Scope | str = ...,
            granularity: Granularity | str = ...,
            block_size: int = 128,
            target_chunk_blocks: int = 4,
            kernel_options: Mapping[str, int | bool]
            | Sequence[tuple[str, int | bool]]
            | None = None,
            kernel: Kernel | str = ...,
            token_order: TokenOrder | str = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        sched = self.schedule
        if isinstance(sched, (str, Partition)):
            sched = (sched,)
        if not isinstance(sched, Sequence) or len(sched) == 0:
            raise ValueError(
                f"VMoBAConfig.schedule must be a non-empty sequence of partitions such as "
                f"('1d', '2d', '3d'); got {self.schedule!r}."
            )
        object.__setattr__(self, "schedule", tuple(_enum(Partition, "schedule", p) for p in sched))
        object.__setattr__(self, "chunk_1d", _chunk("chunk_1d", self.chunk_1d, 1))
        object.__setattr__(self, "chunk_2d", _chunk("chunk_2d", self.chunk_2d, 2))
        object.__setattr__(self, "chunk_3d", _chunk("chunk_3d", self.chunk_3d, 3))
        for name, cls in (
            ("selection", Selection),
            ("scope", Scope),
            ("granularity", Granularity),
            ("kernel", Kernel),
            ("token_order", TokenOrder),
        ):
            object.__setattr__(self, name, _enum(cls, name, getattr(self, name)))
        if not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk < 1:
            raise ValueError(
                f"VMoBAConfig.topk must be an int >= 1 (chunks kept per query, self chunk "
                f"included); got {self.topk!r}."
            )
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
            or self.threshold <= 0
        ):
            raise ValueError(
                f"VMoBAConfig.threshold must be a finite number > 0 (share of gate mass to keep; "
                f">= 1 keeps every chunk); got {self.threshold!r}."
            )
        object.__setattr__(self, "threshold", float(self.threshold))
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 16 or bs & (bs - 1):
            raise ValueError(
                f"VMoBAConfig.block_size must be a power of two >= 16 (128 on GPU); got {bs!r}."
            )
        tcb = self.target_chunk_blocks
        if not isinstance(tcb, int) or isinstance(tcb, bool) or tcb < 1:
            raise ValueError(f"VMoBAConfig.target_chunk_blocks must be an int >= 1; got {tcb!r}.")
        object.__setattr__(self, "kernel_options", _kernel_options(self.kernel_options))

    def __repr__(self) -> str:
        """One line with only the fields that differ from the defaults, written as the
        constructor takes them (enums by their strings, ``kernel_options`` as a dict), e.g.
        ``VMoBAConfig(threshold=0.5, kernel='flash')``; ``VMoBAConfig()`` for the defaults."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if default is not dataclasses.MISSING and value == default:
                continue
            shown.append(f"{f.name}={_literal(f.name, value)}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @classmethod
    def preset(cls, name: str, **overrides: object) -> VMoBAConfig:
        """The named point of the density/quality frontier (:data:`PRESETS`: ``"fast"``,
        ``"balanced"`` = the defaults, ``"quality"``), with ``overrides`` of any field on top,
        e.g. ``VMoBAConfig.preset("fast", kernel="triton")``."""
        if name not in PRESETS:
            raise ValueError(
                f"VMoBAConfig.preset: unknown preset {name!r}; expected one of "
                f'{", ".join(sorted(PRESETS))} (docs/usage.md, "Presets").'
            )
        return cls(**{**PRESETS[name], **overrides})  # type: ignore[arg-type]

    def flex_kernel_options(
        self, device_type: str = "cuda", backward: bool = True
    ) -> dict[str, int | bool] | None:
        """``kernel_options`` as the dict ``flex_attention`` takes on ``device_type`` for a call
        with or without a ``backward`` (None: PyTorch's defaults)."""
        if self.kernel_options is None:
            if device_type != "cuda":
                return None
            return dict(CUDA_KERNEL_OPTIONS if backward else CUDA_INFERENCE_KERNEL_OPTIONS)
        return dict(self.kernel_options) or None

    def partition_for(self, layer_index: int) -> Partition:
        """The partition of rewritten layer ``layer_index`` on the recurrent schedule."""
        if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 0:
            raise ValueError(f"layer_index must be an int >= 0; got {layer_index!r}.")
        return self.schedule[layer_index % len(self.schedule)]

    def keeps_all_chunks(self, num_chunks: int) -> bool:
        """True when every query keeps every one of ``num_chunks`` chunks: the result is dense.

        One chunk, THRESHOLD with ``threshold >= 1``, or TOPK with ``topk >= num_chunks``.
        """
        if num_chunks <= 1:
            return True
        if self.selection is Selection.TOPK:
            return self.topk >= num_chunks
        return self.threshold >= 1.0
