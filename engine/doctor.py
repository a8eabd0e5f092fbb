"""`doctor`: what this machine has and what every stage can do on it, in plain words."""

from __future__ import annotations

import stages

from .config import OptimizationConfig
from .environment import Environment


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
    resolved = stages.resolve(config, env)
    active = {report.name: report for report in resolved.reports}
    lines.append(f"stages (default config: {config.describe()})")
    for row in stages.stage_status(env):
        state = "available" if row["available"] else "unavailable"
        report = active[row["name"]]
        use = "ON " if report.active else ("off" if not report.requested else "SKIPPED")
        why = row["detail"] if row["available"] else row["reason"]
        lines.append(f"  [{row['benchmark_stage']}] {row['name']:<18} {state:<12} {use:<8} {why}")
    return "\n".join(lines)
