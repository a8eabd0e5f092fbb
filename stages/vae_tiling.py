"""VAE tiling (diffusers): images larger than the VAE's tile are encoded and decoded tile by tile,
with overlapping tiles blended, so the VAE's peak memory stops growing with the image. diffusers
only tiles above the tile size (1024 px for the FLUX VAE), so a 1024x1024 edit decodes exactly as
untiled; larger outputs differ slightly where tiles are blended.
"""

from __future__ import annotations

from .base import Stage


class VaeTiling(Stage):
    switch = "vae_tiling"
    title = "VAE tiling"
    summary = "The VAE encodes and decodes large images tile by tile (diffusers' tiling); set by the memory plan."

    def active_detail(self, config, env):
        return "tiles only above the VAE's tile size (1024 px for FLUX)"

    def apply_load(self, pipe, config, build):
        pipe.vae.enable_tiling()
        build.note(f"vae: tiled above {pipe.vae.tile_sample_min_size} px")
