"""Ahead-of-time compiled modules (experimental): the compile stage's graphs saved as functions, so a
new process runs them without Dynamo tracing or Inductor.

`torch.compile(forward).aot_compile(example)` traces a module's forward once, compiles it with
Inductor, and gives a function that can be serialized with its guards (tensor shapes, dtypes,
strides, grad mode and the dynamic-shape constraints) and Inductor's generated code inside;
`torch.compiler.load_compiled_function` turns the bytes back into a callable that never enters
Dynamo. Both are experimental in torch (2.11 and 2.13). A unit is one module class the compile
stage compiles with fullgraph: the transformer's two block classes (every block of a class shares
its functions: the weights are inputs, not constants) and the VAE's encoder and decoder.

Recording (`precompile --aot-compile`): one edit after the warm-up, with a `Recorder` around each
compiled module. A call that none of its unit's functions accepts (the first one, or one whose
inputs differ in something the guards check: the single blocks after the first get views of the
joint sequence, with another stride) is compiled ahead of time with those very inputs. Sequence
lengths are dynamic as in the JIT path (stages/compile.py's DYNAMIC_SOURCES), so one edit covers
every resolution.

Running: `PrecompiledCall` replaces the module's compiled call. It runs the first function whose
guards accept the call, and otherwise the JIT-compiled module as before (logged once per unit), so
a call the bundle does not cover costs a compile, never a wrong answer. Only portable guards are
kept (`portable_guards`): a module's identity cannot be saved, so the functions trust the bundle's
key (same config, same code versions) that the module is built the same way.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def portable_guards(entries) -> list[bool]:
    """The guards a saved function can carry: tensor metadata of its inputs (the weights too), the
    dynamic-shape constraints, and grad and autocast state. Object identities (ID_MATCH) cannot be
    serialized; torch refuses to save a function that has them."""
    return [
        entry.guard_type in ("GLOBAL_STATE", "SHAPE_ENV") or (entry.guard_type == "TENSOR_MATCH" and not entry.is_global)
        for entry in entries
    ]


def _reason(error: Exception) -> str:
    """One line for a log or a manifest: the error's type and the first line of its message."""
    first_line = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {first_line}"


def unit_name(module: torch.nn.Module) -> str:
    return type(module).__qualname__


def forward_function(module: torch.nn.Module) -> Callable:
    """The plain function behind the module's forward, `self` first: a stage may have replaced a
    block's forward on the instance (stages/fused_blocks.py, stages/split_projection.py)."""
    bound = module.__dict__.get("forward")
    return bound.__func__ if bound is not None and hasattr(bound, "__func__") else type(module).forward


def function_id(function: Callable) -> str:
    """Names the forward a function was compiled from, so that a bundle never runs on another."""
    return f"{function.__module__}.{function.__qualname__}:{hashlib.sha256(function.__code__.co_code).hexdigest()[:12]}"


def has_hooks(module: torch.nn.Module) -> bool:
    """The JIT path traces a module's hooks into its graph; the saved functions hold the bare forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def aot_compile(module: torch.nn.Module, args: tuple, kwargs: dict, options: dict | None) -> Any:
    """One ahead-of-time compiled function of `module`'s forward for inputs like these."""
    # torch.compile gives its function an `aot_compile` only under this switch: off by default in
    # torch 2.11 (the GPU machine's version; the H100 run of 2026-12-06 saved nothing without it),
    # on in 2.13
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled = torch.compile(forward_function(module), fullgraph=True, options={**(options or {}), "guard_filter_fn": portable_guards})
    # The saved state holds the module; torch pickles a bound method in its __dict__ by looking its
    # function's name up on the instance, which fails for a forward a stage put there under another
    # name (stages/fused_blocks.py: the fused blocks were not saved on an H100 for it). The function
    # traced is the forward itself, so the instance's copy is not needed while it is compiled.
    replaced = module.__dict__.pop("forward", None)
    try:
        return compiled.aot_compile(((module, *args), kwargs))
    finally:
        if replaced is not None:
            module.__dict__["forward"] = replaced


def serialize(function: Any) -> bytes:
    return type(function).serialize(function).serialized_data


def deserialize(blob: bytes, options: dict | None) -> Any:
    """A saved function, ready to call. Inductor's options apply again here: whether the loaded
    graph runs under cudagraph trees is read from `triton.cudagraphs` while it is deserialized."""
    with torch._inductor.config.patch(options or {}):
        function = torch.compiler.load_compiled_function(io.BytesIO(blob))
    function.disable_guard_check()  # PrecompiledCall checks the guards itself, once
    return function


@dataclass
class Recorder:
    """Wraps a compiled module's call during one recording edit: runs it as before, and compiles a
    function ahead of time for each call that the unit's functions so far do not accept."""

    module: torch.nn.Module
    unit: str
    recording: "Recording"
    options: dict | None
    inner: Callable

    def __call__(self, *args, **kwargs):
        functions = self.recording.functions[self.unit]
        if self.unit not in self.recording.failures and not any(
            function.guard_check(self.module, *args, **kwargs) for function in functions
        ):
            try:
                functions.append(aot_compile(self.module, args, kwargs, self.options))
            except Exception as error:  # noqa: BLE001 - a unit torch cannot save stays on the JIT path
                self.recording.failures[self.unit] = _reason(error)
                log.warning(
                    "precompiled %s: not saved ahead of time, it compiles at start-up as before (%s)",
                    self.unit,
                    self.recording.failures[self.unit],
                )
        return self.inner(*args, **kwargs)


@dataclass
class Recording:
    """What `record` fills in: each unit's functions and the forward they were compiled from."""

    functions: dict[str, list] = field(default_factory=dict)
    forwards: dict[str, str] = field(default_factory=dict)
    options: dict[str, dict | None] = field(default_factory=dict)  # the Inductor options of each unit
    failures: dict[str, str] = field(default_factory=dict)  # unit -> why torch could not compile or save it

    def saved_units(self) -> list[str]:
        return [unit for unit, functions in self.functions.items() if functions and unit not in self.failures]

    def serialized(self) -> dict[str, list[bytes]]:
        """unit -> its functions as bytes; a unit whose functions torch cannot serialize joins `failures`."""
        blobs = {}
        for unit in self.saved_units():
            try:
                blobs[unit] = [serialize(function) for function in self.functions[unit]]
            except Exception as error:  # noqa: BLE001 - the unit stays on the JIT path
                self.failures[unit] = _reason(error)
        return blobs

    def manifest(self, units) -> dict:
        """What a bundle says about its functions (JSON): per unit, how many, from which forward, with which options."""
        return {
            unit: {"functions": len(self.functions[unit]), "forward": self.forwards[unit], "options": self.options[unit]} for unit in units
        }


class record:
    """Context manager: record ahead-of-time functions for `modules` (compiled modules, each with the
    Inductor options it was compiled with) during the edit(s) it surrounds."""

    def __init__(self, modules: list[tuple[torch.nn.Module, dict | None]]):
        self.modules = modules
        self.recording = Recording()

    def __enter__(self) -> Recording:
        for module, options in self.modules:
            unit = unit_name(module)
            self.recording.forwards.setdefault(unit, function_id(forward_function(module)))
            self.recording.options.setdefault(unit, options)
            self.recording.functions.setdefault(unit, [])
            module._compiled_call_impl = Recorder(module, unit, self.recording, options, module._compiled_call_impl)
        return self.recording

    def __exit__(self, *exc) -> None:
        for module, _ in self.modules:
            module._compiled_call_impl = module._compiled_call_impl.inner


@dataclass
class PrecompiledFunctions:
    """Loaded functions for the config a bundle was made for: what BuildContext hands the compile stage."""

    config: dict  # the build-relevant knobs (stages.config.VARIANT_FIELDS) they were compiled with
    functions: dict[str, list]  # unit -> loaded functions
    forwards: dict[str, str]  # unit -> function_id of the forward they were compiled from

    @classmethod
    def load(cls, config: dict, manifest: dict, blobs: dict[str, list[bytes]]) -> "PrecompiledFunctions":
        """From a bundle's manifest entry and its serialized functions; raises what torch raises on
        functions it cannot load (another torch, another device type)."""
        functions = {unit: [deserialize(blob, manifest[unit]["options"]) for blob in unit_blobs] for unit, unit_blobs in blobs.items()}
        return cls(config, functions, {unit: entry["forward"] for unit, entry in manifest.items()})

    def matches(self, config) -> bool:
        return all(getattr(config, name) == value for name, value in self.config.items())

    def install(self, module: torch.nn.Module) -> bool:
        """Run `module` (already compiled by the JIT path) through its unit's functions; False when
        the bundle has none for it or they were compiled from another forward."""
        unit = unit_name(module)
        functions = self.functions.get(unit)
        if not functions or self.forwards.get(unit) != function_id(forward_function(module)):
            return False
        module._compiled_call_impl = PrecompiledCall(module, functions, module._compiled_call_impl, unit)
        return True


_fallbacks_logged: set[str] = set()
_log_lock = threading.Lock()


class PrecompiledCall:
    """A module's call through its ahead-of-time functions, or its JIT-compiled call when none fits."""

    def __init__(self, module: torch.nn.Module, functions: list, fallback: Callable, unit: str):
        self.module, self.functions, self.fallback, self.unit = module, functions, fallback, unit

    def __call__(self, *args, **kwargs):
        if not has_hooks(self.module):
            for function in self.functions:
                if function.guard_check(self.module, *args, **kwargs):
                    return function(self.module, *args, **kwargs)
        with _log_lock:
            first = self.unit not in _fallbacks_logged
            _fallbacks_logged.add(self.unit)
        if first:
            log.info("precompiled %s: a call its saved functions do not cover (hooks or other inputs); compiling it as before", self.unit)
        return self.fallback(*args, **kwargs)
