"""Stage 3: low-precision GEMMs through torchao.

Formats, by GPU:
    fp8    e4m3 dynamic activation + e4m3 weight, one scale per row: native on Ada/Hopper (sm89+)
    mxfp8  MX e4m3 with 32-element block scales: native on Blackwell (sm100+)
    mxfp4  MX e2m1 with 32-element block scales: native on Blackwell; emulated elsewhere
    nvfp4  e2m1 with 16-element e4m3 block scales: Blackwell only (torchao has no emulation)
`auto` (and the legacy `use_mxfp4` flag) means the best native format of this GPU. On Hopper an
explicit mxfp8/mxfp4 request still runs, emulated (weights dequantized to bf16 for every GEMM),
and the report says so; it costs time instead of saving it.

Only the Linears inside the transformer blocks are quantized. The embedders, the final
normalization and projection, and the AdaLN modulation Linears stay bf16: they are a negligible
share of the FLOPs (the modulation GEMMs have one row per image), and their errors reach every token.
QKV fusion comes first (it concatenates plain and row-scaled FP8 weights only, stages/qkv_fusion.py):
the registry orders it.
"""

from __future__ import annotations

import logging

import torch

from .base import Availability, Requirements, Stage, StageReport
from .tensors import has_quantized_weights

log = logging.getLogger(__name__)

FP8_NATIVE = (8, 9)
MX_NATIVE = (10, 0)
QUANTIZED_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
MODULATION_SUFFIXES = ("norm1.linear", "norm1_context.linear", "norm.linear")


def is_quantized_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Which Linears get low-precision weights (see the module docstring for why)."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(QUANTIZED_BLOCK_PREFIXES) and not fqn.endswith(MODULATION_SUFFIXES)


def native_format(capability: tuple[int, int]) -> str | None:
    if capability >= MX_NATIVE:
        return "mxfp8"
    if capability >= FP8_NATIVE:
        return "fp8"
    return None


def _plan(requested: str, capability: tuple[int, int]) -> tuple[str | None, str, str]:
    """(format that will run or None, detail, reason)."""
    cc = ".".join(map(str, capability))
    if requested == "auto":
        best = native_format(capability)
        if best is None:
            return None, "", f"no FP8 or MX tensor cores on compute capability {cc} (needs 8.9+)"
        return best, "", ""
    if requested == "fp8":
        if capability < FP8_NATIVE:
            return None, "", f"FP8 GEMMs need compute capability 8.9+ (Ada/Hopper); this GPU is {cc}"
        return "fp8", "", ""
    if requested == "nvfp4":
        if capability < MX_NATIVE:
            return None, "", f"NVFP4 GEMMs need Blackwell (compute capability 10.0+); this GPU is {cc} and torchao has no NVFP4 emulation"
        return "nvfp4", "", ""
    # mxfp8 / mxfp4
    if capability < MX_NATIVE:
        return (
            requested,
            f"{requested} EMULATED: no MX tensor cores on {cc}; weights are dequantized to bf16 for every GEMM (slower than bf16)",
            "",
        )
    return requested, "", ""


DETAILS = {
    "fp8": "FP8 e4m3, dynamic activations, row-wise scales (torchao)",
    "mxfp8": "MXFP8 e4m3, 32-element block scales (torchao, native)",
    "mxfp4": "MXFP4 e2m1, 32-element block scales (torchao, native)",
    "nvfp4": "NVFP4 e2m1, 16-element e4m3 block scales (torchao, native)",
}


def torchao_config(fmt: str, capability: tuple[int, int]):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization.quantize_.common import KernelPreference

    if fmt == "fp8":
        # set_inductor_config=False: inductor settings are the compile stage's job, not a side effect here
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if fmt in ("mxfp8", "mxfp4"):
        from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig

        dtype = torch.float8_e4m3fn if fmt == "mxfp8" else torch.float4_e2m1fn_x2
        kernel = KernelPreference.AUTO if capability >= MX_NATIVE else KernelPreference.EMULATED
        return MXDynamicActivationMXWeightConfig(activation_dtype=dtype, weight_dtype=dtype, kernel_preference=kernel)
    if fmt == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

        return NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False)
    raise ValueError(f"unknown low-precision format {fmt!r}")


class LowPrecision(Stage):
    switch = "quantization"
    title = "low-precision GEMMs (best native format)"
    summary = "Low-precision GEMMs through torchao: FP8 row-wise on Ada/Hopper, MXFP8/MXFP4/NVFP4 on Blackwell."
    requirements = Requirements(cuda=True, packages=("torchao",))

    def availability(self, env):
        unmet = self.requirements.unmet(env)
        if unmet:
            return Availability(False, unmet)
        best = native_format(env.compute_capability)
        if best is None:
            return Availability(False, f"no FP8/MX tensor cores on {env.gpu.name}")
        return Availability(True, detail=f"native: {best}; auto = {best}")

    def resolve(self, config, env):
        settled = self.unrequested_or_unmet(config, env)
        if settled is not None:
            return settled
        fmt, detail, reason = _plan(config.quantization, env.compute_capability)
        if fmt is None:
            return self.switched_off(config), StageReport(self.name, True, False, reason=reason)
        report = StageReport(self.name, True, True, detail=detail or DETAILS[fmt], reason=reason)
        return config.with_changes(quantization=fmt), report

    def apply_weights(self, transformer, config, build):
        from torchao.quantization import quantize_

        if has_quantized_weights(transformer):  # FP8 from load; stages/rules.py normally keeps this stage off then
            build.note("quantization: the weights are already quantized (from load): not quantized again")
            return

        capability = build.env.compute_capability
        before = sum(1 for name, module in transformer.named_modules() if is_quantized_linear(module, name))
        quantize_(transformer, torchao_config(config.quantization, capability), filter_fn=is_quantized_linear)
        build.note(
            f"quantization: {config.quantization} weights in {before} block Linears (embedders, modulation and final projection stay bf16)"
        )
