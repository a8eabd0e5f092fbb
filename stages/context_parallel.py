"""Context parallelism (Ulysses): one edit's tokens split over the ranks of a torchrun launch, one
GPU each, for the latency of a single request.

diffusers' `enable_parallelism` splits the transformer's inputs (image and text tokens, their ids)
over the ranks and gathers the output; inside attention each rank needs every token of some heads,
which two all-to-alls provide (sequence-split -> head-split, and back). diffusers does that only
inside its own attention dispatcher. The project's processor (stages/flux_attention_processor.py,
which runs FA3 and FP8 FA3) has no such hook, and diffusers skips it without a word: each rank then
attends over its own shard only, and the result is wrong with no error. So this stage wraps the
project's kernels in `ulysses()` itself, leaves diffusers' own processors (sdpa, cudnn) to
diffusers, and refuses any other processor.

Needs: a torch.distributed group of `context_parallel` ranks (engine/context_parallel.py starts
it), heads divisible by the degree (FLUX has 24: 2, 3, 4, 6 or 8 ranks) and token counts divisible
by it (diffusers' equal split; 1024x1024 edits: 8192 image + 512 text tokens). Ring attention is
not offered: it needs the kernel's log-sum-exp, which the project's FA3 wrapper does not return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_kernels import AttentionKernel
from .base import Availability, Stage, StageReport


@dataclass(frozen=True)
class UlyssesKernel(AttentionKernel):
    ulysses_of: AttentionKernel | None = None  # the single-device kernel it wraps


def ulysses(kernel: AttentionKernel, group=None) -> UlyssesKernel:
    """`kernel` over (B, S, H, D) made Ulysses-parallel: each rank holds S/N tokens of all H heads;
    the kernel sees all S tokens of H/N heads. The token order after the exchange (rank by rank)
    does not matter: attention here has no mask, and positions are in the rotary embedding already."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    group = group or dist.group.WORLD
    world = dist.get_world_size(group)

    def exchange(x: torch.Tensor) -> torch.Tensor:  # chunk i of dim 0 goes to rank i; chunk j comes from rank j
        return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous().flatten(), None, None, group)).view_as(x)

    def parallel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *qk_bounds: torch.Tensor) -> torch.Tensor:
        # The Q/K bounds of FP8 attention come from the norm weights, not the tokens: valid on every shard.
        batch, tokens, heads, dim = query.shape
        local = heads // world

        def to_heads(x):  # (B, s, H, D) -> (B, N*s, H/N, D)
            x = exchange(x.reshape(batch, tokens, world, local, dim).permute(2, 0, 1, 3, 4))
            return x.permute(1, 0, 2, 3, 4).reshape(batch, world * tokens, local, dim)

        out = kernel.run(to_heads(query), to_heads(key), to_heads(value), *qk_bounds)
        out = exchange(out.reshape(batch, world, tokens, local, dim).permute(1, 0, 2, 3, 4))
        return out.permute(1, 2, 0, 3, 4).reshape(batch, tokens, heads, dim)

    return UlyssesKernel(parallel, needs_qk_bounds=kernel.needs_qk_bounds, ulysses_of=kernel)


def check_processors(transformer: torch.nn.Module) -> None:
    """Every attention must be parallel-aware: diffusers' own processor (its dispatcher runs the
    all-to-alls) or ours with a Ulysses kernel. Anything else would be silently wrong."""
    from .flux_attention_processor import KontextAttnProcessor, flux_attention_modules  # imports diffusers' models

    for module in flux_attention_modules(transformer):
        processor = module.processor
        if isinstance(processor, KontextAttnProcessor):
            if not isinstance(processor.kernel, UlyssesKernel):
                raise ValueError("context parallelism: an attention kernel is not wrapped for Ulysses; it would attend over one shard only")
        elif not hasattr(processor, "_attention_backend"):
            raise ValueError(
                f"context parallelism cannot run attention processor {type(processor).__name__}: it is neither diffusers' own "
                "(whose dispatcher is parallel-aware) nor the project's Ulysses-wrapped one, and would silently give wrong results"
            )


class ContextParallel(Stage):
    switch = "context_parallel"
    title = "context parallelism (Ulysses)"
    summary = "One edit over several GPUs: tokens split over torchrun ranks, all-to-all around attention (Ulysses)."

    def availability(self, env):
        if env.world_size > 1:
            return Availability(True, detail=f"{env.world_size} ranks")
        return Availability(False, "needs a torchrun launch, one process per GPU (see the README's context-parallel command)")

    def resolve(self, config, env):
        if not self.is_requested(config):
            return config, StageReport(self.name, requested=False, active=False)
        if env.world_size != config.context_parallel:
            why = f"context_parallel={config.context_parallel} needs as many torchrun ranks; this process group has {env.world_size}"
            return self.switched_off(config), StageReport(self.name, True, False, reason=why)
        return config, StageReport(self.name, True, True, detail=f"Ulysses over {config.context_parallel} ranks")

    def apply_execution(self, transformer, config, build):
        from diffusers import ContextParallelConfig

        from patches.diffusers_context_parallel_cpu import cpu_device_count

        from .flux_attention_processor import KontextAttnProcessor, flux_attention_modules  # diffusers: only when applied

        degree = config.context_parallel
        heads = transformer.config.num_attention_heads
        if heads % degree:
            raise ValueError(f"context_parallel={degree}: the transformer's {heads} attention heads do not divide by it")
        wrapped = 0
        for module in flux_attention_modules(transformer):
            if isinstance(module.processor, KontextAttnProcessor) and not isinstance(module.processor.kernel, UlyssesKernel):
                module.processor.kernel = ulysses(module.processor.kernel)
                wrapped += 1
        check_processors(transformer)
        with cpu_device_count():
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
        build.note(f"context parallelism: Ulysses over {degree} ranks ({wrapped} project kernels wrapped, the rest diffusers' own)")
