"""What the LoRA merge does to the picture, next to what the slots do: one process, one set of
weights, one adapter, the same request (eager, so that no compile is needed).

    python -m benchmarks.lora_fidelity --model synthetic-full --out DIR      # writes lora_fidelity.{json,md}

The reference is bf16 weights with the adapter beside them (slots, bf16 LoRA path). Against it:
the slots on FP8 GEMMs (W rounded to FP8, the adapter in bf16), the merge on FP8 GEMMs (W + BA
rounded to FP8 once), the merge on bf16 weights (W + BA rounded to bf16 once), and the FP8 base
without the adapter, which shows how far the adapter itself moves the picture. The mode is a server
setting; here one engine runs in slots mode and then in merge mode, so that both see the same
weights (a second engine on the same model would move weights between host and GPU behind the
first one's back: engine/variants.py manages residency per engine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.benchmark.report import deviation
from engine.benchmark.runner import benchmark_input_image, environment_meta
from engine.engine import KontextEngine
from engine.lora_settings import LoraSettings
from engine.requests import EditRequest, LoraChoice
from stages.config import OptimizationConfig

ADAPTER = "fidelity"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from benchmarks.lora_adapters import block_targets, random_adapter, save_diffusers

    lora_dir = Path(tempfile.mkdtemp(prefix="lora-fidelity-"))
    slots_mode = LoraSettings(directory=str(lora_dir), mode="slots", slots=1, max_rank=64)
    try:
        engine = KontextEngine.load(args.model, args.device, max_variants=4, lora=slots_mode)
        transformer = engine.loaded.pipe.transformer
        state, config = random_adapter(transformer, args.rank, seed=1, targets=block_targets(transformer), gain=0.1)
        save_diffusers(lora_dir / f"{ADAPTER}.safetensors", state, config)
        engine.loras.load(ADAPTER)
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)  # the adapter lives in device memory now

    cuda = engine.env.has_cuda
    bf16 = OptimizationConfig(scheduler="dpmpp_2m_karras", fuse_qkv=True, attention="fa3" if cuda else "sdpa")
    fp8 = bf16.with_changes(quantization="fp8" if cuda else "none")
    request = EditRequest(
        prompt="make the sky red", image=benchmark_input_image(args.size, args.size), width=args.size, height=args.size, seed=0
    )
    with_adapter = (LoraChoice(ADAPTER, 1.0),)
    runs = [  # slots first: the bf16 merge writes into the base weights (restored at the end)
        ("reference: bf16 weights, adapter beside them (slots)", "slots", bf16, with_adapter),
        ("slots on FP8 GEMMs", "slots", fp8, with_adapter),
        ("FP8 GEMMs without the adapter", "slots", fp8, ()),
        ("merge on FP8 GEMMs (re-quantized)", "merge", fp8, with_adapter),
        ("merge on bf16 weights", "merge", bf16, with_adapter),
    ]
    rows, reference = [], None
    for label, mode, config, loras in runs:
        engine.loras.settings = dataclasses.replace(slots_mode, mode=mode)  # what serve --lora-mode sets at start
        result = engine.edit(dataclasses.replace(request, loras=loras), config)
        pixels = np.asarray(result.images[0], dtype=np.float64) / 255.0
        reference = pixels if reference is None else reference
        rel, psnr = deviation(pixels, reference)
        ran = result.config.describe()
        rows.append({"run": label, "config": ran, "image_rel_l2": rel, "image_psnr_db": psnr, "lora": result.extras.get("lora", {})})
        print({key: rows[-1][key] for key in ("run", "image_rel_l2", "image_psnr_db")}, flush=True)
    engine.variants.merged.restore()

    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment_meta(engine)
    (args.out / "lora_fidelity.json").write_text(json.dumps({"meta": meta, "rank": args.rank, "rows": rows}, indent=2))
    lines = [
        f"# LoRA merge vs slots: the picture ({meta['device']}, {meta['date']}, {args.model}, {args.size}x{args.size} edit, "
        f"one rank-{args.rank} adapter on every attention and MLP Linear, DPM-Solver++ 14 steps, eager)",
        "",
        "| run | config | image rel. L2 vs reference | PSNR dB |",
        "|---|---|---|---|",
    ]
    for row in rows:
        psnr = "-" if row["image_psnr_db"] is None else f"{row['image_psnr_db']:.1f}"
        rel = "-" if row["image_rel_l2"] is None else f"{row['image_rel_l2']:.4f}"
        lines.append(f"| {row['run']} | {row['config']} | {rel} | {psnr} |")
    lines.append(f"\ntorch {meta['torch']}, CUDA {meta['cuda']}")
    (args.out / "lora_fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
