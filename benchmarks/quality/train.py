"""Train a small video DiT (diffusers' WanTransformer3DModel) on synthetic videos, flow matching.

Pixel space (no VAE): a video ``[3, F, H, W]`` in [-1, 1] is patchified by the model itself
(``patch_size=(1, p, p)``); the motion class conditions the model through a learned embedding fed
as the text sequence. ``x_t = (1 - t) x0 + t noise``, the model predicts ``noise - x0``.

Resumable: ``--ckpt FILE`` is loaded when it exists and rewritten every ``--save-every`` steps, so
training can be resumed across runs. Logs JSON lines (train loss, validation loss on fixed seeds,
step time) to ``--log``.

Run: ``python benchmarks/quality/train.py --attention vmoba --steps 2000 --ckpt vmoba.pt``
Smoke (CPU): ``python benchmarks/quality/train.py --tiny --steps 3 --ckpt /tmp/t.pt``
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_video import MOTIONS, make_batch  # noqa: E402

import vmoba_compile as vc  # noqa: E402
from vmoba_compile.api import safe_inductor_defaults  # noqa: E402

TEXT_DIM = 64


class VideoDiT(torch.nn.Module):
    """Wan transformer + a class embedding used as its 'text' (one token per class label)."""

    def __init__(self, heads: int, head_dim: int, layers: int, patch: int) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.classes = torch.nn.Embedding(len(MOTIONS) + 1, TEXT_DIM)  # last: unconditional
        self.net = WanTransformer3DModel(
            patch_size=(1, patch, patch),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=4 * heads * head_dim,
            num_layers=layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, net=None
    ) -> torch.Tensor:
        """``net``: a compiled ``self.net`` (``torch.compile`` or ``optimize``) to run instead."""
        text = self.classes(labels)[:, None, :]
        net = self.net if net is None else net
        return net(x, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]


def model_config(args) -> dict:
    if args.tiny:
        return dict(heads=2, head_dim=16, layers=2, patch=4)
    return dict(heads=args.heads, head_dim=args.head_dim, layers=args.layers, patch=args.patch)


def flow_loss(model, x0, labels, g) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=g, device="cpu").to(x0)
    t = torch.rand(x0.shape[0], generator=g, device="cpu").to(x0.device)
    tt = t.view(-1, 1, 1, 1, 1).to(x0.dtype)
    pred = model(((1 - tt) * x0 + tt * noise), t, labels)
    return (pred.float() - (noise - x0).float()).square().mean()


def few_threads(fn, *args):
    """``fn(*args)`` on at most 2 intra-op threads (as the pool's workers run): video generation
    is many small tensor ops. On the shared 64-core GPU host, busy compiling, the first 16-batch
    final validations did not finish within 150 s (0.05 s a batch here); threads contending
    with the compile workers are the suspect, not confirmed."""
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def video_pool(workers: int):
    """Processes that make the videos (spawned, 2 intra-op threads each, as ``few_threads``)."""
    return mp.get_context("spawn").Pool(workers, torch.set_num_threads, (2,))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--attention", choices=["dense", "vmoba"], default="dense")
    p.add_argument("--threshold", type=float, default=vc.VMoBAConfig().threshold)
    p.add_argument("--steps", type=int, default=1000, help="total steps (resume continues)")
    p.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds: stop cleanly (validate, save) after the first step that ends past it; the "
        "learning rate is constant, so runs cut at different steps compare at a common step",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="128x128", help="height x width in pixels")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ckpt", default=None, help="checkpoint to resume from and write (training)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--log", default=None)
    p.add_argument("--export", default=None, help="with every checkpoint, the weights alone here")
    p.add_argument("--workers", type=int, default=4, help="processes generating the videos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--final-val-batches", type=int, default=16,
        help="at the end, the validation loss over this many batches (fixed videos, noise and "
        "times, the same for every run): the number runs are compared by; the periodic "
        "validation uses one batch and is noisy",
    )  # fmt: skip
    p.add_argument(
        "--eval-weights", default=None,
        help="exported weights (--export of an earlier run): print their final validation "
        "loss under --attention and exit, training nothing",
    )  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="CPU smoke run")
    p.add_argument(
        "--device", default=None,
        help="cuda (default) or cpu (float32; e.g. --eval-weights without a GPU)",
    )  # fmt: skip
    args = p.parse_args()
    if not (args.ckpt or args.eval_weights):
        p.error("--ckpt FILE is required for training (it is resumed from when it exists)")
    return args


def load_state(args, model, opt, device) -> int:
    """The step to start from: the exported weights' (--eval-weights), the resumed
    checkpoint's, or 0."""
    step = 0
    if args.eval_weights:
        state = torch.load(args.eval_weights, map_location=device)
        model.load_state_dict(state["model"])
        step = state["step"]
    elif os.path.exists(args.ckpt):  # resume
        state = torch.load(args.ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {args.ckpt} at step {step}")
    return step


def runner(args, model, device):
    """The model as trained and validated: eager dense, compiled dense (CUDA) or VMoBA."""
    if args.attention == "vmoba":
        block = 16 if args.tiny else 128
        config = vc.VMoBAConfig(threshold=args.threshold, block_size=block)
        lowering = "aot_eager" if args.tiny else "inductor"
        return functools.partial(model, net=vc.optimize(model.net, config, lowering=lowering))
    if device == "cuda":
        # optimize's inductor options for dense too: torch 2.10+'s mix-order reductions leave
        # the chunked scale_shift_table gradient unwritten (pytorch#193061, benchmarks/README.md)
        opts = safe_inductor_defaults()
        net = torch.compile(model.net, dynamic=False, options=opts or None)
        return functools.partial(model, net=net)
    return model


def final_validation(args, run, step, video, device, dtype) -> dict:
    """The validation loss over --final-val-batches fixed batches (``video``: frames, height,
    width)."""
    t_val = time.perf_counter()
    seeds = [10**6 + 1 + i for i in range(args.final_val_batches)]
    make = functools.partial(make_batch, args.batch, *video)
    if args.tiny or args.workers < 1:
        made = [few_threads(make, s) for s in seeds]
    else:  # a fresh pool, as training's: the GPU host's main process did not finish these
        # videos in 100-150 s; the training pool may still hold queued work
        with video_pool(args.workers) as vp:
            made = vp.map(make, seeds)
    losses = []
    with torch.no_grad():
        for i, (x, y) in enumerate(made):
            g = torch.Generator().manual_seed(10**6 + i)
            losses.append(flow_loss(run, x.to(device, dtype), y.to(device), g).item())
    return {"step": step, "final_val_loss": sum(losses) / len(losses),
            "final_val_batches": len(losses), "attention": args.attention,
            "final_val_s": round(time.perf_counter() - t_val, 1),
            "per_batch": losses}  # fmt: skip


def training_batches(args, step, video):
    """The training batches from ``step`` on, and the pool making them (None: made here)."""
    # Videos are made on the CPU, ahead of the GPU, by a pool of processes.
    batch_for = functools.partial(make_batch, args.batch, *video)
    seeds = range(args.seed * 10**7 + step, args.seed * 10**7 + args.steps)
    if args.tiny or args.workers < 1:
        return map(batch_for, seeds), None
    pool = video_pool(args.workers)
    return pool.imap(batch_for, seeds, chunksize=4), pool


def train_step(run, opt, batch, step, device, dtype) -> dict:
    """One optimizer step on ``batch``; its log row (loss, seconds)."""
    x0, labels = batch
    x0, labels = x0.to(device, dtype), labels.to(device)
    g = torch.Generator().manual_seed(step)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = flow_loss(run, x0, labels, g)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"step": step, "loss": loss.item(), "step_s": time.perf_counter() - t0}


def save(args, model, opt, step) -> None:
    """The checkpoint (--ckpt) and, with --export, the weights alone."""
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
         "args": vars(args), "config": model_config(args)},
        args.ckpt,
    )  # fmt: skip
    if args.export:  # the weights alone (13 MB), to evaluate or resume elsewhere
        torch.save(
            {"model": model.state_dict(), "step": step, "args": vars(args),
             "config": model_config(args)},
            args.export,
        )  # fmt: skip


def emit(row: dict, log) -> None:
    """Print ``row`` as JSON and append it to the log file, if any."""
    print(json.dumps(row), flush=True)
    if log:
        log.write(json.dumps(row) + "\n")
        log.flush()


def train(args, model, run, opt, step, video, device, dtype, log) -> int:
    """Train from ``step`` to --steps or past --time-budget; the step reached."""
    batches, pool = training_batches(args, step, video)
    val_x, val_y = few_threads(make_batch, args.batch, *video, 10**6)
    val_x, val_y = val_x.to(device, dtype), val_y.to(device)
    model.train()
    start, first = time.perf_counter(), step
    while step < args.steps:
        row = train_step(run, opt, next(batches), step, device, dtype)
        if step == first and device == "cuda":  # the first step compiled: where its time went
            from torch._dynamo.utils import compile_times

            row["compile_times"] = compile_times(repr="str", aggregate=True)
        step += 1
        last = step == args.steps or (
            args.time_budget is not None and time.perf_counter() - start > args.time_budget
        )
        if step % args.val_every == 0 or last:
            with torch.no_grad():
                row["val_loss"] = flow_loss(
                    run, val_x, val_y, torch.Generator().manual_seed(1)
                ).item()
        emit(row, log)
        if step % args.save_every == 0 or last:
            save(args, model, opt, step)
        if last:
            break
    if pool is not None:
        pool.terminate()
    return step


def main() -> None:
    args = parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    height, width = (16, 24) if args.tiny else (int(v) for v in args.size.split("x"))
    video = (4 if args.tiny else args.frames, height, width)
    torch.manual_seed(args.seed)
    model = VideoDiT(**model_config(args)).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step = load_state(args, model, opt, device)
    run = runner(args, model, device)

    if args.eval_weights:
        row = dict(final_validation(args, run, step, video, device, dtype),
                   weights=args.eval_weights)  # fmt: skip
        print(json.dumps(row), flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        return

    log = open(args.log, "a") if args.log else None  # noqa: SIM115
    step = train(args, model, run, opt, step, video, device, dtype, log)
    if args.final_val_batches:
        row = final_validation(args, run, step, video, device, dtype)
        print(json.dumps(row), flush=True)
        if log:
            log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
