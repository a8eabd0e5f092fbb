"""Stage 1: first-block cache.

Each step runs the first transformer block, compares its output residual with the residual of the
last fully computed step (mean |difference| / mean |previous|), and, when that relative change is
under the threshold (0.12 here), skips the remaining 56 blocks and adds their cached residual instead.

Two backends, chosen by `cache_backend`:
    para_attn  para-attn's CachedTransformerBlocks (with patches/para_attn_first_block_cache.py).
               The decision runs in eager Python between compiled blocks, so the blocks keep
               `fullgraph=True` compilation and CUDA graph capture.
    diffusers  diffusers' FirstBlockCacheConfig hooks on every block. Its decision is
               `torch.compiler.disable`d inside the blocks, so blocks compile without fullgraph,
               and it cannot run under CUDA graphs (the cuda_graphs stage switches itself off).
`auto` picks para_attn when it is installed. Measured on an H200 (synthetic-full, 1024x1024, never
skipping; benchmarks/results/nvidia-h200-2026-11-22): both backends cost nothing measurable (stage 4:
193.8 ms/step diffusers, 194.5 para_attn, 194.5 uncached; stage 5: para_attn 194.2 vs 193.8), but the
diffusers backend failed under CUDA graphs, so only para_attn keeps the whole default stack.

State belongs to one request: each edit gets a fresh cache context, and with true CFG the
conditional and unconditional calls keep separate residuals. Each response reports the transformer
calls that were fully computed and skipped (with true CFG a step is two calls).
"""

from __future__ import annotations

import contextlib

from .base import Stage, StageReport


class FirstBlockCache(Stage):
    switch = "first_block_cache"
    title = "first-block cache"
    summary = "First-block cache: skip the other blocks when the first block's residual changed less than the threshold."

    def describe_available(self, env):
        return f"backends: {'para_attn (patched), ' if env.has_package('para_attn') else ''}diffusers"

    def resolve(self, config, env):
        if not config.first_block_cache:
            return config, StageReport(self.name, requested=False, active=False)
        backend, reason = config.cache_backend, ""
        if backend == "auto":
            backend = "para_attn" if env.has_package("para_attn") else "diffusers"
        elif backend == "para_attn" and not env.has_package("para_attn"):
            backend, reason = "diffusers", "para-attn is not installed; diffusers' cache ran instead"
        detail = f"{backend} backend, threshold {config.cache_threshold:g}"
        return config.with_changes(cache_backend=backend), StageReport(self.name, True, True, detail=detail, reason=reason)

    def apply_execution(self, transformer, config, build):
        if config.cache_backend == "para_attn":
            from para_attn.first_block_cache.diffusers_adapters.flux import apply_cache_on_transformer

            import patches.para_attn_cache_context_per_thread  # noqa: F401  (one cache context per thread)
            import patches.para_attn_first_block_cache  # noqa: F401  (version-checked runtime fix)

            apply_cache_on_transformer(transformer)
        else:
            from diffusers import FirstBlockCacheConfig

            transformer.enable_cache(FirstBlockCacheConfig(threshold=config.cache_threshold))
        build.note(f"first-block cache: {config.cache_backend} backend")

    def apply_request(self, run, config):
        stats = run.extras.setdefault("first_block_cache", {"backend": config.cache_backend, "threshold": config.cache_threshold})
        if config.cache_backend == "para_attn":
            run.contexts.append(_para_attn_request(config.cache_threshold, run.true_cfg, stats))
        else:
            run.contexts.append(_diffusers_request(run.transformer, config.cache_threshold, run.true_cfg, stats))


@contextlib.contextmanager
def _para_attn_request(threshold: float, true_cfg: bool, stats: dict):
    from para_attn.first_block_cache import utils

    context = _counting_context_class()(residual_diff_threshold=threshold, enable_alter_cache=true_cfg)
    with utils.cache_context(context):
        yield
    stats.update(transformer_calls=context.calls, computed=context.computed, skipped=context.calls - context.computed)


_COUNTING_CONTEXT = None


def _counting_context_class():
    """para-attn's CacheContext that also counts calls and fully computed calls."""
    global _COUNTING_CONTEXT
    if _COUNTING_CONTEXT is None:
        import dataclasses

        from para_attn.first_block_cache.utils import CacheContext

        @dataclasses.dataclass
        class CountingCacheContext(CacheContext):
            calls: int = 0
            computed: int = 0

            def mark_step_begin(self):
                self.calls += 1
                super().mark_step_begin()

            def set_buffer(self, name, buffer):
                # para-attn stores the first block's residual exactly when it computes the remaining blocks
                if name == "first_hidden_states_residual":
                    self.computed += 1
                super().set_buffer(name, buffer)

        _COUNTING_CONTEXT = CountingCacheContext
    return _COUNTING_CONTEXT


@contextlib.contextmanager
def _diffusers_request(transformer, threshold: float, true_cfg: bool, stats: dict):
    """diffusers' cache needs a named cache context around every transformer call; Kontext's
    pipeline sets none, so hooks open one per call ("cond", and "uncond" on the second call of a
    true-CFG step) and count the head block's decisions."""
    from diffusers.hooks import HookRegistry

    transformer._reset_stateful_cache()
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    head_hook = HookRegistry.check_if_exists_or_initialize(blocks[0]).get_hook("fbc_leader_block_hook")
    head_hook.threshold = threshold
    counts = {"calls": 0, "computed": 0}
    open_contexts: list = []

    def before(module, args, kwargs):
        name = "uncond" if true_cfg and counts["calls"] % 2 == 1 else "cond"
        context = transformer.cache_context(name)
        context.__enter__()
        open_contexts.append(context)
        counts["calls"] += 1

    def after(module, args, kwargs, output):
        counts["computed"] += int(head_hook.state_manager.get_state().should_compute)
        open_contexts.pop().__exit__(None, None, None)

    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True), transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_contexts:
            open_contexts.pop().__exit__(None, None, None)
        transformer._reset_stateful_cache()
    stats.update(transformer_calls=counts["calls"], computed=counts["computed"], skipped=counts["calls"] - counts["computed"])
