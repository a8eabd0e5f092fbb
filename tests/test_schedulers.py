"""Stage 4: the flow-matching solvers are numerically right and drop into the Kontext pipeline."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

from benchmarks.solver_fidelity import GaussianFlow
from engine.model_builders import FLUX_SCHEDULER_CONFIG
from engine.requests import EditRequest
from stages.config import LEGACY_FLAGS, OptimizationConfig, SchedulerName, cumulative_config
from stages.flow_solvers import FlowDPMSolverMultistepScheduler, FlowUniPCMultistepScheduler, flow_lambda
from stages.scheduler import DEFAULT_STEPS, build_scheduler

BASE = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).config
MU_1024 = calculate_shift(4096, 256, 4096, 0.5, 1.15)  # a 1024x1024 output


def _gaussian(dim: int = 8) -> GaussianFlow:
    generator = torch.Generator().manual_seed(3)
    data = torch.randn(4000, dim, generator=generator) * torch.linspace(0.05, 1.0, dim) + torch.linspace(-0.5, 0.5, dim)
    return GaussianFlow(data @ torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0])


def _run(scheduler, velocity, noise, sigmas, mu, stop_before_last=False, dtype=torch.float32):
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    x = noise.to(dtype)
    timesteps = scheduler.timesteps[:-1] if stop_before_last else scheduler.timesteps
    for t in timesteps:
        x = scheduler.step(velocity(x, t.expand(x.shape[0]).to(x.dtype) / 1000), t, x, return_dict=False)[0]
    return x


# -- the solver's arithmetic --------------------------------------------------------------------------
def test_first_order_dpm_solver_step_is_flow_match_euler():
    """DDIM in data prediction is exact along straight lines, so it must coincide with Euler in v."""
    flow, noise = _gaussian(), torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    sigmas = np.linspace(1.0, 1 / 9, 9)
    euler = _run(FlowMatchEulerDiscreteScheduler.from_config(BASE), flow.velocity, noise, sigmas, MU_1024)
    ddim = _run(
        FlowDPMSolverMultistepScheduler.from_config(BASE, solver_order=1, sigma_spacing="shifted"), flow.velocity, noise, sigmas, MU_1024
    )
    assert torch.allclose(ddim, euler, atol=1e-5)


def test_dpm_solver_2m_converges_at_second_order_and_euler_at_first():
    """Against the exact Gaussian ODE solution at s = 0.2 (before the final first-order jump to 0).

    mu = 0 makes the time shift the identity, so the grid is exactly linspace(start, 0.2, N). From
    s = 0.9 DPM-Solver++ 2M is cleanly second order; from pure noise (s = 1) the first steps are
    O(1) apart in lambda however small h is, which costs a log factor but stays well above first order.
    """
    flow = _gaussian()
    noise = torch.randn(256, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = flow.exact(noise, s=0.2)

    def orders(make, start):
        x = flow.exact(noise, s=start)
        errors = []
        for n in (21, 41, 81):
            out = _run(make(), flow.velocity, x, np.linspace(start, 0.2, n), 0.0, stop_before_last=True, dtype=torch.float64)
            errors.append((out - target).norm().item())
        return [math.log2(a / b) for a, b in zip(errors, errors[1:])], errors[-1]

    dpm, dpm_error = orders(lambda: FlowDPMSolverMultistepScheduler.from_config(BASE, sigma_spacing="shifted"), 0.9)
    euler, euler_error = orders(lambda: FlowMatchEulerDiscreteScheduler.from_config(BASE), 0.9)
    assert all(1.9 < order < 2.2 for order in dpm), dpm
    assert all(0.9 < order < 1.1 for order in euler), euler
    assert dpm_error < euler_error / 100
    from_noise, _ = orders(lambda: FlowDPMSolverMultistepScheduler.from_config(BASE, sigma_spacing="shifted"), 1.0)
    assert all(1.5 < order < 2.2 for order in from_noise), from_noise


def test_final_step_lands_on_the_data_prediction():
    scheduler = FlowDPMSolverMultistepScheduler.from_config(BASE)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=MU_1024)
    scheduler.set_begin_index(0)
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    for t in scheduler.timesteps[:-1]:
        x = scheduler.step(torch.randn(2, 5), t, x, return_dict=False)[0]
    s_last = scheduler.sigmas[-2].item()
    assert torch.allclose(scheduler.step(v, scheduler.timesteps[-1], x, return_dict=False)[0], x - s_last * v, atol=1e-6)
    assert flow_lambda(1.0) == -math.inf and flow_lambda(0.0) == math.inf and flow_lambda(0.5) == 0.0


def test_bf16_model_gets_float32_solver_state():
    flow, noise = _gaussian(), torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    sigmas = np.linspace(1.0, 1 / 14, 14)
    for name in ("dpmpp_2m_karras", "unipc"):
        full = _run(build_scheduler(name, BASE), flow.velocity, noise, sigmas, MU_1024)
        scheduler = build_scheduler(name, BASE)
        half = _run(scheduler, flow.velocity, noise, sigmas, MU_1024, dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16
        assert (half.float() - full).norm() / full.norm() < 2e-2  # bf16 rounding of the latents only
    dpm = build_scheduler("dpmpp_2m_karras", BASE)
    _run(dpm, flow.velocity, noise, sigmas, MU_1024, stop_before_last=True, dtype=torch.bfloat16)
    assert dpm._previous_x0.dtype == torch.float32


# -- the schedule -------------------------------------------------------------------------------------
def _flow_match_sigmas(steps: int, mu: float) -> torch.Tensor:
    euler = FlowMatchEulerDiscreteScheduler.from_config(BASE)
    euler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return euler.sigmas


@pytest.mark.parametrize("mu", [0.5, MU_1024])
def test_karras_schedule_ramps_in_noise_to_signal_between_the_shifted_ends(mu):
    scheduler = build_scheduler("dpmpp_2m_karras", BASE)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 14, 14), mu=mu)
    sigmas = scheduler.sigmas.double()
    assert len(sigmas) == 15 and sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert sigmas[1].item() == pytest.approx(_flow_match_sigmas(14, mu)[1].item(), rel=1e-6)  # first finite shifted sigma
    assert sigmas[-2].item() == pytest.approx(_flow_match_sigmas(28, mu)[-2].item(), rel=1e-6)  # as clean as Euler-28 ends
    ramp = (sigmas[1:-1] / (1 - sigmas[1:-1])) ** (1 / 7)  # r^(1/rho) is linear along a Karras ramp
    steps = ramp.diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)
    assert torch.allclose(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)

    narrow = FlowDPMSolverMultistepScheduler.from_config(BASE, karras_range_factor=1.0)
    narrow.set_timesteps(sigmas=np.linspace(1.0, 1 / 14, 14), mu=mu)
    assert narrow.sigmas[-2].item() == pytest.approx(_flow_match_sigmas(14, mu)[-2].item(), rel=1e-6)


def test_shifted_spacing_is_flow_match_schedule_and_short_schedules_work():
    scheduler = FlowDPMSolverMultistepScheduler.from_config(BASE, sigma_spacing="shifted")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 14, 14), mu=MU_1024)
    assert torch.allclose(scheduler.sigmas, _flow_match_sigmas(14, MU_1024))
    flow, noise = _gaussian(), torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    for steps in (1, 2, 3):
        for name in ("dpmpp_2m_karras", "unipc"):
            assert torch.isfinite(
                _run(build_scheduler(name, BASE), flow.velocity, noise, np.linspace(1.0, 1 / steps, steps), MU_1024)
            ).all()


def test_every_scheduler_keeps_the_kontext_shift_config():
    for name in typing.get_args(SchedulerName):
        config = build_scheduler(name, BASE).config
        assert {key: config[key] for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")} == {
            key: BASE[key] for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        }
    unipc = build_scheduler("unipc", BASE)
    assert isinstance(unipc, FlowUniPCMultistepScheduler)
    unipc.set_timesteps(sigmas=np.linspace(1.0, 1 / 14, 14), mu=MU_1024)
    assert unipc.timesteps.dtype == torch.float32 and (unipc.timesteps != unipc.timesteps.round()).any()  # not truncated to ints


def test_use_dpm_solver_constants_agree_with_config_and_preset():
    _, use_dpm_solver = LEGACY_FLAGS["use_dpm_solver"]
    assert set(DEFAULT_STEPS) == set(typing.get_args(SchedulerName))
    assert DEFAULT_STEPS[use_dpm_solver.on] == 14 and DEFAULT_STEPS[use_dpm_solver.off] == 28
    assert cumulative_config(4).scheduler == use_dpm_solver.on


# -- through the engine and the real FluxKontextPipeline -----------------------------------------------
@pytest.fixture
def schedulers_used(monkeypatch):
    """The scheduler object of every FluxKontextPipeline call, as the pipeline saw it."""
    used, call = [], FluxKontextPipeline.__call__

    def recording_call(pipe, *args, **kwargs):
        used.append(pipe.scheduler)
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", recording_call)
    return used


@pytest.mark.parametrize("name", typing.get_args(SchedulerName))
def test_each_scheduler_runs_end_to_end_with_its_default_steps(tiny_engine, photo, name, schedulers_used):
    config = OptimizationConfig(scheduler=name)
    result = tiny_engine.edit(EditRequest(prompt="make the sky red", image=photo, seed=5, width=128, height=96), config)
    assert result.scheduler == name and result.steps == DEFAULT_STEPS[name] and len(result.timings.step_s) == DEFAULT_STEPS[name]
    pixels = np.asarray(result.images[0], dtype=np.float32)
    assert pixels.std() > 0
    report = next(r for r in result.stages if r.name == "scheduler")
    assert report.active == (name != "euler")
    expected = {
        "euler": FlowMatchEulerDiscreteScheduler,
        "dpmpp_2m_karras": FlowDPMSolverMultistepScheduler,
        "unipc": FlowUniPCMultistepScheduler,
    }
    expected = expected[name]
    assert [type(scheduler) for scheduler in schedulers_used] == [expected]


def test_request_steps_override_the_scheduler_default(tiny_engine, photo):
    request = EditRequest(prompt="x", image=photo, seed=1, steps=5, width=128, height=96)
    result = tiny_engine.edit(request, OptimizationConfig(scheduler="dpmpp_2m_karras"))
    assert result.steps == 5 and len(result.timings.step_s) == 5
    result = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, width=128, height=96), OptimizationConfig(scheduler="unipc"))
    assert result.steps == DEFAULT_STEPS["unipc"] and len(result.timings.step_s) == DEFAULT_STEPS["unipc"]


def test_seeded_dpm_solver_run_is_reproducible(tiny_engine, photo):
    config = OptimizationConfig(scheduler="dpmpp_2m_karras")
    request = EditRequest(prompt="make the sky red", image=photo, seed=21, steps=6, width=128, height=96)
    first, second = tiny_engine.edit(request, config), tiny_engine.edit(request, config)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    other = tiny_engine.edit(EditRequest(prompt="make the sky red", image=photo, seed=22, steps=6, width=128, height=96), config)
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))
    euler = tiny_engine.edit(request, OptimizationConfig())
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(euler.images[0]))


def test_pipeline_mu_reaches_the_scheduler(tiny_engine, schedulers_used):
    """Kontext computes mu from the output's token count; the timesteps must follow the image size."""
    config = OptimizationConfig(scheduler="dpmpp_2m_karras")
    used = {}
    for size in (128, 256):
        tiny_engine.edit(EditRequest(prompt="a house", seed=1, steps=6, width=size, height=size), config)
        used[size] = schedulers_used[-1].timesteps.clone()
    assert not torch.allclose(used[128], used[256])
    for size, timesteps in used.items():
        expected = build_scheduler("dpmpp_2m_karras", BASE)
        expected.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift((size // 16) ** 2, 256, 4096, 0.5, 1.15))
        assert torch.allclose(timesteps, expected.timesteps)
