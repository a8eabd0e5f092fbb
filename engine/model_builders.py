"""Pipelines built in code, with random weights: `tiny` for CPUs and tests, `synthetic-full` for
honest speed measurements of the real architecture without the 30 GB download.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .tokenizers_offline import build_clip_tokenizer, build_t5_tokenizer

# FLUX.1-Kontext-dev's scheduler config (dynamic shift from 0.5 at 256 tokens to 1.15 at 4096).
FLUX_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

# FLUX.1 VAE: 16 latent channels, 8x downsampling, no quant convs.
FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# The tiny model: FLUX's structure (double + single blocks, guidance embedding, 16-channel VAE with
# 8x downsampling) at widths that run a 256x256 edit on a laptop CPU in about a second.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE_CONFIG = {
    **FLUX_VAE_CONFIG,
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
}
RANDOM_WEIGHTS_SEED = 20260101


@contextlib.contextmanager
def _default_dtype_and_device(dtype: torch.dtype, device: torch.device | str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _assemble(transformer, vae, text_encoder, text_encoder_2) -> FluxKontextPipeline:
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)  # fresh modules start in training mode (dropout on)
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
    )


def build_tiny_pipeline(
    dtype: torch.dtype = torch.float32, device: str = "cpu", transformer_overrides: dict | None = None
) -> FluxKontextPipeline:
    """A small random-weight Kontext pipeline; the same weights every time (fixed seed).

    `transformer_overrides` changes the transformer's config (GPU tests use FLUX's real head size,
    128, which the FA3 kernels require)."""
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=32,
                d_ff=64,
                d_kv=8,
                num_heads=4,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )
        transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **(transformer_overrides or {})})
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    pipe = _assemble(transformer, vae, text_encoder, text_encoder_2)
    return pipe.to(device=device, dtype=dtype)


def synthetic_full_configs() -> dict:
    """The FLUX.1-Kontext-dev component configs (12B transformer, T5-XXL encoder, CLIP-L, FLUX VAE)."""
    return {
        "transformer": dict(guidance_embeds=True),  # diffusers' defaults are FLUX.1's 19 + 38 blocks
        "vae": FLUX_VAE_CONFIG,
        "clip": CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        "t5": T5Config(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=24,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    }


def build_synthetic_full_pipeline(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> FluxKontextPipeline:
    """The real Kontext architecture with random weights, created directly on `device` in `dtype`.

    On "meta" it allocates nothing, which lets a CPU-only machine check the architecture. The draw is
    seeded (RANDOM_WEIGHTS_SEED), so that two processes on the same GPU and versions build the same weights and
    their pictures can be compared.
    """
    configs = synthetic_full_configs()
    place = torch.device(device)
    cuda_devices = [place.index if place.index is not None else torch.cuda.current_device()] if place.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), _default_dtype_and_device(dtype, device):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        transformer = FluxTransformer2DModel(**configs["transformer"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(configs["clip"])
        text_encoder_2 = T5EncoderModel(configs["t5"])
    return _assemble(transformer, vae, text_encoder, text_encoder_2)
