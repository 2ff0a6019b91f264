"""The package type-checks (mypy, ``[tool.mypy]`` in pyproject.toml), and so do the calls the
README shows: the package ships ``py.typed``, so its annotations are what users' type checkers
believe. mypy comes with the ``dev`` extra; a cold run takes about a minute (torch's stubs),
a warm one (``.mypy_cache``) seconds."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The README's kind of calls: enum fields by their strings, chunks as tuples, kernel options as
# a dict, the optimize keywords, restore.
USER_CODE = """
import torch

import vmoba_compile as vc
from vmoba_compile import VideoLayout, VMoBAConfig

config = VMoBAConfig(selection="topk", topk=3, scope="head", granularity="token")
config = VMoBAConfig(schedule=("1d", "2d", "3d"), chunk_1d=(1,), chunk_2d=(4, 4))
config = VMoBAConfig(kernel_options={"BLOCK_M": 64, "USE_TMA": False}, threshold=0.25)
config = VMoBAConfig(kernel="flash")
kernel: vc.Kernel = config.kernel
layout = VideoLayout(13, 30, 45, text_tokens=226, text_position="prefix")
part: vc.Partition = config.partition_for(0)
model = torch.nn.Linear(4, 4)
opt = vc.optimize(model, config, layout=layout, strict=True, lowering="aot_eager")
opt.vmoba.dense_steps = 5
restored: torch.nn.Module = opt.restore()
"""

# What the annotations must refuse: a count as a string, an unknown field, a position as an
# int, torch.compile's dynamic= (optimize's shapes are static), an unknown lowering.
WRONG_CODE = """
import torch
from vmoba_compile import VideoLayout, VMoBAConfig, optimize

VMoBAConfig(topk="3")
VMoBAConfig(chunks=(1, 2))
VideoLayout(13, 30, 45, text_position=1)
optimize(torch.nn.Linear(4, 4), dynamic=True)
optimize(torch.nn.Linear(4, 4), lowering="tvm")
"""


def test_package_and_readme_calls_type_check(tmp_path) -> None:
    good, bad = tmp_path / "user_code.py", tmp_path / "wrong_code.py"
    good.write_text(textwrap.dedent(USER_CODE))
    bad.write_text(textwrap.dedent(WRONG_CODE))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "vmoba_compile"]
        + [str(good), str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 2: mypy itself failed
    assert not [e for e in errors if "wrong_code.py" not in e], run.stdout
    wrong = sorted(int(re.search(r"wrong_code\.py:(\d+):", e).group(1)) for e in errors)
    assert wrong == [5, 6, 7, 8, 9], run.stdout  # each wrong call, and nothing else
