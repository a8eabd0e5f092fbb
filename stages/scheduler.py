"""Stage 4: the sampler. FlowMatch Euler (28 steps) is the baseline; DPM-Solver++ 2M runs 14.

Every request gets a fresh scheduler built from the base pipeline's FlowMatch config (the engine
hands the stage a fresh copy of it), so the Kontext shift settings (base/max shift, sequence
lengths, dynamic shifting) carry over to every solver and the pipeline's `mu` is honored. Which
solver `use_dpm_solver` means, and the step counts, follow benchmarks/solver_fidelity.py (results in benchmarks/results/solver-fidelity/).
"""

from __future__ import annotations

from .base import Stage

# Default denoising steps per scheduler, from benchmarks/solver_fidelity.py: DPM-Solver++ 2M Karras
# at 14 steps lands closer to the ODE solution than Euler at 28 on both test problems and at both
# measured output sizes; UniPC (diffusers' flow mode, same cost per step) needs 20 for that at
# 1024x1024 (at 14 it trails Euler-28 there), so it defaults to 20.
DEFAULT_STEPS: dict[str, int] = {"euler": 28, "dpmpp_2m_karras": 14, "unipc": 20}

_DESCRIPTIONS = {
    "euler": "FlowMatch Euler",
    "dpmpp_2m_karras": "DPM-Solver++ 2M Karras (data prediction, rho=7 in s/(1-s))",
    "unipc": "UniPC-bh2 order 2 (flow sigmas)",
}


def build_scheduler(name: str, base_config, **overrides):
    """A fresh scheduler `name` on the shifted schedule of `base_config` (a FlowMatch config).

    `overrides` reach FlowDPMSolverMultistepScheduler's config (the benchmark's ablations, e.g.
    sigma_spacing="shifted" or karras_range_factor=1).
    """
    if overrides and name != "dpmpp_2m_karras":
        raise ValueError(f"only dpmpp_2m_karras takes overrides, not {name!r}")
    # diffusers is imported here, not with the registry: the HTTP side imports the registry, not diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .flow_solvers import FlowDPMSolverMultistepScheduler, FlowUniPCMultistepScheduler

    if name == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base_config)
    if name == "dpmpp_2m_karras":
        return FlowDPMSolverMultistepScheduler.from_config(base_config, **{"solver_order": 2, "sigma_spacing": "karras", **overrides})
    if name == "unipc":
        return FlowUniPCMultistepScheduler.from_flow_match_config(base_config)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(DEFAULT_STEPS)}")


class Scheduler(Stage):
    """Stage 4: a sampler other than the pipeline's own FlowMatch Euler, built fresh for each request
    (the engine gives every request a fresh copy of the pipeline's own when this stage is off)."""

    switch = "scheduler"
    title = "DPM-Solver++ 2M Karras, 14 steps"
    summary = "DPM-Solver++ 2M Karras at 14 steps instead of FlowMatch Euler at 28."

    def describe_available(self, env):
        return ", ".join(f"{name} ({steps} steps)" for name, steps in DEFAULT_STEPS.items())

    def active_detail(self, config, env):
        return f"{_DESCRIPTIONS[config.scheduler]}, {DEFAULT_STEPS[config.scheduler]} steps unless the request says otherwise"

    def apply_request(self, run, config):
        run.scheduler = build_scheduler(config.scheduler, run.scheduler.config)  # on the pipeline's own shifted schedule
        run.default_steps = DEFAULT_STEPS[config.scheduler]
