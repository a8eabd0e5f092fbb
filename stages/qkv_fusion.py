"""Stage 1: fuse the Q, K and V projections of every attention layer into one GEMM.

diffusers' `fuse_qkv_projections()` builds the fused Linear by concatenation but keeps the unfused
ones; on FLUX that is about 4.3 GB of bf16 weights held twice. In a variant we drop the variant's
references to the unfused projections, so they cost memory only while another variant still uses
them (engine/variants.py moves base weights that no variant references off the GPU).
"""

from __future__ import annotations

import torch

from .base import Stage

# Fused module -> the unfused projections it replaces.
_REPLACED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def drop_unfused_projections(model: torch.nn.Module) -> int:
    """Detach the unfused projections that a fused one replaced; returns how many were dropped."""
    dropped = 0
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, originals in _REPLACED.items():
            if getattr(module, fused, None) is None:
                continue
            for name in originals:
                if getattr(module, name, None) is not None:
                    setattr(module, name, None)
                    dropped += 1
    return dropped


class QkvFusion(Stage):
    switch = "fuse_qkv"
    title = "QKV fusion"
    summary = "Fused Q/K/V projections (one GEMM instead of three) in the transformer and the VAE."

    def apply_weights(self, transformer, config, build):
        transformer.fuse_qkv_projections()
        build.note(f"transformer: fused QKV, dropped {drop_unfused_projections(transformer)} unfused projections")

    def apply_vae(self, vae, config, build):
        vae.fuse_qkv_projections()
        build.note(f"vae: fused QKV, dropped {drop_unfused_projections(vae)} unfused projections")
