"""Every operation the service asks of an engine, as a small picklable object, so that one call runs
on the in-process GPU worker or in a worker process of `serve --gpus` alike (service/worker.py):

    EditCall       an edit (every editing route)                  run on one engine, in turn
    LoadLora       load an adapter from the LoRA directory        run on every engine
    UnloadLora     unload one                                     run on every engine
    CheckLoras     a request's adapters, before it queues          asked, answered at once
    ListLoras      the directory's files and the loaded adapters  asked, answered at once
    RunBenchmark   the stage table (yields to edits between its own)
    DescribeEngine what the front needs to check requests (model, default config, LoRA settings)
    EngineStatus   what changes as an engine serves (memory, variants, adapters), for /health

`run(engine, job)` gets the engine and the job's context (service/jobs.py). A call that refuses its
input raises JobRefused with the client's error; anything else it raises is a server error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from engine.benchmark.runner import BenchmarkSettings
from engine.lora_files import LoraError
from engine.lora_settings import LoraSettings
from engine.requests import EditRequest, EditResult, LoraChoice
from stages.config import OptimizationConfig

from .jobs import JobCancelled, JobContext, JobRefused


@dataclass
class EditCall:
    kind: ClassVar[str] = "inference"
    request: EditRequest  # the decoded input image travels as pixels (PIL pickles its raw bytes)
    config: OptimizationConfig
    deadline: float  # time.monotonic(): one clock for every process of a Linux host
    client: str = ""  # who asked (an address): what a variant build is counted against (service/builds.py)
    affinity: tuple | None = None  # merge mode: the config and adapter set, so that equal sets run together (service/worker.py)
    waited_for_build: bool = False  # the build lane built this call's variant first (service/builds.py)
    build_s: float | None = None  # what that build took, build and compile (None: it failed; the edit builds in turn)

    def run(self, engine, job: JobContext) -> EditResult:
        # Past the deadline nobody waits for the answer: stop at the next step instead of finishing.
        try:
            result = engine.edit(self.request, self.config, should_stop=lambda: time.monotonic() > self.deadline)
        except LoraError as refused:  # the request's adapter was unloaded before its turn: a 4xx, not a crash
            raise JobRefused(refused) from None
        if self.build_s is not None:  # built and compiled beside the serving thread while this call waited
            result.timings.variant_build_s = self.build_s
            result.variant.update(build_s=round(self.build_s, 3), built_beside_edits=True)
        return result


@dataclass
class LoadLora:
    kind: ClassVar[str] = "lora_load"
    name: str
    file: str | None = None  # a file in the LoRA directory (default: NAME.safetensors)
    scale: float = 1.0
    deadline: float = float("inf")

    def run(self, engine, job: JobContext) -> dict:
        replaced = any(adapter.name == self.name for adapter in engine.loras.loaded())
        try:
            adapter = engine.loras.load(self.name, self.file, self.scale)
        except LoraError as refused:
            raise JobRefused(refused) from None
        return {"summary": adapter.summary(), "replaced": replaced, "file": adapter.file, "ignored_keys": list(adapter.ignored_keys)}


@dataclass
class UnloadLora:
    kind: ClassVar[str] = "lora_unload"
    name: str
    deadline: float = float("inf")

    def run(self, engine, job: JobContext) -> str:
        try:
            return engine.loras.unload(self.name).name
        except LoraError as refused:
            raise JobRefused(refused) from None


@dataclass
class CheckLoras:
    """A request's adapters checked against the library (how many, named twice, known, scales), so
    that a wrong name is answered before the request waits in the queue; loads nothing."""

    kind: ClassVar[str] = "lora_check"
    choices: tuple[LoraChoice, ...]

    def run(self, engine, job: JobContext) -> None:
        engine.loras.check(self.choices)


@dataclass
class ListLoras:
    kind: ClassVar[str] = "lora_list"

    def run(self, engine, job: JobContext) -> dict:
        return engine.loras.report(with_files=True)


class BenchmarkCancelled(JobCancelled):
    pass


@dataclass
class RunBenchmark:
    """The stage benchmark (the CLI's own code, engine/benchmark). It takes minutes, so after each of
    its edits it reports progress, stops if asked to, and lets the jobs that queued up meanwhile run
    first: no request waits longer than one benchmark edit."""

    kind: ClassVar[str] = "benchmark"
    yields: ClassVar[bool] = True  # a worker running it still takes jobs, run between its edits
    settings: BenchmarkSettings
    results_dir: str | None = None

    def run(self, engine, job: JobContext) -> dict:
        from engine.benchmark.report import json_safe, write_results
        from engine.benchmark.runner import run_benchmark

        def between_edits(message: str, fraction: float) -> None:
            job.progress(message, fraction)
            if job.should_stop():
                raise BenchmarkCancelled(message)
            job.serve_waiting()

        report = run_benchmark(engine, self.settings, on_progress=between_edits)
        if self.results_dir:
            write_results(report, Path(self.results_dir))
        return {"report": json_safe(report.as_dict()), "markdown": report.markdown()}


@dataclass(frozen=True)
class EngineDescription:
    """What the front knows of an engine without holding one: enough to check requests and to answer
    /health (every engine of a pool loads the same model with the same settings)."""

    model_info: dict
    spec: Any  # engine.model_specs.ModelSpec
    device: str
    default_config: OptimizationConfig
    environment: dict
    has_cuda: bool
    stages: list
    memory_plan: dict
    lora: LoraSettings


@dataclass
class DescribeEngine:
    kind: ClassVar[str] = "describe"

    def run(self, engine, job: JobContext) -> EngineDescription:
        return EngineDescription(
            model_info=engine.model_info,
            spec=engine.loaded.spec,
            device=str(engine.loaded.device),
            default_config=engine.default_config,
            environment=engine.env.summary(),
            has_cuda=engine.env.has_cuda,
            stages=engine.stage_status(),
            memory_plan=engine.memory_report(),
            lora=engine.loras.settings,
        )


@dataclass
class EngineStatus:
    kind: ClassVar[str] = "status"

    def run(self, engine, job: JobContext) -> dict:
        loaded = engine.loras.loaded()
        return {
            "memory": engine.memory(),
            "variants": engine.variants.report(),
            "loras": engine.loras.report(with_files=False),
            "lora_counts": (len(loaded), sum(adapter.nbytes for adapter in loaded)),
        }
