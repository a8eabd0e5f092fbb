"""Where T5 and CLIP live and encode: resident on the GPU, offloaded, or on the CPU.

They run once per request, but T5-XXL holds 9.5 GB in bf16 (4.9 GB in FP8) that the transformer
could use for the whole edit. `offloaded` keeps them in pinned host memory and lets diffusers' group
offload stream them to the GPU to encode: T5 block by block (its blocks sit inside `encoder`, hence
`block_modules`), CLIP whole (a quarter of a GB). Streamed weights are dropped after use with no
copy back. `cpu` encodes on the CPU instead (accelerate's hook moves the token ids there and the
embeddings back): no transfer at all, at the CPU's speed for 512 T5 tokens; the memory tiers
benchmark measures which is faster end to end.
"""

from __future__ import annotations

import torch

from .base import ChoiceStage, Phase

ENCODERS = ("text_encoder", "text_encoder_2")
BLOCK_MODULES = {"text_encoder_2": ["encoder"]}  # T5EncoderModel's blocks are a ModuleList inside `encoder`
DETAILS = {
    "offloaded": "host memory, streamed to the GPU to encode (diffusers group offload)",
    "cpu": "encoded on the CPU (accelerate hook moves ids and embeddings)",
}


class TextEncoderOffload(ChoiceStage):
    name = "text_encoder_offload"
    field_name = "text_encoders"
    off = "resident"
    benchmark_stage = None
    title = "text encoders off the GPU"
    summary = "T5 and CLIP in host memory, streamed to the GPU to encode or run on the CPU; set by the memory plan."
    phases = frozenset({Phase.LOAD})

    def active_detail(self, config, env):
        return DETAILS[config.text_encoders]

    def apply_load(self, pipe, config, build):
        for name in ENCODERS:
            encoder = getattr(pipe, name)
            encoder.to("cpu")
            if config.text_encoders == "offloaded":
                _stream_to(encoder, build.device, BLOCK_MODULES.get(name))
            else:
                from accelerate.hooks import AlignDevicesHook, add_hook_to_module

                add_hook_to_module(encoder, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
        build.note(f"text encoders: {DETAILS[config.text_encoders]}")


def _stream_to(encoder: torch.nn.Module, device: torch.device, block_modules: list[str] | None) -> None:
    from diffusers.hooks import apply_group_offloading

    streams = device.type == "cuda"
    apply_group_offloading(
        encoder,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=streams,
        record_stream=streams,
        block_modules=block_modules,
    )
