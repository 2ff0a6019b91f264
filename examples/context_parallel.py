"""VMoBA on several processes: diffusers' Ulysses context parallelism, optionally FSDP2.

Every rank of the context-parallel group computes the same sample (same latents, timestep and
text), on S/P tokens per block and H/P heads per attention call. Run with torchrun:

    # CPU, tiny random weights, gloo (checks the output against one process):
    torchrun --nproc-per-node 2 examples/context_parallel.py
    # ... and a training step with FSDP2 (gradients checked against one process):
    torchrun --nproc-per-node 2 examples/context_parallel.py --train --fsdp
    # GPUs, NCCL, real weights at 480p (81 frames):
    torchrun --nproc-per-node 4 examples/context_parallel.py \\
        --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 21 --height 30 --width 52

Call order: ``enable_parallelism`` and ``fully_shard`` (either order), then ``optimize``.
On CPU, diffusers 0.42 needs two work-arounds, applied here only: ``enable_parallelism``
computes a device index modulo ``torch.accelerator.device_count()`` (0 on CPU; patched to 1 for
that call) and its hooks call ``logger.warning_once``, which exists once transformers is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from unittest import mock

import torch
import torch.distributed as dist

import vmoba_compile as vc

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=256,
    ffn_dim=64,
    num_layers=3,
    rope_max_seq_len=64,
)


def cpu_device_count_patch() -> contextlib.AbstractContextManager:
    """diffusers' enable_parallelism takes ``rank % torch.accelerator.device_count()``: 1 on
    CPU for that call, nothing on an accelerator."""
    if torch.accelerator.device_count() > 0:
        return contextlib.nullcontext()
    return mock.patch.object(torch.accelerator, "device_count", lambda: 1)


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    if args.model:
        model = WanTransformer3DModel.from_pretrained(
            args.model, subfolder="transformer", torch_dtype=dtype
        )
    else:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**TINY)
        if dtype != torch.float32:
            model = model.to(dtype)
    return model.to(device).train(args.train)


def inputs(model: torch.nn.Module, args: argparse.Namespace, device, dtype) -> tuple:
    """The same latents, timestep and text on every rank (one seed): ranks of one CP group
    compute one sample together."""
    g = torch.Generator().manual_seed(1234)
    cfg = model.config
    f, h, w = args.frames, args.height * 2, args.width * 2  # latent size for patch (1, 2, 2)
    x = torch.randn(1, cfg.in_channels, f, h, w, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (1,), generator=g).to(device)
    text = torch.randn(1, 16 if not args.model else 512, cfg.text_dim, generator=g)
    return x, t, text.to(device, dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a diffusers Wan checkpoint (default: tiny random weights)")
    p.add_argument("--frames", type=int, default=3, help="latent frames (token grid F)")
    p.add_argument("--height", type=int, default=4, help="token grid height (latent H / 2)")
    p.add_argument("--width", type=int, default=6, help="token grid width (latent W / 2)")
    p.add_argument("--fsdp", action="store_true", help="also shard with FSDP2")
    p.add_argument("--train", action="store_true", help="one training step instead of a forward")
    p.add_argument("--lowering", choices=vc.passes.LOWERINGS, default=None)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        import transformers  # noqa: F401  (diffusers' logger.warning_once on CPU)
    dtype = torch.bfloat16 if cuda else torch.float32
    lowering = args.lowering or ("inductor" if cuda else "aot_eager")
    # CPU FlexAttention has no backward kernel: CPU training keeps every chunk (VMoBA's
    # keep-all path, dense math through the same pass and all-to-all).
    threshold = 1.0 if args.train and not cuda else 0.25
    config = (
        vc.VMoBAConfig(threshold=threshold)
        if args.model
        else vc.VMoBAConfig(
            threshold=threshold, block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 2, 2)
        )
    )

    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build(args, device, dtype)
    with cpu_device_count_patch():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    if args.fsdp:
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = vc.optimize(model, config, lowering=lowering)

    x, t, text = inputs(model, args, device, dtype)
    if args.train:
        loss = opt(x, t, text, return_dict=False)[0].float().square().mean()
        loss.backward()
        grads = {}
        for n, prm in model.named_parameters():
            g = prm.grad
            if hasattr(g, "full_tensor"):
                # FSDP2 averages over its group, here the CP group: the partial gradients of
                # the CP ranks must be summed, so scale the average by the group size.
                g = g.full_tensor() * world
            else:
                g = g.clone()
                dist.all_reduce(g)  # sum the CP ranks' partial gradients
            grads[n] = g
        result = grads
    else:
        with torch.no_grad():
            result = opt(x, t, text, return_dict=False)[0]
    if rank == 0:
        print(opt.report)
    if not args.model and rank == 0:  # tiny weights: compare with the model in one process
        torch._dynamo.reset()
        one = build(args, device, dtype)
        ref = vc.optimize(one, config, lowering=lowering)
        if args.train:
            ref(x, t, text, return_dict=False)[0].float().square().mean().backward()
            err = max((result[n] - q.grad).abs().max().item() for n, q in one.named_parameters())
            print(f"max gradient difference to one process: {err:.2e}")
        else:
            with torch.no_grad():
                err = (result - ref(x, t, text, return_dict=False)[0]).abs().max().item()
            print(f"max output difference to one process: {err:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
