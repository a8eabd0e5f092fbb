"""The solver-fidelity claims behind stage 4, from freshly computed numbers.

Both problems of benchmarks/solver_fidelity.py (Gaussian data with the exact ODE solution, and a
flow-matching MLP trained on the 8x8 digits), at Kontext's shift for a 1024x1024 output (the
production size) and for a 256x256 one, against the 1000-step RK4 reference from the same noise.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import solver_fidelity as fidelity
from stages.config import LEGACY_FLAGS
from stages.scheduler import DEFAULT_STEPS

BEST_SOLVER_AT_14_STEPS = LEGACY_FLAGS["use_dpm_solver"][1].on  # what use_dpm_solver selects

SEQ_LENS = (4096, 256)  # 1024x1024 and 256x256 outputs


@pytest.fixture(scope="module")
def measured():
    """errors[(problem, image_seq_len)][(solver, steps)], references[(problem, image_seq_len)]."""
    data = fidelity.digits_data()
    problems = [fidelity.GaussianFlow(data), fidelity.DigitsFlow.train(data)]
    noise = torch.randn(256, data.shape[1], generator=torch.Generator().manual_seed(1))
    errors, references = {}, {}
    with fidelity.one_cpu_thread():
        _measure(problems, noise, errors, references)
    return {"errors": errors, "references": references, "digits": problems[1], "data": data}


def _measure(problems, noise, errors, references):
    for problem in problems:
        for seq in SEQ_LENS:
            mu = fidelity.kontext_mu(seq)
            reference = fidelity.rk4_reference(problem.velocity, noise, mu)
            references[problem.name, seq] = (problem, noise, reference)
            runs = [(solver, 14) for solver in fidelity.SOLVERS] + [("euler", 28), ("unipc", DEFAULT_STEPS["unipc"])]
            outputs = {(solver, steps): fidelity.solve(solver, problem.velocity, noise, steps, mu) for solver, steps in runs}
            errors[problem.name, seq] = {run: fidelity.rms(out, reference) for run, out in outputs.items()}


def test_digits_network_trains_in_well_under_a_minute_and_learns_the_digits(measured):
    digits, data = measured["digits"], measured["data"]
    assert digits.train_seconds < 45
    _, _, samples = measured["references"]["digits", 4096]  # the network's ODE solution from noise
    assert (samples.float().mean(0) - data.mean(0)).abs().mean() < 0.05  # the average digit
    assert (samples.float().std(0) - data.std(0)).abs().mean() < 0.1  # and its per-pixel spread
    blank_border = data.std(0) < 0.05  # pixels that are (almost) never inked
    assert blank_border.sum() >= 4 and samples.float()[:, blank_border].mean() < -0.9


@pytest.mark.parametrize("seq", SEQ_LENS)
def test_reference_is_the_exact_gaussian_solution(measured, seq):
    problem, noise, reference = measured["references"]["gaussian", seq]
    exact = problem.exact(noise.double())
    assert fidelity.rms(reference, exact) < 1e-5
    # and a 28-step Euler run is far from it: the tolerance above is meaningful
    assert measured["errors"]["gaussian", seq]["euler", 28] > 1000 * fidelity.rms(reference, exact)


@pytest.mark.parametrize("seq", SEQ_LENS)
def test_reference_is_converged_on_the_network(measured, seq):
    problem, noise, reference = measured["references"]["digits", seq]
    with fidelity.one_cpu_thread():
        half = fidelity.rk4_reference(problem.velocity, noise, fidelity.kontext_mu(seq), steps=fidelity.REFERENCE_STEPS // 2)
    assert fidelity.rms(reference, half) < 1e-3 * measured["errors"]["digits", seq]["euler", 28]


@pytest.mark.parametrize("problem", ["gaussian", "digits"])
@pytest.mark.parametrize("seq", SEQ_LENS)
def test_dpm_solver_karras_at_14_steps_beats_euler_at_28(measured, problem, seq):
    errors = measured["errors"][problem, seq]
    assert errors["dpmpp_2m_karras", 14] < 0.85 * errors["euler", 28], errors


@pytest.mark.parametrize("problem", ["gaussian", "digits"])
def test_use_dpm_solver_picks_the_most_accurate_14_step_configuration(measured, problem):
    """At the production size: the named best beats every other solver and ablation at 14 steps,
    including the plain shifted spacing and the Karras ramp that ends where the 14-step schedule ends."""
    errors = measured["errors"][problem, 4096]
    best = errors[BEST_SOLVER_AT_14_STEPS, 14]
    others = {solver: errors[solver, 14] for solver in fidelity.SOLVERS if solver != BEST_SOLVER_AT_14_STEPS}
    assert all(best < error for error in others.values()), (best, others)


@pytest.mark.parametrize("problem", ["gaussian", "digits"])
@pytest.mark.parametrize("seq", SEQ_LENS)
def test_unipc_default_steps_beat_euler_at_28(measured, problem, seq):
    errors = measured["errors"][problem, seq]
    assert errors["unipc", DEFAULT_STEPS["unipc"]] < errors["euler", 28]


def test_unipc_needs_more_than_14_steps_at_the_production_size(measured):
    """Why UniPC defaults to more steps than DPM-Solver++: at 14 it trails Euler-28 at 1024x1024."""
    assert any(
        measured["errors"][problem, 4096]["unipc", 14] > measured["errors"][problem, 4096]["euler", 28]
        for problem in ("gaussian", "digits")
    )


def test_benchmark_writes_table_csv_json_and_plot(tmp_path):
    settings = fidelity.FidelitySettings(samples=16, step_counts=(14, 28), image_seq_lens=(4096,), reference_steps=40)
    report = fidelity.run_fidelity(settings, problems=[fidelity.GaussianFlow(fidelity.digits_data())])
    out = fidelity.write_results(report, tmp_path)
    markdown = (out / "results.md").read_text()
    assert "diffusers 0.42.1" in markdown and report.meta["date"][:4] in markdown
    assert "| dpmpp_2m_karras, 14 steps |" in markdown and "| euler, 28 steps |" in markdown
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("problem,") and len(rows) == 1 + len(fidelity.SOLVERS) * 2
    assert (out / "results.json").stat().st_size > 0 and (out / "error_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"
