"""The config vocabulary, the stage contract and the resolve rules: one declaration per knob, every
derived view agreeing with it, rules settled in dependency order."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import pathlib
import typing

import pytest
import torch
from pydantic import ValidationError

from cli.options import add_optimization_options, optimization_config_from_args
from service.optimizations import merge
from service.schemas import InferenceRequest, Optimizations
from stages import registry
from stages.base import Phase, Stage
from stages.config import (
    DECLARATIONS,
    KNOBS,
    LEGACY_FLAGS,
    LOAD_FIELDS,
    MAX_PRESET,
    USER_FIELDS,
    VARIANT_FIELDS,
    OptimizationConfig,
    Switch,
    cumulative_config,
    parse_presets,
)
from stages.environment import Environment, GpuInfo


def _env(capability=None, packages=("torchao", "fa3_fwd_interface", "para_attn", "triton"), cxx=True):
    gpu = GpuInfo(0, "Fake GPU", capability, 80 * 2**30) if capability else None
    installed = {name: ("1.0" if name in packages else None) for name in ("torchao", "fa3_fwd_interface", "para_attn", "triton")}
    return Environment("3.11", "2.x", "13.0" if gpu else None, "cuda:0" if gpu else "cpu", gpu, installed, has_cxx_compiler=cxx)


HOPPER_WITHOUT_TRITON = _env((9, 0), packages=("torchao", "fa3_fwd_interface", "para_attn"))


# -- resolve ------------------------------------------------------------------------------------------
def test_stages_that_need_compile_go_off_when_compile_cannot_run():
    """The reported bug: on a Hopper-like machine without triton, compile resolves off, and the
    stages that only pay off compiled (fast_gelu, channels_last on a GPU, CUDA graphs) must follow."""
    resolved = registry.resolve(cumulative_config(MAX_PRESET), HOPPER_WITHOUT_TRITON)
    effective = resolved.effective
    assert not effective.compile and "triton" in resolved.skipped["compile"]
    assert not effective.fast_gelu and not effective.channels_last and not effective.cuda_graphs
    assert {"fast_gelu", "channels_last", "cuda_graphs"} <= set(resolved.skipped)
    assert "compile" in resolved.skipped["fast_gelu"] and "compile" in resolved.skipped["cuda_graphs"]
    assert effective.attention == "fa3_fp8" and effective.quantization == "fp8"  # what does not need compile stays


def test_a_cpu_without_a_compiler_switches_compile_and_its_dependents_off():
    resolved = registry.resolve(OptimizationConfig(compile=True, fast_gelu=True, channels_last=True), _env(cxx=False))
    assert not resolved.effective.compile and "C++ compiler" in resolved.skipped["compile"]
    assert not resolved.effective.fast_gelu
    assert resolved.effective.channels_last  # on a CPU it does not depend on compile


BOOLEAN_KNOBS = [name for name, field in OptimizationConfig.model_fields.items() if field.annotation is bool]


@pytest.mark.parametrize("env", [_env(), _env(cxx=False), _env((9, 0)), HOPPER_WITHOUT_TRITON, _env((8, 0), packages=("triton",))], ids=str)
def test_resolve_is_settled_in_one_pass(env):
    """Resolving what resolve produced changes nothing, for every combination of switches: no rule
    depends on a stage that a later rule switches off."""
    for values in itertools.product([False, True], repeat=len(BOOLEAN_KNOBS)):
        for backend, fp8 in itertools.product(("auto", "diffusers"), ("off", "auto")):
            switches = dict(zip(BOOLEAN_KNOBS, values))
            config = OptimizationConfig(**switches, cache_backend=backend, attention="fa3", quantization="auto", transformer_fp8=fp8)
            once = registry.resolve(config, env).effective
            assert registry.resolve(once, env).effective == once, config


def test_every_skipped_stage_has_a_reason_and_every_rule_names_a_stage():
    from stages.rules import RULES

    assert {rule.stage for rule in RULES} <= set(registry.STAGE_NAMES)
    resolved = registry.resolve(cumulative_config(MAX_PRESET), _env())
    assert resolved.skipped and all(resolved.skipped.values())


# -- the contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", registry.STAGES, ids=lambda stage: stage.name)
def test_each_stage_implements_exactly_the_phases_it_declares(stage):
    for phase in Phase:
        implemented = getattr(type(stage), phase.value) is not getattr(Stage, phase.value)
        assert implemented == (phase in stage.phases), (stage.name, phase)
    assert stage.title and stage.summary


def test_every_knob_belongs_to_a_registered_stage_and_every_stage_has_a_knob():
    assert {knob.stage for knob in KNOBS.values()} == set(registry.STAGE_NAMES)


RESTATED = {"name", "switch_name", "preset", "benchmark_stage", "phases", "off", "flag", "field_name", "is_requested"}


@pytest.mark.parametrize("stage", registry.STAGES, ids=lambda stage: stage.name)
def test_a_stage_is_declared_once_by_its_switch(stage):
    """Name, switch, off value, preset and phases come from the stage's Switch in stages/config.py:
    no stage class restates them, the registry holds one line per declaration, and the presets and
    their titles follow the same declaration."""
    knob, field = KNOBS[stage.switch], OptimizationConfig.model_fields[stage.switch]
    assert isinstance(knob, Switch) and DECLARATIONS[stage.switch] is stage.declaration
    assert stage.name == stage.switch == knob.stage
    assert stage.preset == knob.preset and stage.phases == frozenset(knob.phases)
    assert stage.declaration.off == field.default and not stage.is_requested(OptimizationConfig())
    for cls in type(stage).__mro__[: type(stage).__mro__.index(Stage)]:
        assert not RESTATED & set(vars(cls)), (cls, RESTATED & set(vars(cls)))
    assert registry.STAGE_NAMES.count(stage.name) == 1
    if knob.preset is not None:
        assert stage.title in registry.preset_title(knob.preset)
        assert stage.is_requested(cumulative_config(knob.preset)) and not stage.is_requested(cumulative_config(knob.preset - 1))


def test_a_changed_declaration_is_what_the_stage_reports(monkeypatch):
    """The stage reads its declaration; it keeps no copy of its own."""
    stage = registry.get_stage("fast_gelu")
    moved = dataclasses.replace(DECLARATIONS["fast_gelu"], preset=4, phases=frozenset({Phase.REQUEST}))
    monkeypatch.setitem(DECLARATIONS, "fast_gelu", moved)
    assert stage.preset == 4 and stage.phases == {Phase.REQUEST}
    assert registry.stages_in(Phase.REQUEST).count(stage) == 1 and stage not in registry.stages_in(Phase.EXECUTION)


# Each layer may import only the layers below it: entry -> cli -> service -> engine -> stages -> patches.
LAYERS = ["patches", "stages", "engine", "service", "cli"]


def _imported_packages(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_calls_go_one_way(layer):
    root = pathlib.Path(registry.__file__).resolve().parents[1]
    above = set(LAYERS[LAYERS.index(layer) + 1 :]) | {"benchmarks", "tests", "flux_kontext_optimized"}
    for path in (root / layer).rglob("*.py"):
        wrong = _imported_packages(path) & above
        assert not wrong, f"{path.relative_to(root)} imports {wrong}, a layer above {layer}"


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (relative or absolute, at the top or
    inside a function: a circle through a lazy import is still a circle)."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        wanted = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(filter(None, [base, node.module]))
                wanted |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                wanted |= {alias.name for alias in node.names}
        graph[name] = {other for other in wanted if other in modules and other != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other) :] + [module, other] if other in path else [module, other]
            if other not in state and (found := visit(other, path + [module])):
                return found
        state[module] = "done"
        return None

    return next((found for module in sorted(graph) if module not in state and (found := visit(module, []))), None)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_circle_inside_a_package(layer):
    root = pathlib.Path(registry.__file__).resolve().parents[1]
    circle = find_circle(import_graph(root, layer))
    assert circle is None, " -> ".join(circle or [])


def test_the_circle_check_finds_a_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def later():\n    from pkg import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert find_circle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("")
    assert find_circle(import_graph(tmp_path, "pkg")) is None


# -- one declaration per knob -------------------------------------------------------------------------
def test_with_changes_validates():
    with pytest.raises(ValidationError):
        OptimizationConfig().with_changes(attention="warp")
    with pytest.raises(ValidationError):
        OptimizationConfig().with_changes(steps=-3)  # steps belong to the request, not to the config
    with pytest.raises(ValidationError):
        OptimizationConfig().with_changes(cache_threshold=float("nan"))


def test_presets_come_from_the_knobs():
    assert cumulative_config(0) == OptimizationConfig()
    for preset in range(1, MAX_PRESET + 1):
        previous, current = cumulative_config(preset - 1), cumulative_config(preset)
        changed = {name for name in KNOBS if getattr(previous, name) != getattr(current, name)}
        assert changed and all(preset in dict(KNOBS[name].presets()) for name in changed), (preset, changed)
        assert registry.preset_title(preset)
    assert parse_presets("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_presets("0-9")


def test_cli_http_and_legacy_views_are_generated_from_the_config():
    parser = argparse.ArgumentParser()
    add_optimization_options(parser)
    flags = {action.dest for action in parser._actions}
    assert set(USER_FIELDS) <= flags and not (set(OptimizationConfig.model_fields) - set(USER_FIELDS)) & flags
    assert set(Optimizations.model_fields) == set(USER_FIELDS)
    assert {"lora", "lora_slots", "lora_rank"} == set(OptimizationConfig.model_fields) - set(USER_FIELDS)  # set by the engine only
    assert set(LEGACY_FLAGS) <= set(InferenceRequest.model_fields)
    for name in USER_FIELDS:
        field = OptimizationConfig.model_fields[name]
        if typing.get_origin(field.annotation) is typing.Literal:
            action = next(action for action in parser._actions if action.dest == name)
            assert tuple(action.choices) == typing.get_args(field.annotation)
    args = parser.parse_args(["--preset", "2", "--no-compile", "--attention", "cudnn", "--cache-threshold", "0.3"])
    config = optimization_config_from_args(args, has_cuda=False)
    assert config == cumulative_config(2).with_changes(compile=False, attention="cudnn", cache_threshold=0.3)
    with pytest.raises(ValueError, match="cache_threshold"):
        optimization_config_from_args(parser.parse_args(["--cache-threshold", "99"]), has_cuda=False)


def test_variant_and_load_scopes_match_what_the_stages_build():
    """Every variant-scoped knob is read by a stage acting in a build phase, and a build key holds
    nothing a request could change: variant knobs, or load knobs (fixed for the process)."""
    build_phases = {Phase.WEIGHTS, Phase.VAE, Phase.EXECUTION}
    built = {name for stage in registry.STAGES if stage.phases & build_phases for name, _ in stage.build_key(OptimizationConfig())}
    assert set(VARIANT_FIELDS) <= built <= set(VARIANT_FIELDS) | set(LOAD_FIELDS)
    assert set(LOAD_FIELDS) == {name for name, knob in KNOBS.items() if Phase.LOAD in registry.get_stage(knob.stage).phases}


def test_the_engine_runs_load_knobs_as_loaded(tiny_engine, photo):
    from engine.requests import EditRequest

    result = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=1), OptimizationConfig(t5_fp8=True))
    assert result.config.t5_fp8 is False  # the tiny engine was loaded without it: that is what ran
    assert next(tiny_engine.loaded.pipe.text_encoder_2.parameters()).dtype == torch.float32
    # the engine is the one place that holds load knobs: it says so, and the service passes the knob through
    assert "chosen when the model loads" in result.skipped_stages["t5_fp8"]
    passed = merge(tiny_engine.default_config, {}, {"t5_fp8": True, "text_encoders": "cpu"}, per_request_variants=False)
    assert passed.config.t5_fp8 and passed.config.text_encoders == "cpu" and not passed.warnings
    placed = tiny_engine.resolve(passed.config)
    assert placed.effective.text_encoders == "resident" and "text_encoders='cpu' not applied" in placed.skipped["text_encoders"]


def test_the_mlp_epilogue_needs_hopper_and_the_fused_kernels():
    asked = cumulative_config(MAX_PRESET).with_changes(mlp_epilogue=True)
    assert not cumulative_config(MAX_PRESET).mlp_epilogue  # an option until a GPU has measured it
    on_hopper = registry.resolve(asked, _env((9, 0)))
    assert on_hopper.effective.mlp_epilogue and on_hopper.effective.fused_kernels
    ada = registry.resolve(asked, _env((8, 9)))
    assert not ada.effective.mlp_epilogue and "9.0" in ada.skipped["mlp_epilogue"]  # TMA
    without_fused = registry.resolve(asked.with_changes(fused_kernels=False), _env((9, 0)))
    assert not without_fused.effective.mlp_epilogue and "fused_kernels" in without_fused.skipped["mlp_epilogue"]
