"""Solver fidelity: how far each scheduler lands from the ODE solution, per number of model calls.

    python -m benchmarks.solver_fidelity                 # table on stdout, results/solver-fidelity/
    python -m benchmarks.solver_fidelity --samples 256 --steps 10 14 28

Two rectified-flow problems with FLUX's parameterization (x_s = (1 - s) x_0 + s e, velocity
v = e - x_0), both in the 64 dimensions of scikit-learn's 8x8 digits scaled to [-1, 1]:

  gaussian  data ~ N(mean, cov) of the digits: the velocity and the ODE's end point are exact in
            closed form, so the reference itself is checked against the truth;
  digits    a small MLP trained by flow matching on the digits (under 10 s on an idle 2-core CPU).

Solvers: the three a request can pick (euler, dpmpp_2m_karras, unipc), DPM-Solver++ 2M on the plain
shifted spacing, and two ablations of the Karras ramp's range (see SOLVER_VARIANTS). Every scheduler is
built by stages.scheduler (the engine's own code) and driven by the loop
FluxKontextPipeline runs: `set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)`, the model called at
timestep / 1000, `scheduler.step`. mu is Kontext's dynamic shift for a given output size
(diffusers' calculate_shift on the FLUX scheduler config). The reference is classical RK4 with 1000
steps on the same shifted schedule from the same noise; its own error is estimated against RK4 with
500 steps and, for the Gaussian, against the exact solution. Error = RMS over samples and dimensions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

from engine.model_builders import FLUX_SCHEDULER_CONFIG
from stages.environment import package_version
from stages.scheduler import build_scheduler

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "solver-fidelity"


@dataclass(frozen=True)
class Solver:
    scheduler: str  # a stages.scheduler name
    description: str
    overrides: tuple = ()  # scheduler config overrides, as (key, value) pairs
    grid_reach: int = 1  # the input sigma grid runs to 1 / (grid_reach * N); the pipeline's is 1


# The schedulers a request can pick, the plain-spacing DPM-Solver++, and the ablations of the Karras range.
SOLVER_VARIANTS = {
    "euler": Solver("euler", "FlowMatch Euler (diffusers), the pipeline's shifted schedule"),
    "unipc": Solver("unipc", "UniPC bh2, order 2, diffusers' flow mode on the shifted schedule"),
    "dpmpp_2m": Solver(
        "dpmpp_2m_karras", "DPM-Solver++ 2M on the pipeline's shifted schedule (plain spacing)", (("sigma_spacing", "shifted"),)
    ),
    "dpmpp_2m_karras": Solver(
        "dpmpp_2m_karras", "DPM-Solver++ 2M Karras as shipped: rho=7 ramp in s/(1-s) down to the 2N-step schedule's last sigma"
    ),
    "dpmpp_2m_karras_n_range": Solver(
        "dpmpp_2m_karras", "ablation: the same Karras ramp ending at the N-step schedule's last sigma", (("karras_range_factor", 1.0),)
    ),
    "dpmpp_2m_2n_range": Solver(
        "dpmpp_2m_karras",
        "ablation: plain shifted spacing stretched to the 2N-step schedule's last sigma",
        (("sigma_spacing", "shifted"),),
        grid_reach=2,
    ),
}
SOLVERS = tuple(SOLVER_VARIANTS)
STEP_COUNTS = (7, 10, 14, 20, 28, 40)
REFERENCE_STEPS = 1000
# Output latent tokens -> mu: 256 tokens is a 256x256 edit (mu 0.5), 4096 a 1024x1024 one (mu 1.15).
IMAGE_SEQ_LENS = (4096, 256)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, D], t in 0..1 [B]) -> v


def base_scheduler_config():
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).config


def kontext_mu(image_seq_len: int, config=None) -> float:
    """The dynamic shift FluxKontextPipeline computes for `image_seq_len` output tokens."""
    config = config or base_scheduler_config()
    return calculate_shift(
        image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"]
    )


def digits_data() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data / 8.0 - 1.0, dtype=torch.float32)  # pixel values 0..16 -> [-1, 1]


# -- problem (a): Gaussian data, exact velocity and exact ODE solution --------------------------------
class GaussianFlow:
    """Rectified flow to N(mean, U diag(c^2) U^T). Along each eigenvector the marginal at s is
    N((1 - s) m, (1 - s)^2 c^2 + s^2) and the ODE keeps a point's z-score, so x(0) = m + U diag(c) U^T x(1)."""

    name = "gaussian"

    def __init__(self, data: torch.Tensor, variance_floor: float = 1e-4):
        data = data.double()
        self.mean = data.mean(0)
        cov = torch.cov(data.T)
        variances, self.basis = torch.linalg.eigh(cov)
        # Border pixels of the digits never light up; a floor (a quantization step's variance, about
        # (0.01)^2) keeps the velocity finite near s = 0 without changing the rest of the spectrum.
        self.variances = variances.clamp_min(variance_floor)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = t.double()[:, None]
        z = (x.double() - (1 - s) * self.mean) @ self.basis
        spread = (1 - s) ** 2 * self.variances + s**2
        v = (z * (s - (1 - s) * self.variances) / spread) @ self.basis.T - self.mean
        return v.to(x.dtype)

    def exact(self, noise: torch.Tensor, s: float = 0.0) -> torch.Tensor:
        """Where the ODE started at `noise` (s = 1) is at flow sigma `s`."""
        spread = ((1 - s) ** 2 * self.variances + s**2).sqrt()
        return ((1 - s) * self.mean + ((noise.double() @ self.basis) * spread) @ self.basis.T).to(noise.dtype)


# -- problem (b): a flow-matching MLP trained on the digits --------------------------------------------
class VelocityMLP(torch.nn.Module):
    def __init__(self, dim: int = 64, width: int = 128, frequencies: int = 8):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 2 * frequencies, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(x.dtype)[:, None] * self.frequencies
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


class DigitsFlow:
    name = "digits"

    def __init__(self, model: VelocityMLP, train_seconds: float, final_loss: float):
        self.model = model.eval().requires_grad_(False)
        self.train_seconds, self.final_loss = train_seconds, final_loss

    @classmethod
    def train(cls, data: torch.Tensor, iterations: int = 2000, width: int = 128, batch: int = 256, seed: int = 0) -> "DigitsFlow":
        """Flow matching: regress v = e - x_0 at x_s = (1 - s) x_0 + s e, s uniform on (0, 1)."""
        start = time.perf_counter()
        with _denormals_flushed(), one_cpu_thread():
            model, loss = cls._fit(data, iterations, width, batch, seed)
        return cls(model, time.perf_counter() - start, loss)

    @staticmethod
    def _fit(data: torch.Tensor, iterations: int, width: int, batch: int, seed: int) -> tuple[VelocityMLP, float]:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VelocityMLP(dim=data.shape[1], width=width)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
        for _ in range(iterations):
            x0 = data[torch.randint(0, len(data), (batch,), generator=generator)]
            noise = torch.randn(x0.shape, generator=generator)
            s = torch.rand(batch, generator=generator)
            xs = (1 - s[:, None]) * x0 + s[:, None] * noise
            loss = (model(xs, s) - (noise - x0)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        return model, loss.item()

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with _denormals_flushed():
            return self.model(x.float(), t.float()).to(x.dtype)


@contextlib.contextmanager
def one_cpu_thread():
    """These problems are a few hundred 64-wide rows: one thread is as fast as two on an idle CPU, and
    on a busy one two OpenMP threads waiting for each other made training 4x and RK4 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _denormals_flushed():
    """Denormal floats (early in training, and near s = 0) make x86 CPUs up to 10x slower."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# -- the solvers, driven like FluxKontextPipeline --------------------------------------------------
def kontext_sigmas(steps: int, reach: int = 1) -> np.ndarray:
    return np.linspace(1.0, 1 / (reach * steps), steps)  # reach 1: what FluxKontextPipeline passes to set_timesteps


@torch.no_grad()
def solve(name: str, velocity: Velocity, noise: torch.Tensor, steps: int, mu: float, config=None) -> torch.Tensor:
    """The pipeline's denoising loop with solver variant `name`; one velocity call per step."""
    solver = SOLVER_VARIANTS[name]
    scheduler = build_scheduler(solver.scheduler, config or base_scheduler_config(), **dict(solver.overrides))
    scheduler.set_timesteps(sigmas=kontext_sigmas(steps, solver.grid_reach), mu=mu)
    scheduler.set_begin_index(0)
    x = noise
    for t in scheduler.timesteps:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        x = scheduler.step(velocity(x, timestep / 1000), t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def rk4_reference(velocity: Velocity, noise: torch.Tensor, mu: float, steps: int = REFERENCE_STEPS, config=None) -> torch.Tensor:
    """Classical RK4 (4 calls per step) on FlowMatch's shifted schedule, float64 state."""
    shifted = FlowMatchEulerDiscreteScheduler.from_config(config or base_scheduler_config())
    shifted.set_timesteps(sigmas=kontext_sigmas(steps), mu=mu)
    sigmas = shifted.sigmas.double().tolist()
    x = noise.double()

    def f(x, s):
        return velocity(x, torch.full((x.shape[0],), s, dtype=torch.float64)).double()

    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        h = s_next - s
        k1 = f(x, s)
        k2 = f(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = f(x + h * k3, s_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


# -- the measurement --------------------------------------------------------------------------------
@dataclass
class FidelitySettings:
    samples: int = 1000
    seed: int = 0
    solvers: tuple[str, ...] = SOLVERS
    step_counts: tuple[int, ...] = STEP_COUNTS
    image_seq_lens: tuple[int, ...] = IMAGE_SEQ_LENS
    reference_steps: int = REFERENCE_STEPS
    train_iterations: int = 2000


@dataclass
class FidelityReport:
    rows: list[dict]  # problem, image_seq_len, mu, solver, steps, nfe, error
    references: list[dict]  # problem, image_seq_len, mu, reference error estimates
    meta: dict = field(default_factory=dict)

    def error(self, problem: str, solver: str, steps: int, image_seq_len: int | None = None) -> float:
        image_seq_len = image_seq_len or self.rows[0]["image_seq_len"]
        for row in self.rows:
            if (row["problem"], row["solver"], row["steps"], row["image_seq_len"]) == (problem, solver, steps, image_seq_len):
                return row["error"]
        raise KeyError((problem, solver, steps, image_seq_len))

    def markdown(self) -> str:
        settings = self.meta["settings"]
        steps = settings["step_counts"]
        lines = [
            "# Solver fidelity",
            "",
            f"{self.meta['date']}; torch {self.meta['versions']['torch']}, diffusers {self.meta['versions']['diffusers']}, "
            f"scikit-learn {self.meta['versions']['scikit-learn']}, Python {self.meta['python']}, {self.meta['machine']}.",
            f"{settings['samples']} noise samples (seed {settings['seed']})" + self._digits_note(),
            "Error: RMS distance of the sampler's output from the reference (RK4, "
            f"{settings['reference_steps']} steps, same noise), data in [-1, 1]. One model call per step for every solver.",
            "",
        ]
        lines += [f"- `{name}`: {SOLVER_VARIANTS[name].description}" for name in settings["solvers"]] + [""]
        problems = list(dict.fromkeys(row["problem"] for row in self.rows))
        if 14 in steps and 28 in steps and "euler" in settings["solvers"]:
            columns = [(problem, seq) for seq in settings["image_seq_lens"] for problem in problems]
            lines += [
                "## At 14 steps, against Euler at 28 (error; ratio to Euler-28 in brackets, < 1 is better)",
                "",
                "| solver | " + " | ".join(f"{problem}, mu {kontext_mu(seq):.2f}" for problem, seq in columns) + " |",
                "|---|" + "---:|" * len(columns),
                "| euler, 28 steps | " + " | ".join(f"{self.error(p, 'euler', 28, q):.2e}" for p, q in columns) + " |",
            ]
            for solver in settings["solvers"]:
                errors = [(self.error(p, solver, 14, q), self.error(p, "euler", 28, q)) for p, q in columns]
                cells = [f"{error:.2e} ({error / euler:.2f})" for error, euler in errors]
                lines.append(f"| {solver}, 14 steps | " + " | ".join(cells) + " |")
            lines.append("")
        for problem in problems:
            for seq in settings["image_seq_lens"]:
                mu = kontext_mu(seq)
                ref = next(r for r in self.references if r["problem"] == problem and r["image_seq_len"] == seq)
                check = f"; vs exact solution {ref['vs_exact']:.1e}" if ref.get("vs_exact") is not None else ""
                lines += [
                    f"## {problem}, {seq} output tokens (mu = {mu:.3f})",
                    "",
                    f"Reference error estimate: vs RK4 at {settings['reference_steps'] // 2} steps {ref['vs_half_steps']:.1e}{check}.",
                    "",
                    "| solver | " + " | ".join(f"{n} steps" for n in steps) + " |",
                    "|---|" + "---:|" * len(steps),
                ]
                for solver in settings["solvers"]:
                    cells = [f"{self.error(problem, solver, n, seq):.2e}" for n in steps]
                    lines.append(f"| {solver} | " + " | ".join(cells) + " |")
                lines.append("")
        return "\n".join(lines)

    def _digits_note(self) -> str:
        if self.meta["digits_train_s"] is None:
            return "."
        return (
            f"; digits MLP trained in {self.meta['digits_train_s']:.1f} s (final flow-matching loss {self.meta['digits_final_loss']:.3f})."
        )

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()


def measure_problem(problem, settings: FidelitySettings, noise: torch.Tensor) -> tuple[list[dict], list[dict]]:
    rows, references = [], []
    for seq in settings.image_seq_lens:
        mu = kontext_mu(seq)
        reference = rk4_reference(problem.velocity, noise, mu, settings.reference_steps)
        half = rk4_reference(problem.velocity, noise, mu, settings.reference_steps // 2)
        exact = problem.exact(noise.double()) if hasattr(problem, "exact") else None
        vs_exact = None if exact is None else rms(reference, exact)
        references.append(
            {"problem": problem.name, "image_seq_len": seq, "mu": mu, "vs_half_steps": rms(reference, half), "vs_exact": vs_exact}
        )
        for solver in settings.solvers:
            for steps in settings.step_counts:
                out = solve(solver, problem.velocity, noise, steps, mu)
                row = {"problem": problem.name, "image_seq_len": seq, "mu": round(mu, 4), "solver": solver, "steps": steps, "nfe": steps}
                rows.append({**row, "error": rms(out, reference)})
    return rows, references


def run_fidelity(settings: FidelitySettings | None = None, problems: list | None = None) -> FidelityReport:
    settings = settings or FidelitySettings()
    start = time.perf_counter()
    data = digits_data()
    if problems is None:
        problems = [GaussianFlow(data), DigitsFlow.train(data, iterations=settings.train_iterations, seed=settings.seed)]
    noise = torch.randn(settings.samples, data.shape[1], generator=torch.Generator().manual_seed(settings.seed + 1))
    rows, references = [], []
    with one_cpu_thread():
        for problem in problems:
            problem_rows, problem_refs = measure_problem(problem, settings, noise)
            rows += problem_rows
            references += problem_refs
    digits = next((p for p in problems if isinstance(p, DigitsFlow)), None)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {dist: _version(dist) for dist in ("torch", "diffusers", "scikit-learn", "numpy")},
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU, 1 torch thread (see one_cpu_thread)",
        "settings": asdict(settings),
        "digits_train_s": digits.train_seconds if digits else None,
        "digits_final_loss": digits.final_loss if digits else None,
        "runtime_s": round(time.perf_counter() - start, 1),
    }
    return FidelityReport(rows, references, meta)


def _version(dist: str) -> str:
    return package_version(dist) or "not installed"


# -- output -----------------------------------------------------------------------------------------
def write_results(report: FidelityReport, directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.md").write_text(report.markdown() + "\n")
    (directory / "results.csv").write_text(report.csv())
    (directory / "results.json").write_text(
        json.dumps({"meta": report.meta, "references": report.references, "rows": report.rows}, indent=2) + "\n"
    )
    _plot(report, directory / "error_vs_nfe.png")
    return directory


def _plot(report: FidelityReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(row["problem"] for row in report.rows))
    seqs = report.meta["settings"]["image_seq_lens"]
    fig, axes = plt.subplots(len(seqs), len(problems), figsize=(5.5 * len(problems), 4.2 * len(seqs)), squeeze=False)
    for i, seq in enumerate(seqs):
        for j, problem in enumerate(problems):
            ax = axes[i][j]
            for solver in report.meta["settings"]["solvers"]:
                rows = [r for r in report.rows if r["problem"] == problem and r["solver"] == solver and r["image_seq_len"] == seq]
                style = "--" if "ablation" in SOLVER_VARIANTS[solver].description else "-"
                ax.loglog([r["nfe"] for r in rows], [r["error"] for r in rows], style, marker="o", label=solver)
            euler28 = [
                r["error"]
                for r in report.rows
                if (r["problem"], r["solver"], r["steps"], r["image_seq_len"]) == (problem, "euler", 28, seq)
            ]
            if euler28:
                ax.axhline(euler28[0], color="grey", linestyle=":", linewidth=1, label="Euler, 28 steps")
            ax.axvline(14, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{problem}, {seq} tokens (mu={kontext_mu(seq):.2f})")
            ax.set_xticks(report.meta["settings"]["step_counts"], [str(n) for n in report.meta["settings"]["step_counts"]])
            ax.minorticks_off()
            ax.set_xlabel("model evaluations (= steps)")
            ax.set_ylabel("RMS error vs 1000-step RK4")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Solver fidelity ({report.meta['date']}, diffusers {report.meta['versions']['diffusers']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--samples", type=int, default=FidelitySettings.samples, help="noise samples per problem")
    parser.add_argument("--seed", type=int, default=FidelitySettings.seed)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS), help="step counts to measure")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--image-seq-lens", type=int, nargs="+", default=list(IMAGE_SEQ_LENS), help="output tokens that set Kontext's mu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    settings = FidelitySettings(
        samples=args.samples,
        seed=args.seed,
        solvers=tuple(args.solvers),
        step_counts=tuple(args.steps),
        image_seq_lens=tuple(args.image_seq_lens),
    )
    report = run_fidelity(settings)
    print(report.markdown())
    print(f"\nwritten to {write_results(report, args.out)}")


if __name__ == "__main__":
    main()
