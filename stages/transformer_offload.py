"""Group offload of the transformer (diffusers): its blocks live in host memory and stream to the GPU
one block at a time, so the model runs on cards that cannot hold it (the memory plan's tiny tier).

With CUDA streams, the next block is copied from pinned host memory while the current one computes
(`record_stream` lets the allocator reuse a block's memory as soon as its kernels are done). Each
step still moves every block's weights over PCIe once, so a step costs at least the transfer time
of the whole transformer. diffusers' hooks move torchao FP8 tensors too.

The base transformer stays in host memory; every execution variant is a clone (its key includes
this knob) that gets its own hooks, so the base never carries hooks that a later clone would copy.
What it rules out (compile with FP8 weights, CUDA graphs) is in stages/rules.py.
"""

from __future__ import annotations

import torch

from .base import Stage


class TransformerOffload(Stage):
    switch = "transformer_offload"
    title = "transformer group offload"
    summary = "diffusers group offload: transformer blocks stream from host memory one at a time (CUDA streams); set by the memory plan."

    def describe_available(self, env):
        if env.has_cuda:
            return "block level, one block per group, CUDA stream prefetch"
        return "on the CPU the blocks stay where they are: the hooks run, nothing is saved (for tests)"

    def build_key(self, config):
        # A load-scope knob in the execution key: offloaded variants are always clones with their own hooks.
        return (("transformer_offload", config.transformer_offload),)

    def apply_load(self, pipe, config, build):
        pipe.transformer.to("cpu")
        build.note("transformer: kept in host memory; blocks stream to the GPU (group offload)")

    def apply_execution(self, transformer, config, build):
        streams = build.device.type == "cuda"
        transformer.enable_group_offload(
            onload_device=build.device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=streams,
            record_stream=streams,
        )
        build.note(f"transformer: group offload, one block per group{', CUDA stream prefetch' if streams else ''}")
