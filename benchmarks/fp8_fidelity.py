"""How far FP8 attention moves the picture, next to how far the FP8 GEMMs move it (eager, so that no
compile is needed; the numerics are the compiled ones up to fusion order).

    python -m benchmarks.fp8_fidelity --model synthetic-full --out DIR      # writes fp8_fidelity.{json,md}

Four configurations from the same seed and input, everything else at stage 0 except the sampler
(DPM-Solver++ 14 steps): bf16 GEMMs + bf16 FA3 (the reference), FP8 GEMMs, FP8 attention, both.
For each: the relative L2 distance and PSNR of the edited image against the reference, and the
relative L2 of one transformer call's output on identical inputs. FP8 attention belongs in the
default stack only if it moves the picture no more than the FP8 GEMMs do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from engine.benchmark.kernels import capture_transformer_inputs
from engine.benchmark.report import deviation
from engine.benchmark.runner import benchmark_input_image, environment_meta
from engine.engine import KontextEngine
from engine.requests import EditRequest
from stages.config import OptimizationConfig

CONFIGS = {
    "reference: bf16 GEMMs, bf16 FA3": {},
    "FP8 GEMMs": {"quantization": "fp8"},
    "FP8 attention": {"attention": "fa3_fp8"},
    "FP8 GEMMs + FP8 attention": {"quantization": "fp8", "attention": "fa3_fp8"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    engine = KontextEngine.load(args.model, args.device, max_variants=4)  # no rebuilds between the four configs
    base = OptimizationConfig(scheduler="dpmpp_2m_karras", attention="fa3" if engine.env.has_cuda else "sdpa")
    request = EditRequest(
        prompt="make the sky red", image=benchmark_input_image(args.size, args.size), width=args.size, height=args.size, seed=0
    )
    inputs = capture_transformer_inputs(engine, request)
    rows, reference_pixels, reference_output = [], None, None
    for label, changes in CONFIGS.items():
        config = base.with_changes(**changes)
        result = engine.edit(request, config)
        pixels = np.asarray(result.images[0], dtype=np.float64) / 255.0
        pipe, _, _ = engine.variants.pipeline_for(engine.resolve(config).effective)
        with torch.no_grad():
            output = pipe.transformer(**inputs)[0].float()
        if reference_pixels is None:
            reference_pixels, reference_output = pixels, output
        image_rel, psnr = deviation(pixels, reference_pixels)
        step_rel = float((output - reference_output).norm() / reference_output.norm())
        ran = {report.name: report.detail for report in result.stages if report.active and report.name in ("attention", "quantization")}
        rows.append({"config": label, "ran": ran, "image_rel_l2": image_rel, "image_psnr_db": psnr, "step_output_rel_l2": step_rel})
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment_meta(engine)
    (args.out / "fp8_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# FP8 fidelity ({meta['device']}, {meta['date']}, {args.model}, {args.size}x{args.size} edit, DPM-Solver++ 14 steps, eager)",
        "",
    ]
    lines += ["| config | what ran | image rel. L2 | image PSNR dB | one step's output rel. L2 |", "|---|---|---|---|---|"]
    for row in rows:
        psnr = "-" if row["image_psnr_db"] is None else f"{row['image_psnr_db']:.1f}"
        lines.append(
            f"| {row['config']} | {row['ran'] or 'stage 0'} | {row['image_rel_l2']:.4f} | {psnr} | {row['step_output_rel_l2']:.4f} |"
        )
    (args.out / "fp8_fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
