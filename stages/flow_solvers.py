"""Multistep solvers for rectified-flow models that drop into FluxKontextPipeline.

FLUX is a rectified flow: x_s = (1 - s) x_0 + s e with s the flow sigma (1 = noise, 0 = data), and
the network predicts v = e - x_0. In diffusion terms alpha = 1 - s, sigma = s, the data prediction
is x_0 = x_s - s v and the half log-SNR is lambda = log((1 - s) / s).

DPM-Solver++ (Lu et al. 2022) integrates the probability-flow ODE exactly in everything but the data
prediction, which it treats as a polynomial in lambda:

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D,      h = lambda_t - lambda_s.

With alpha = 1 - s, sigma = s the coefficient simplifies: alpha_t e^{-h} = alpha_s sigma_t /
sigma_s, so alpha_t (1 - e^{-h}) = 1 - s_t / s_s and the step is a plain interpolation toward D,

    x_t = (s_t / s_s) x_s + (1 - s_t / s_s) D.

D = x_0 (current) is the first-order step; for a straight-line path it is exactly FlowMatch Euler,
x_s + (s_t - s_s) v. The 2M step replaces it by the linear extrapolation in lambda through the
previous data prediction, D = x_0 + (x_0 - x_0_prev) / (2 r) with r = h_prev / h. The first step has
no previous prediction, and two ends force first order as well: starting at s = 1 (lambda = -inf)
makes h_prev infinite, so the correction vanishes on the second step by itself; the last step ends
at s = 0 (lambda = +inf), h is infinite and the extrapolation would diverge, so it is taken first
order (x_t = x_0 exactly).

Karras spacing (rho = 7) is applied in the flow's own noise-to-signal ratio r = s / (1 - s) =
e^{-lambda} (EDM's sigma for this parameterization) over the range of the shifted Kontext schedule,
so the resolution-dependent shift (mu) still sets how noisy the schedule starts and how clean it
ends. Two choices about the ends, both measured in benchmarks/solver_fidelity.py:
- The shifted schedule starts at s = 1, where r is infinite. That point stays the first step (from
  pure noise, where the pipeline's latents are) and the ramp starts at the schedule's next sigma.
- The last step to 0 is first order for every solver, so the error it leaves is set by the last
  nonzero sigma, not by the solver's order. Ending the ramp where the N-step shifted schedule ends
  (s = 0.20 at 14 steps and 1024x1024) leaves that error dominant: DPM-Solver++ 2M at 14 steps then
  has 1.2-1.3x the error of Euler at 28 at that size, with Karras or plain spacing alike. By default
  (karras_range_factor = 2) the ramp ends where the shifted schedule with twice the steps ends, i.e.
  as clean as the Euler-at-2N schedule it replaces (at 14 steps exactly Euler-28's last sigma);
  Karras's small steps near that end then make the extra range affordable.

UniPC comes from diffusers unchanged except for two things the Kontext pipeline needs: float
timesteps (diffusers casts them to int64, which shifts the time the transformer sees by up to 1/1000
of the schedule) and float32 solver state when the model runs in bf16.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

SigmaSpacing = Literal["shifted", "karras"]


def flow_lambda(s: float) -> float:
    """Half log-SNR of flow sigma s, with the infinite ends spelled out (math.log(0) raises)."""
    if s >= 1.0:
        return -math.inf
    if s <= 0.0:
        return math.inf
    return math.log1p(-s) - math.log(s)


def karras_flow_sigmas(first: float, last: float, count: int, rho: float = 7.0) -> np.ndarray:
    """`count` flow sigmas from `first` to `last` (both < 1), spaced like Karras et al. in r = s / (1 - s)."""
    r_first, r_last = first / (1.0 - first), last / (1.0 - last)
    ramp = np.linspace(0.0, 1.0, count)
    r = (r_first ** (1 / rho) + ramp * (r_last ** (1 / rho) - r_first ** (1 / rho))) ** rho
    return r / (1.0 + r)


class FlowDPMSolverMultistepScheduler(FlowMatchEulerDiscreteScheduler):
    """DPM-Solver++ (first order, i.e. DDIM, or 2M) in data prediction for rectified flow, on FlowMatch's shifted schedule.

    Inherits FlowMatchEuler's config (shift, dynamic shifting with `mu`, base/max shift and sequence
    lengths), its `set_timesteps(num_inference_steps, device, sigmas, mu)` and its timesteps on the
    0..1000 scale, so it is built with `from_config(<the base FlowMatch config>)` and plugs into
    FluxKontextPipeline unchanged. Solver arithmetic is float32 with float64 scalar coefficients.
    """

    order = 1  # one model evaluation per step, like every multistep solver
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        solver_order: int = 2,
        sigma_spacing: SigmaSpacing = "karras",
        karras_rho: float = 7.0,
        karras_range_factor: float = 2.0,
    ):
        flags = dict(
            invert_sigmas=invert_sigmas,
            stochastic_sampling=stochastic_sampling,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            shift_terminal=shift_terminal,
        )
        unsupported = [name for name, value in flags.items() if value]
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} does not support {', '.join(unsupported)}; "
                "leave them off and pick the spacing with sigma_spacing ('shifted' or 'karras')"
            )
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, not {solver_order}")
        if karras_range_factor < 1:
            raise ValueError(f"karras_range_factor must be >= 1 (1 = the N-step schedule's own last sigma), not {karras_range_factor}")
        if sigma_spacing not in ("shifted", "karras"):
            raise ValueError(f"sigma_spacing must be 'shifted' or 'karras', not {sigma_spacing!r}")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            time_shift_type=time_shift_type,
        )
        self._schedule = np.array([1.0, 0.0])  # float64 copy of self.sigmas for the step coefficients
        self._previous_x0 = None

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if timesteps is not None:
            raise ValueError(f"{type(self).__name__} takes sigmas, not custom timesteps")
        # FlowMatch applies the shift (static, or dynamic with the pipeline's mu) and appends 0.
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        shifted = self.sigmas.double().cpu().numpy()[:-1]
        if self.config.sigma_spacing == "karras":
            last_input = float(sigmas[-1]) if sigmas is not None else self.sigma_min  # FlowMatch's grid before the shift
            shifted = self._karras_respaced(shifted, self._shifted(last_input / self.config.karras_range_factor, mu))
        self._schedule = np.append(shifted, 0.0)
        self.sigmas = torch.from_numpy(self._schedule).to(dtype=torch.float32, device=self.sigmas.device)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._previous_x0 = None

    def _shifted(self, sigma: float, mu: float | None) -> float:
        """One input sigma through the same shift FlowMatch applies in set_timesteps."""
        if self.config.use_dynamic_shifting:
            return float(self.time_shift(mu, 1.0, sigma))
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def _karras_respaced(self, shifted: np.ndarray, last: float) -> np.ndarray:
        starts_at_noise = shifted[0] >= 1.0  # r = inf there: keep it and ramp from the next sigma
        ramp = shifted[1:] if starts_at_noise else shifted
        if len(ramp) < 2:
            return shifted
        spaced = karras_flow_sigmas(float(ramp[0]), min(last, float(ramp[-1])), len(ramp), self.config.karras_rho)
        return np.concatenate([shifted[:1], spaced]) if starts_at_noise else spaced

    def step(self, model_output, timestep, sample, return_dict: bool = True, **unused):
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        s, s_next = float(self._schedule[index]), float(self._schedule[index + 1])
        x = sample.to(torch.float32)
        x0 = x - s * model_output.to(torch.float32)

        data = x0
        if self.config.solver_order == 2 and self._previous_x0 is not None and s_next > 0.0:
            lam_prev, lam, lam_next = flow_lambda(float(self._schedule[index - 1])), flow_lambda(s), flow_lambda(s_next)
            if math.isfinite(lam_prev):  # from s = 1 the previous interval is infinite: no correction
                r = (lam - lam_prev) / (lam_next - lam)
                data = x0 + (x0 - self._previous_x0) * (0.5 / r)
        ratio = s_next / s
        prev_sample = ratio * x + (1.0 - ratio) * data

        self._previous_x0 = x0 if s_next > 0.0 else None
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


class FlowUniPCMultistepScheduler(UniPCMultistepScheduler):
    """diffusers' UniPC in flow mode, with float timesteps and float32 solver state."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        prev_sample = super().step(model_output.to(torch.float32), timestep, sample.to(torch.float32), return_dict=False)[0]
        prev_sample = prev_sample.to(model_output.dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    @classmethod
    def from_flow_match_config(cls, base_config, solver_order: int = 2) -> "FlowUniPCMultistepScheduler":
        """UniPC on the same shifted schedule as a FlowMatch config (shift, dynamic shift, sequence lengths).

        The base/max shift and sequence lengths are not UniPC arguments, but FluxKontextPipeline reads them
        from `scheduler.config` to compute mu, so they are registered alongside.
        """
        scheduler = cls(
            num_train_timesteps=base_config["num_train_timesteps"],
            solver_order=solver_order,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=base_config.get("shift", 1.0),
            use_dynamic_shifting=base_config.get("use_dynamic_shifting", False),
            time_shift_type=base_config.get("time_shift_type", "exponential"),
            shift_terminal=base_config.get("shift_terminal"),
            final_sigmas_type="zero",
        )
        scheduler.register_to_config(**{key: base_config[key] for key in _MU_KEYS if key in base_config})
        return scheduler


_MU_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
