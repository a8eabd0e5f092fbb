"""`doctor`: what this machine has and what every stage can do on it, in plain words."""

from __future__ import annotations

from stages.config import OptimizationConfig
from stages.environment import Environment
from stages.registry import resolve, stage_status


def render_doctor(env: Environment, config: OptimizationConfig) -> str:
    summary = env.summary()
    lines = ["FLUX.1-Kontext optimized: doctor", ""]
    lines.append(f"python        {summary['python']}")
    lines.append(f"torch         {summary['torch']} (CUDA {summary['torch_cuda'] or 'none: CPU build'})")
    lines.append(f"device        {summary['device']}")
    if env.gpu:
        gpu = summary["gpu"]
        lines.append(f"gpu           {gpu['name']}, compute capability {gpu['compute_capability']}, {gpu['total_memory_gb']} GB")
    else:
        lines.append("gpu           none (the tiny model is the default here)")
    lines.append("")
    lines.append("packages")
    for name, version in summary["packages"].items():
        lines.append(f"  {name:<20} {version or 'not installed'}")
    lines.append("")
    resolved = resolve(config, env)
    lines.append(f"stages, in benchmark order (default config: {config.describe()})")
    rows = sorted(stage_status(env), key=lambda row: (row["benchmark_stage"] is None, row["benchmark_stage"] or 0))
    for row in rows:
        report = resolved.report(row["name"])
        state = "available" if row["available"] else "unavailable"
        use = "ON " if report.active else ("off" if not report.requested else "SKIPPED")
        why = report.reason if report.requested and not report.active else (row["detail"] if row["available"] else row["reason"])
        preset = "-" if row["benchmark_stage"] is None else row["benchmark_stage"]
        lines.append(f"  [{preset}] {row['name']:<22} {state:<12} {use:<8} {why}")
    return "\n".join(lines)
