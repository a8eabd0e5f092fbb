"""Why the fast_gelu stage exists: the compiled kernels that apply the MLP's tanh GELU and the next
GEMM's FP8 row-wise quantization, timed with the tanh form, the sigmoid form and erf GELU.

    python -m benchmarks.gelu_kernels --out DIR     # writes gelu_kernels.json (GPU)

Shapes are the MLP hidden states of a 1024x1024 edit: double blocks (8192 image tokens x 12288) and
single blocks (8704 tokens x 15360: the attention output and MLP hidden concatenated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.fast_gelu import gelu_tanh_via_sigmoid

FP8_MAX = 448.0  # float8_e4m3fn


def rowwise_fp8(y: torch.Tensor):
    """The same arithmetic as torchao's dynamic row-wise FP8 activation quantization."""
    scale = y.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (y.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


CASES = {
    "copy (read + write bf16)": lambda x: x * 1.0,
    "FP8 quantization only": rowwise_fp8,
    "GELU tanh form (bf16 out)": lambda x: F.gelu(x, approximate="tanh"),
    "GELU sigmoid form (bf16 out)": gelu_tanh_via_sigmoid,
    "GELU tanh form + FP8 quantization": lambda x: rowwise_fp8(F.gelu(x, approximate="tanh")),
    "GELU sigmoid form + FP8 quantization": lambda x: rowwise_fp8(gelu_tanh_via_sigmoid(x)),
    "GELU erf + FP8 quantization": lambda x: rowwise_fp8(F.gelu(x)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from torch._inductor.utils import do_bench_using_profiling

    from stages.compile import INDUCTOR_SETTINGS

    rows = []
    for shape in [(8192, 12288), (8704, 15360)]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 3
        for name, fn in CASES.items():
            compiled = torch.compile(fn, fullgraph=True, options=INDUCTOR_SETTINGS["tuned"])
            compiled(x)
            us = do_bench_using_profiling(lambda: compiled(x)) * 1e3
            rows.append({"shape": list(shape), "case": name, "us": round(us, 1)})
            print(rows[-1], flush=True)
    x = torch.linspace(-12, 12, 1_000_001, device="cuda", dtype=torch.float32)
    reference = F.gelu(x.double(), approximate="tanh")
    accuracy = {
        "fp32 tanh form, max abs error vs float64": (F.gelu(x, approximate="tanh").double() - reference).abs().max().item(),
        "fp32 sigmoid form, max abs error vs float64": (gelu_tanh_via_sigmoid(x).double() - reference).abs().max().item(),
    }
    print(accuracy, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gelu_kernels.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "accuracy": accuracy}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
