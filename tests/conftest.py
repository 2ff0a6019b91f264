"""Shared test settings: tolerances (each with its reason), hypothesis profiles, GPU marker."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# float32 CPU: flex (eager math path and the compiled C++ kernel) vs the float64 reference. Both
# accumulate in float32 over at most a few hundred keys, so errors sit near 1e-6; 1e-4 leaves room
# for a different summation order and still catches any wrong key (errors ~1e-1).
ATOL_F32 = 1e-4
# GPU criterion (PyTorch's own flex tests): the compiled result's error against a float64 golden
# may be at most this factor times the error of the same math done eagerly in the input dtype.
GPU_ERROR_FACTOR = 2.0

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # tests/compat_rows.py's mark; that module, loaded as a plugin, also records the outcomes
    config.addinivalue_line("markers", "compat(tool, packages, result): a compatibility row")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (`pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
