"""Run by tests/test_context_parallel.py under `torchrun --nproc_per_node=2` (gloo, CPU): the
context-parallel stage on the tiny transformer with a kernel that is not diffusers' (standing in for
FA3), against the same kernel in one process. Rank 0 prints one JSON line.

On GPUs (NCCL), the real kernels, with FLUX's head size (128, which FA3 needs) and 24 heads:

    CP_KERNEL=fa3 .venv/bin/torchrun --nproc_per_node=4 tests/context_parallel_ranks.py      # or fa3_fp8, sdpa
    CP_KERNEL=fa3 CP_COMPILE=1 .venv/bin/torchrun --nproc_per_node=4 tests/context_parallel_ranks.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from engine.context_parallel import init_process_group
from engine.model_builders import build_tiny_pipeline
from engine.variants import clone_sharing_tensors
from patches.diffusers_context_parallel_cpu import cpu_device_count
from stages.attention_kernels import KERNELS, AttentionKernel
from stages.base import BuildContext
from stages.config import OptimizationConfig
from stages.context_parallel import ContextParallel, check_processors
from stages.environment import current_environment
from stages.flux_attention_processor import set_attention_kernel


def manual_attention(query, key, value):  # (B, S, H, D); not torch's SDPA, like FA3
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return ((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v).transpose(1, 2)


def inputs(transformer, image_tokens=512, text_tokens=64):
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    return dict(
        hidden_states=torch.randn(1, image_tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.rand(image_tokens, 3, generator=generator) * 32,
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )


def main() -> None:
    rank, world, device = init_process_group()
    torch.set_num_threads(1)
    kernel_name = os.environ.get("CP_KERNEL", "manual")
    if device.startswith("cuda"):  # FLUX's attention shape: 24 heads of 128
        overrides = dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56))
        transformer = build_tiny_pipeline(dtype=torch.bfloat16, device=device, transformer_overrides=overrides).transformer
    else:
        transformer = build_tiny_pipeline().transformer
    set_attention_kernel(transformer, AttentionKernel(manual_attention) if kernel_name == "manual" else KERNELS[kernel_name])
    kwargs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs(transformer).items()}
    if device.startswith("cuda"):
        kwargs = {
            key: value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in kwargs.items()
        }
    with torch.no_grad():
        reference = transformer(**kwargs)[0]
    parallel = clone_sharing_tensors(transformer)
    env = current_environment(device)
    build = BuildContext(env, torch.device(device), transformer.dtype)
    ContextParallel().apply_execution(parallel, OptimizationConfig(context_parallel=world), build)
    if os.environ.get("CP_COMPILE") == "1":  # by hand, for the record: regional compile over the wrapped kernel
        parallel.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        out = parallel(**kwargs)[0]
    # What the stage prevents: diffusers' hooks without the wrapped kernel (each rank attends over its shard).
    silent = clone_sharing_tensors(transformer)
    with cpu_device_count():
        silent.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad():
        silent_error = float((silent(**kwargs)[0] - reference).abs().max())
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)

    refused = None
    unwrapped = clone_sharing_tensors(transformer)
    for module in unwrapped.modules():
        if hasattr(module, "processor") and hasattr(module.processor, "kernel"):
            module.processor = type("ForeignProcessor", (), {"__call__": lambda self, *a, **k: None})()
    try:
        check_processors(unwrapped)
    except ValueError as error:
        refused = str(error)
    if rank == 0:
        result = {
            "world": world,
            "device": device,
            "kernel": kernel_name,
            "env_world_size": env.world_size,
            "max_abs_error": float((out - reference).abs().max()),
            "reference_max": float(reference.abs().max()),
            "unwrapped_max_abs_error": silent_error,
            "ranks_agree": all(torch.equal(gathered[0], other) for other in gathered),
            "refused": refused,
        }
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
