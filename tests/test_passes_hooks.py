"""The pass's hooks for a parallel setup (``vmoba_compile.passes.hooks``), on CPU without
processes: a Dynamo source name is walked to the same object that evaluating it gives."""

from __future__ import annotations

import functools

import pytest
import torch

from vmoba_compile.passes.hooks import _frame_object


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = torch.nn.Linear(2, 2)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        inner = self.attn1

        def hook(*args):  # a closure over a module, as diffusers' hooks hold them
            return inner(*args)

        self.wrapped = functools.partial(hook)


SOURCES = [
    "L['self']",
    'L["self"].attn1',
    "L['self']._modules['attn1']",
    "L['self'].__dict__['_modules']['layers'][1]",
    "L['self'].layers[-1]",
    "L['self'].wrapped.func.__closure__[0].cell_contents",
    # not reachable, or not a chain of accesses: None, as their evaluation fails
    "L['self'].missing",
    "L['other'].attn1",
    "G['torch']",
    "getattr(L['self'], 'attn1')",
    "L['self']._modules['layers'].0",
    "L['self'].layers[slice(0, 1, None)]",
]


@pytest.mark.parametrize("source", SOURCES)
def test_frame_object_is_what_evaluating_the_source_gives(source) -> None:
    block = _Block()
    try:
        expected = eval(source, {"__builtins__": {}}, {"L": {"self": block}})  # noqa: S307
    except Exception:
        expected = None
    assert (expected is not None) == (SOURCES.index(source) < 6), source  # the case is real
    assert _frame_object(source, block) is expected, source
