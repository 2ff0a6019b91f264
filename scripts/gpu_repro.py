"""Minimal GPU repro of one op call; run in a fresh process per mode (a CUDA fault is sticky)."""

import sys

import torch

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention

mode, gran, hkv, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
layout = VideoLayout(8, 16, 16, text_tokens=text, text_position="prefix")
cfg = VMoBAConfig(
    block_size=128, chunk_1d=(2,), chunk_2d=(4, 4), chunk_3d=(2, 4, 8), granularity=gran
)
q = torch.randn(2, 4, layout.seq_len, 64, device="cuda", requires_grad=True)
k = torch.randn(2, hkv, layout.seq_len, 64, device="cuda", requires_grad=True)
v = torch.randn(2, hkv, layout.seq_len, 64, device="cuda", requires_grad=True)
fn = torch.compile(vmoba_attention, fullgraph=True) if mode == "compiled" else vmoba_attention
for layer in range(3):
    out = fn(q, k, v, layout=layout, config=cfg, layer_index=layer)
    torch.cuda.synchronize()
    print(mode, gran, hkv, text, "layer", layer, "fwd ok", flush=True)
    out.sum().backward()
    torch.cuda.synchronize()
    print(mode, gran, hkv, text, "layer", layer, "bwd ok", flush=True)
