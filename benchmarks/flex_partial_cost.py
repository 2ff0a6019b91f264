"""What a partial block costs FlexAttention, apart from what our ``mask_mod`` computes.

TOKEN granularity makes nearly every block partial (the union of 128 query tokens' selections
covers almost every chunk), so the kernel evaluates ``mask_mod`` on every score. This times, at
one shape (default: Wan-1.3B, 55,296 tokens, 12 x 128, bf16), every block visited and:

- ``full``: every block full (no ``mask_mod`` evaluated): dense flex;
- ``partial-true``: every block partial, ``mask_mod`` a constant True (the partial path alone);
- ``partial-bits1``: every block partial, one word of selection bits per query row tested at each
  key's bit (our TOKEN ``mask_mod`` with at most 32 chunk columns, 1D);
- ``partial-bits5``: the same with five words picked by ``where`` (120-160 columns, 2D/3D);
- ``partial-and1``: one word ANDed with a per-key column mask (``1 << bit``, built once per key):
  one integer operation per score fewer than ``bits1``;

plus cuDNN SDPA. All masks select every key, so each variant computes the same output.
Run (GPU): ``python benchmarks/flex_partial_cost.py [--tokens 55296] [--options torch|library]``
(``library``: the kernel options ``vmoba_attention`` passes on CUDA, per direction).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_attention import bench, finish  # do_bench median, as every table of benchmarks/README.md
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from vmoba_compile import VMoBAConfig


def block_mask(s: int, bs: int, mask_mod, partial: bool, device) -> BlockMask:
    nb = s // bs
    num = torch.full((1, 1, nb), nb, dtype=torch.int32, device=device)
    ind = torch.arange(nb, dtype=torch.int32, device=device).expand(1, 1, nb, nb).contiguous()
    none_num, none_ind = torch.zeros_like(num), torch.zeros_like(ind)
    kv = (num, ind, none_num, none_ind) if partial else (none_num, none_ind, num, ind)
    return BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(s, s))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=55296)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--options", choices=("torch", "library"), default="torch")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, s, h, d, bs = "cuda", args.tokens, args.heads, 128, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(1, h, s, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in "qkv"
    )
    words = [torch.full((1, h, s), -1, dtype=torch.int32, device=dev) for _ in range(5)]
    kv_bit = (torch.arange(s, device=dev, dtype=torch.int32) // bs) % 32
    kv_word = (torch.arange(s, device=dev, dtype=torch.int32) // bs) % 5
    kv_mask = torch.ones_like(kv_bit) << kv_bit

    def true_mod(b, hh, qi, ki):
        return qi >= 0

    def bits1(b, hh, qi, ki):
        return ((words[0][b, hh, qi] >> kv_bit[ki]) & 1) != 0

    def and1(b, hh, qi, ki):
        return (words[0][b, hh, qi] & kv_mask[ki]) != 0

    def bits5(b, hh, qi, ki):
        word, kw = words[4][b, hh, qi], kv_word[ki]
        for i in range(3, -1, -1):
            word = torch.where(kw == i, words[i][b, hh, qi], word)
        return ((word >> kv_bit[ki]) & 1) != 0

    flex = torch.compile(flex_attention, dynamic=False)

    def options(x: torch.Tensor) -> dict:
        if args.options == "torch":
            return {}
        return {"kernel_options": VMoBAConfig().flex_kernel_options("cuda", x.requires_grad)}

    rows = []

    def timed(name, fn):
        for backward in (False, True):
            x = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            ms = bench(lambda x=x: fn(*x), backward)
            rows.append({"variant": name, "backward": backward, "ms": round(ms, 3)})
            print(json.dumps(rows[-1]), flush=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        timed("cudnn", lambda a, b, c: F.scaled_dot_product_attention(a, b, c))
    for name, mod, partial in (
        ("full", true_mod, False),
        ("partial-true", true_mod, True),
        ("partial-bits1", bits1, True),
        ("partial-bits5", bits5, True),
        ("partial-and1", and1, True),
    ):
        bm = block_mask(s, bs, mod, partial, dev)
        timed(name, lambda a, b, c, bm=bm: flex(a, b, c, block_mask=bm, **options(a)))
    gpu = torch.cuda.get_device_name()
    head = (
        f"{gpu} | torch {torch.__version__} | {s} tokens, {h} x {d}, bf16, do_bench median | "
        f"kernel options: {args.options}"
    )
    finish(head, rows, args.out)


if __name__ == "__main__":
    main()
