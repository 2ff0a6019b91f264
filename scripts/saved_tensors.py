"""What one forward saves for the backward: dense ``torch.compile`` vs ``optimize``, with and
without activation checkpointing, on a tiny Wan on CPU (diagnostic; no backward is run).

Run: ``python scripts/saved_tensors.py`` (repo root). CPU FlexAttention refuses inputs that
require grad, because it has no backward on CPU; the check is patched out for this process's
forward only (``unittest.mock``), which is all this needs: the saved tensors are fixed by the
forward graph that AOTAutograd's partitioner (``aot_eager``) produces.
"""

from __future__ import annotations

import json
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_model import TINY  # noqa: E402

import vmoba_compile as vc  # noqa: E402


def main() -> None:
    from diffusers import WanTransformer3DModel

    cfg = dict(TINY, num_layers=3, num_attention_heads=2, attention_head_dim=32)
    t, h, w = 4, 8, 8
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, t, 2 * h, 2 * w, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 16, cfg["text_dim"], generator=g),
        "return_dict": False,
    }
    config = vc.VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(4, 4), chunk_3d=(2, 4, 4))
    for variant in ("dense", "vmoba"):
        for checkpointing in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = WanTransformer3DModel(**cfg)
            if checkpointing:
                model.enable_gradient_checkpointing()
            if variant == "dense":
                run = torch.compile(model, backend="aot_eager", dynamic=False)
            else:
                run = vc.optimize(model, config, lowering="aot_eager")
            saved = []

            def pack(x, saved=saved):
                saved.append((tuple(x.shape), str(x.dtype), x.numel() * x.element_size()))
                return x

            no_check = mock.patch(
                "torch.nn.attention.flex_attention._validate_device", lambda q, k, v: None
            )
            with no_check, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                run(**inputs)
            largest = sorted(saved, key=lambda s: -s[2])[:5]
            row = dict(variant=variant, checkpointing=checkpointing, saved=len(saved),
                       saved_bytes=sum(s[2] for s in saved), largest=largest)  # fmt: skip
            print(json.dumps(row))


if __name__ == "__main__":
    main()
