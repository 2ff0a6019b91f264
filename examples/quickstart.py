"""VMoBA on random video-shaped tensors: one call per partition, checked against the reference.

Runs on CPU in seconds (small grid, block size 32); pass --device cuda for a GPU.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import vmoba_compile as vc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    layout = vc.VideoLayout(frames=6, height=8, width=12, text_tokens=20, text_position="suffix")
    config = vc.VMoBAConfig(block_size=32 if args.device == "cpu" else 128, threshold=0.25)
    b, h, d = 1, 4, 32
    q, k, v = (torch.randn(b, h, layout.seq_len, d, device=args.device) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v)
    print(
        f"{layout}: S={layout.seq_len}, {config.selection.value} {config.threshold}, "
        f"scope {config.scope.value}, block {config.block_size}"
    )
    for layer in range(3):
        t0 = time.perf_counter()
        out = vc.vmoba_attention(q, k, v, layout=layout, config=config, layer_index=layer)
        ms = (time.perf_counter() - t0) * 1e3
        ref = vc.vmoba_reference(q, k, v, layout=layout, config=config, layer_index=layer)
        mask = vc.reference_mask(q, k, layout=layout, config=config, layer_index=layer)
        print(
            f"layer {layer} ({config.partition_for(layer).value}): density "
            f"{mask.float().mean():.2f}, |out - reference| {(out - ref).abs().max():.1e}, "
            f"|out - dense| {(out - dense).abs().max():.2f}, {ms:.0f} ms"
        )


if __name__ == "__main__":
    main()
