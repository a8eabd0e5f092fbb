"""Where T5 and CLIP live and encode: resident on the GPU, offloaded, or on the CPU.

They run once per request, but T5-XXL holds 9.5 GB in bf16 (4.9 GB in FP8) that the transformer
could use for the whole edit. `offloaded` keeps them in pinned host memory and lets diffusers' group
offload stream them to the GPU to encode, layer by layer, the next layer copied while the current one
computes; streamed weights are dropped after use, with no copy back. Leaf level, because T5's blocks
sit inside `encoder`, and block-level offload with `block_modules=["encoder"]` registers diffusers'
prefetch tracker twice on the same blocks when streams are on (diffusers 0.42.1: "Hook with name
layer_execution_tracker already exists"). `cpu` encodes on the CPU instead (accelerate's hook moves
the token ids there and the embeddings back): no transfer at all, at the CPU's speed for 512 T5
tokens; the memory tiers benchmark measures which is faster end to end.
"""

from __future__ import annotations

import torch

from .base import Stage

ENCODERS = ("text_encoder", "text_encoder_2")
DETAILS = {
    "offloaded": "host memory, streamed to the GPU layer by layer to encode (diffusers group offload)",
    "cpu": "encoded on the CPU (accelerate hook moves ids and embeddings)",
}


class TextEncoderOffload(Stage):
    switch = "text_encoders"
    title = "text encoders off the GPU"
    summary = "T5 and CLIP in host memory, streamed to the GPU to encode or run on the CPU; set by the memory plan."

    def active_detail(self, config, env):
        return DETAILS[config.text_encoders]

    def apply_load(self, pipe, config, build):
        for name in ENCODERS:
            encoder = getattr(pipe, name)
            encoder.to("cpu")
            if config.text_encoders == "offloaded":
                _stream_to(encoder, build.device)
            else:
                from accelerate.hooks import AlignDevicesHook, add_hook_to_module

                add_hook_to_module(encoder, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
        build.note(f"text encoders: {DETAILS[config.text_encoders]}")


def _stream_to(encoder: torch.nn.Module, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading

    streams = device.type == "cuda"
    apply_group_offloading(
        encoder,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=streams,
        record_stream=streams,
    )
