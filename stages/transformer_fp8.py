"""FP8 transformer weights from the moment the model loads: the memory plan's main lever (on
FLUX.1-Kontext-dev the transformer drops from 23.8 GB in bf16 to about 15 GB).

The quantization stage (stage 3) builds an FP8 variant from the resident bf16 model, so both copies
sit on the GPU while it builds. This stage makes the base transformer itself FP8 when the model
loads instead: a checkpoint is quantized Linear by Linear as it is read (engine/loading.py passes
`checkpoint_config` to diffusers), a prequantized checkpoint is read as it is, and a model built in
code is quantized in place here. Either way the bf16 weights never reach the GPU, and no variant can
ask for them again (stages/rules.py switches the stages that need bf16 weights off). The Linears
quantized are stage 3's (stages/low_precision.py says which and why).

Formats:
    rowwise      FP8 e4m3 weights and dynamic FP8 activations, one scale per row: FP8 GEMMs, as stage
                 3's fp8 (needs FP8 tensor cores: Ada or Hopper, compute capability 8.9+)
    weight_only  FP8 e4m3 weights, one scale per row, dequantized for bf16 GEMMs: memory only, slower
                 per step than bf16; runs on any GPU and on the CPU
`auto` is rowwise where FP8 GEMMs run and weight_only elsewhere.
"""

from __future__ import annotations

import torch

from .base import Availability, Requirements, Stage, StageReport
from .low_precision import FP8_NATIVE, is_quantized_linear
from .tensors import is_quantized

FORMATS = ("rowwise", "weight_only")
DETAILS = {
    "rowwise": "FP8 e4m3 weights, dynamic FP8 activations, row-wise scales: FP8 GEMMs (torchao)",
    "weight_only": "FP8 e4m3 weights, row-wise scales, dequantized for each GEMM: memory only (torchao)",
}

# diffusers' TorchAoConfig names Linears by regular expression, first full match wins: the same
# set as `is_quantized_linear` (block Linears, modulation Linears excluded). Checked by the tests.
MODULATION_PATTERN = r"re:.*\.(norm1|norm1_context|norm)\.linear(\.weight)?"
BLOCK_PATTERN = r"re:(single_)?transformer_blocks\.\d+\..*"


def has_fp8_gemms(env) -> bool:
    return env.has_cuda and env.compute_capability >= FP8_NATIVE


def weight_config(fmt: str):
    """torchao's config for one format."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    # set_inductor_config=False: inductor settings are the compile stage's job, not a side effect here
    if fmt == "rowwise":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if fmt == "weight_only":
        return Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    raise ValueError(f"unknown FP8 transformer format {fmt!r}; known: {', '.join(FORMATS)}")


def checkpoint_config(fmt: str):
    """diffusers' quantization config that produces (while loading) and describes (when saved) this format."""
    from diffusers import TorchAoConfig
    from torchao.quantization import FqnToConfig

    return TorchAoConfig(FqnToConfig({MODULATION_PATTERN: None, BLOCK_PATTERN: weight_config(fmt)}))


def format_of(transformer: torch.nn.Module) -> str | None:
    """The FP8 format the transformer's weights are in, or None when they are not quantized."""
    for name, module in transformer.named_modules():
        if is_quantized_linear(module, name) and is_quantized(module.weight):
            return "weight_only" if getattr(module.weight, "act_quant_kwargs", None) is None else "rowwise"
    return None


class TransformerFp8(Stage):
    switch = "transformer_fp8"
    title = "FP8 transformer from load"
    summary = "FP8 transformer weights from the moment the model loads (prequantized, or quantized while loading); set by the memory plan."
    requirements = Requirements(packages=("torchao",))

    def availability(self, env):
        unmet = self.requirements.unmet(env)
        if unmet:
            return Availability(False, unmet)
        if has_fp8_gemms(env):
            return Availability(True, detail="auto = rowwise (FP8 GEMMs)")
        return Availability(True, detail="auto = weight_only (no FP8 tensor cores here: FP8 storage, bf16 GEMMs)")

    def resolve(self, config, env):
        settled = self.unrequested_or_unmet(config, env)
        if settled is not None:
            return settled
        fmt, reason = config.transformer_fp8, ""
        if fmt == "auto":
            fmt = "rowwise" if has_fp8_gemms(env) else "weight_only"
        elif fmt == "rowwise" and not has_fp8_gemms(env):
            where = f"{env.gpu.name} is {'.'.join(map(str, env.compute_capability))}" if env.has_cuda else "this machine has no GPU"
            fmt, reason = "weight_only", f"FP8 GEMMs need compute capability 8.9+ ({where}): FP8 storage with bf16 GEMMs instead"
        return config.with_changes(transformer_fp8=fmt), StageReport(self.name, True, True, detail=DETAILS[fmt], reason=reason)

    def apply_load(self, pipe, config, build):
        found = format_of(pipe.transformer)
        if found:
            build.note(f"transformer: FP8 {found} weights as loaded (prequantized, or quantized while loading)")
            return
        from torchao.quantization import quantize_

        count = sum(1 for name, module in pipe.transformer.named_modules() if is_quantized_linear(module, name))
        quantize_(pipe.transformer, weight_config(config.transformer_fp8), filter_fn=is_quantized_linear)
        build.note(f"transformer: {count} block Linears quantized in place to FP8 {config.transformer_fp8}")
