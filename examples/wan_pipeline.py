"""VMoBA in a diffusers pipeline: ``pipe.transformer = optimize(pipe.transformer)``.

Offline and small: a Wan pipeline built from tiny random-weight components (no download, no text
encoder: the prompt embeddings are given), a few denoising steps on CPU. On a real checkpoint the
same two lines apply:

    repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    pipe = WanPipeline.from_pretrained(repo, torch_dtype=torch.bfloat16)
    pipe.transformer = vmoba_compile.optimize(pipe.transformer)

Run: ``python examples/wan_pipeline.py [--steps 3] [--lowering aot_eager]``.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

import vmoba_compile as vc


def tiny_wan_pipeline() -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=64,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lowering", default="inductor", choices=["inductor", "aot_eager"])
    args = p.parse_args()

    pipe = tiny_wan_pipeline()
    # 9 frames of 64 x 96 pixels -> a 3 x 4 x 6 token grid; small chunks so that the grid holds
    # several of them (real checkpoints keep the automatic chunk shapes and block 128).
    config = vc.VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 2, 2))
    pipe.transformer = vc.optimize(pipe.transformer, config, lowering=args.lowering)
    controls = pipe.transformer.vmoba
    controls.dense_steps = 1  # dense warm-up: the first denoising step keeps full attention
    controls.calls_per_step = 2  # Wan runs the conditional and unconditional passes as 2 calls

    g = torch.Generator().manual_seed(0)
    video = pipe(
        prompt_embeds=torch.randn(1, 16, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=args.steps,
        guidance_scale=5.0,
        output_type="pt",
        generator=g,
        callback_on_step_end=controls.pipeline_callback,
    ).frames
    print(pipe.transformer.report)
    print(f"video {tuple(video.shape)}, finite: {bool(torch.isfinite(video).all())}")
    print(f"controls after the run: {controls}")


if __name__ == "__main__":
    main()
