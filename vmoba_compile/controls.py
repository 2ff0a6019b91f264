"""The run-time controls of an optimized model (``optimized.vmoba``): dense warm-up steps,
dense layers, the step counter."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["VMoBAControls"]


class VMoBAControls:
    """Run-time switches of an optimized model; changing them never recompiles per step.

    Attributes:
        dense_steps: the first ``dense_steps`` denoising steps run dense attention (dense
            warm-up). They use a second compiled copy of the model (inductor, no VMoBA), compiled
            once on first use (with the blocks compiled, the default: a dense compiled block).
        dense_layers: VMoBA layer indices kept dense. With the blocks compiled their blocks run
            the dense compiled block (nothing new compiles); with the whole model compiled each
            distinct set compiles once (per resolution) and is then cached.
        calls_per_step: forward calls per denoising step (2 when a pipeline runs the
            conditional and unconditional passes as two calls, as Wan's does).

    The step counter counts forward calls: ``step = calls // calls_per_step``. Call
    :meth:`reset` before each generation, or pass :meth:`pipeline_callback` as a diffusers
    pipeline's ``callback_on_step_end``, which keeps the count exact and resets it after the
    last step.
    """

    def __init__(self) -> None:
        self._dense_steps = 0
        self._dense_layers: frozenset[int] = frozenset()
        self._calls_per_step = 1
        self._calls = 0

    @staticmethod
    def _count(name: str, value: object, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
        return value

    @property
    def dense_steps(self) -> int:
        return self._dense_steps

    @dense_steps.setter
    def dense_steps(self, value: int) -> None:
        self._dense_steps = self._count("dense_steps", value, 0)

    @property
    def dense_layers(self) -> frozenset[int]:
        return self._dense_layers

    @dense_layers.setter
    def dense_layers(self, value: Iterable[int]) -> None:
        if isinstance(value, int):
            raise ValueError(f"dense_layers must be a set of layer indices; got {value!r}.")
        self._dense_layers = frozenset(self._count("a dense layer", v, 0) for v in value)

    @property
    def calls_per_step(self) -> int:
        return self._calls_per_step

    @calls_per_step.setter
    def calls_per_step(self, value: int) -> None:
        self._calls_per_step = self._count("calls_per_step", value, 1)
        self._calls = 0

    @property
    def step(self) -> int:
        """The denoising step the next forward call belongs to."""
        return self._calls // self._calls_per_step

    @property
    def dense_now(self) -> bool:
        """True if the next forward call runs dense (inside the warm-up)."""
        return self.step < self._dense_steps

    def reset(self) -> None:
        """Start a new generation: the next call is step 0."""
        self._calls = 0

    def set_step(self, step: int) -> None:
        """The next forward call belongs to denoising step ``step``."""
        self._calls = self._count("step", step, 0) * self._calls_per_step

    def pipeline_callback(
        self, pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """A diffusers ``callback_on_step_end``: after step ``i``, the next is ``i + 1``; after
        the pipeline's last step, :meth:`reset`."""
        total = getattr(pipe, "num_timesteps", None)
        if isinstance(total, int) and i + 1 >= total:
            self.reset()
        else:
            self.set_step(i + 1)
        return callback_kwargs

    def _called(self) -> None:
        self._calls += 1

    def __repr__(self) -> str:
        return (
            f"VMoBAControls(dense_steps={self._dense_steps}, "
            f"dense_layers={sorted(self._dense_layers)}, calls_per_step={self._calls_per_step}, "
            f"step={self.step})"
        )
