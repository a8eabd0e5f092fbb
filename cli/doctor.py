"""`doctor`: what this machine has, the memory plan it gets, and what every stage can do on it, in plain words."""

from __future__ import annotations

from engine.lora_files import available_files
from engine.lora_settings import LoraSettings
from engine.memory_plan import COMPILE_WORKSPACE_GIB, CUDA_GRAPH_POOL_GIB, TIERS, MemoryPlan
from stages.config import OptimizationConfig, cumulative_config
from stages.environment import Environment
from stages.registry import resolve, stage_status


def render_doctor(env: Environment, config: OptimizationConfig, plan: MemoryPlan, lora: LoraSettings | None = None) -> str:
    summary = env.summary()
    lines = ["FLUX.1-Kontext optimized: doctor", ""]
    lines.append(f"python        {summary['python']}")
    lines.append(f"torch         {summary['torch']} (CUDA {summary['torch_cuda'] or 'none: CPU build'})")
    lines.append(f"device        {summary['device']}")
    if env.gpu:
        gpu = summary["gpu"]
        free = "" if gpu["free_memory_gb"] is None else f", {gpu['free_memory_gb']} GiB free"
        lines.append(f"gpu           {gpu['name']}, compute capability {gpu['compute_capability']}, {gpu['total_memory_gb']} GiB{free}")
    else:
        lines.append("gpu           none (the tiny model is the default here)")
    lines.append("")
    lines.append("packages")
    for name, version in summary["packages"].items():
        lines.append(f"  {name:<20} {version or 'not installed'}")
    lines.append("")
    lines.extend(_memory_lines(plan))
    lines.extend(_full_stack_lines(env, plan))
    lines.append("")
    if lora is not None:  # the server's own: responses name adapters, never this path
        directory = lora.resolved_directory
        lines.append(f"lora dir      {directory} ({len(available_files(directory))} adapter files; mode {lora.mode})")
        lines.append("")
    resolved = resolve(config, env)
    lines.append(f"stages, in benchmark order (default config: {config.describe()})")
    rows = sorted(stage_status(env), key=lambda row: (row["preset"] is None, row["preset"] or 0))
    for row in rows:
        report = resolved.report(row["name"])
        state = "available" if row["available"] else "unavailable"
        use = "ON " if report.active else ("off" if not report.requested else "SKIPPED")
        if report.active:
            why = "; ".join(part for part in (report.detail or row["detail"], report.reason) if part)
        elif report.requested:
            why = report.reason
        else:
            why = row["detail"] if row["available"] else row["reason"]
        preset = "-" if row["preset"] is None else row["preset"]
        lines.append(f"  [{preset}] {row['name']:<22} {state:<12} {use:<8} {why}")
    return "\n".join(lines)


def _memory_lines(plan: MemoryPlan) -> list[str]:
    tier = plan.tier
    budget = plan.source if plan.budget_gib is None else f"{plan.budget_gib:.1f} GiB: {plan.source}"
    lines = [f"memory plan   {tier.name} tier ({budget})"]
    lines.append(f"  what         {tier.summary}")
    lines.append(f"  knobs        {', '.join(f'{k}={v}' for k, v in tier.changes.items()) or 'none (as configured)'}")
    lines.append(f"  costs        {tier.cost}")
    if plan.budget_gib is not None:
        estimate = f"{tier.estimated_peak_gib} GiB for FLUX.1-Kontext-dev at 1024x1024"
        lower = TIERS[TIERS.index(tier) - 1].min_free_gib if tier.min_free_gib == 0 else None
        span = f"below {lower:g} GiB" if lower else f"from {tier.min_free_gib:g} GiB"
        lines.append(f"  needs about  {estimate} (an estimate; this tier {span})")
    lines.extend(f"  note         {note}" for note in plan.notes)
    return lines


def _full_stack_lines(env: Environment, plan: MemoryPlan) -> list[str]:
    """Each tier with the full stack (preset 5) as the rules leave it on this machine: compile and
    CUDA graphs on or off (and why), and the estimated peak they add to (engine/memory_plan.py)."""
    lines = ["  full stack   per tier, preset 5 on this machine (estimated peak for FLUX.1-Kontext-dev at 1024x1024)"]
    for tier in TIERS:
        resolved = resolve(cumulative_config(5).with_changes(**tier.changes), env)
        compiled, graphs = resolved.effective.compile, resolved.effective.cuda_graphs
        parts = (
            f"compile +{COMPILE_WORKSPACE_GIB:.1f}" if compiled else "compile off",
            f"CUDA graphs +{CUDA_GRAPH_POOL_GIB:.1f}" if graphs else "CUDA graphs off",
        )
        off = [f"{name}: {resolved.skipped[name]}" for name in ("compile", "cuda_graphs") if name in resolved.skipped]
        why = f"; {off[0]}" if off else ""
        peak = tier.estimated_peak_with(compiled, graphs)
        lines.append(f"    {tier.name:<7} {peak:>5.1f} GiB (eager {tier.estimated_peak_gib:.1f}; {', '.join(parts)}){why}")
        if tier is plan.tier and plan.budget_gib is not None and peak > plan.budget_gib:
            lines.append(
                f"    note: the full stack's estimate is above the {plan.budget_gib:.1f} GiB budget: "
                f"--no-cuda-graphs gives back about {CUDA_GRAPH_POOL_GIB:.1f} GiB"
            )
    return lines
