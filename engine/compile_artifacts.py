"""Compile-artifact bundles: compile once, ship the result to every node.

A bundle is one zip file: `manifest.json` (what it was built for and from what) and `artifacts.bin`
(torch's mega-cache: `torch.compiler.save_cache_artifacts()`, i.e. the FX-graph and AOTAutograd
cache entries with their Triton kernels and the autotuning results). Loading it fills the local
compile caches, so the next compile of the same graphs is a cache hit; Dynamo still traces the few
graphs and CUDA graphs are still recorded.

With `precompile --aot-compile` (experimental) a bundle also carries `aot/<unit>/<n>.bin`: the
compiled modules as ahead-of-time functions (stages/precompiled.py), which `serve` runs without
tracing them (its --no-aot-functions leaves them unused), and `kernels/`: the C++ kernels their code
loads on a CPU. A function's code compiles every kernel it lacks when it is loaded (the mega-cache
hands its kernels out only with a graph-cache hit, which a function skips): the tiny model's four
functions took 34.6 s to load on a CPU, all of it compiling, and 2.7 s with the kernels
(benchmarks/profile_aot_load.py). On an H100 the four took 12.3 s, and as long with Triton's cache
in the bundle: what they spend it on there is not known yet (kernel_files). A unit torch cannot save
(FP8 tensor-subclass weights, benchmarks/results/aot-functions.md) is named in the manifest and
compiles at start-up as before.

A bundle is only valid for the same GPU model and the same torch / triton / diffusers / torchao
versions and build-relevant config: the key says so, and a bundle whose key does not match is
skipped with one log line. A corrupt or truncated bundle is skipped the same way: it never stops a
server from starting, it only costs the compile it would have saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from stages.config import VARIANT_FIELDS, OptimizationConfig
from stages.environment import Environment, package_version

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_PACKAGES = ("torch", "triton", "diffusers", "torchao", "fa3-fwd", "para-attn")


def bundle_key(env: Environment, config: OptimizationConfig) -> dict:
    """What a bundle must match: the GPU, the versions that generate code, the build-relevant knobs."""
    return {
        "format": FORMAT_VERSION,
        "gpu": env.gpu.name if env.gpu else "cpu",
        "compute_capability": ".".join(map(str, env.compute_capability)) if env.gpu else None,
        "python": ".".join(platform.python_version_tuple()[:2]),
        "packages": {name: package_version(name) for name in KEY_PACKAGES},
        "config": {name: getattr(config, name) for name in VARIANT_FIELDS},
    }


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_bundle_path(cache_dir: Path, key: dict) -> Path:
    """Where `precompile` writes by default and `serve` looks without --compile-artifacts."""
    return Path(cache_dir) / "bundles" / f"kontext-{key_id(key)}.zip"


@dataclass
class LoadOutcome:
    path: str | None
    loaded: bool
    reason: str  # what happened, in one line
    megabytes: float = 0.0
    seconds: float = 0.0
    aot_units: list[str] = dataclasses.field(default_factory=list)  # units with ahead-of-time functions in the bundle
    aot_manifest: dict = dataclasses.field(default_factory=dict, repr=False)
    aot_blobs: dict[str, list[bytes]] = dataclasses.field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return {name: value for name, value in dataclasses.asdict(self).items() if name not in ("aot_manifest", "aot_blobs")}


def save_bundle(path: Path, key: dict, warm_shapes: list[dict], notes: dict | None = None, recording=None) -> Path:
    """Write what this process compiled (call after the warm-up edits: autotuning results are
    recorded when kernels first run) as a bundle at `path`, with the ahead-of-time functions of
    `recording` (stages.precompiled.Recording) when given."""
    import torch

    blobs = recording.serialized() if recording is not None else {}
    kernels = kernel_files() if recording is not None else {}

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        raise RuntimeError("torch recorded no compile artifacts in this process: nothing was compiled")
    blob, _info = artifacts
    manifest = {
        "key": key,
        "key_id": key_id(key),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "artifacts_sha256": hashlib.sha256(blob).hexdigest(),
        "artifacts_bytes": len(blob),
        "warm_shapes": warm_shapes,
        **(notes or {}),
    }
    if recording is not None:
        manifest["aot"] = {"units": recording.manifest(blobs), "not_saved": dict(recording.failures)}
        manifest["kernels"] = {"files": len(kernels), "bytes": sum(file.stat().st_size for file in kernels.values())}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as bundle:
        bundle.writestr("manifest.json", json.dumps(manifest, indent=2))
        bundle.writestr("artifacts.bin", blob)
        for unit, unit_blobs in blobs.items():
            for number, function in enumerate(unit_blobs):
                bundle.writestr(f"aot/{unit}/{number}.bin", function)
        for name, file in kernels.items():
            bundle.write(file, name)
    partial.replace(path)  # never leave a half-written bundle under the real name
    return path


def read_manifest(path: Path) -> dict:
    with zipfile.ZipFile(path) as bundle:
        return json.loads(bundle.read("manifest.json"))


def load_bundle(path: Path | None, expected_key: dict) -> LoadOutcome:
    """Fill the local compile caches from the bundle at `path` when its key matches. Never raises."""
    if path is None:
        return LoadOutcome(None, False, "no bundle given")
    path = Path(path)
    if not path.is_file():
        return LoadOutcome(str(path), False, "no bundle at this path")
    started = time.perf_counter()
    try:
        with zipfile.ZipFile(path) as bundle:
            manifest = json.loads(bundle.read("manifest.json"))
            if manifest.get("key") != expected_key:
                return LoadOutcome(str(path), False, f"skipped: built for another setup ({_difference(manifest.get('key'), expected_key)})")
            blob = bundle.read("artifacts.bin")
            aot_manifest = manifest.get("aot", {}).get("units", {})
            aot_blobs = {
                unit: [bundle.read(f"aot/{unit}/{n}.bin") for n in range(entry["functions"])] for unit, entry in aot_manifest.items()
            }
            if hashlib.sha256(blob).hexdigest() != manifest.get("artifacts_sha256"):
                return LoadOutcome(str(path), False, "skipped: the artifacts do not match their checksum (corrupt bundle)")
            import torch

            torch.compiler.load_cache_artifacts(blob)
            install_kernels(bundle)
    except Exception as error:  # noqa: BLE001 - a broken bundle only costs the compile it would have saved
        return LoadOutcome(str(path), False, f"skipped: unreadable bundle ({type(error).__name__}: {str(error)[:200]})")
    megabytes = round((len(blob) + sum(len(b) for blobs in aot_blobs.values() for b in blobs)) / 2**20, 1)
    seconds = round(time.perf_counter() - started, 2)
    return LoadOutcome(str(path), True, "loaded", megabytes, seconds, sorted(aot_blobs), aot_manifest, aot_blobs)


KERNELS = "kernels/inductor/"  # a bundle's folder of C++ kernels, by their path in Inductor's cache


def kernel_root() -> Path:
    """Where this process's compiled C++ kernels live: Inductor's cache (`*.so`)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def kernel_files() -> dict[str, Path]:
    """Every compiled C++ kernel of this process's Inductor cache, by its name in a bundle. Triton's
    cache (the GPU's kernels) is not shipped: in the H100 run of 2026-12-06 bundles carried it and
    the functions still took 11.5 s to load (12.3 s without), so a GPU's load is spent elsewhere."""
    import torch
    from torch._inductor.runtime.runtime_utils import triton_cache_dir

    triton = Path(triton_cache_dir(torch.cuda.current_device())).resolve() if torch.cuda.is_available() else None
    root = kernel_root()
    files = {}
    for file in root.glob("**/*.so"):
        launcher = triton is not None and triton in file.resolve().parents  # Triton's launchers: its cache's, not ours
        if file.is_file() and not launcher:
            files[KERNELS + file.relative_to(root).as_posix()] = file
    return files


def install_kernels(bundle: zipfile.ZipFile) -> int:
    """Write the bundle's kernels where this process's cache looks for them (a file already there is
    kept); returns how many were written."""
    root = kernel_root().resolve()
    written = 0
    for member in bundle.infolist():
        if not member.filename.startswith(KERNELS) or member.is_dir():
            continue
        target = (root / member.filename[len(KERNELS) :]).resolve()
        if root not in target.parents:  # a name that climbs out of the cache: not ours
            raise ValueError(f"kernel file {member.filename!r} points outside the cache")
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(bundle.read(member))
        partial.replace(target)  # a compile in another process never sees half a kernel
        written += 1
    return written


def load_precompiled(outcome: LoadOutcome, key: dict):
    """The bundle's ahead-of-time functions, loaded (stages.precompiled.PrecompiledFunctions), or
    None with the reason when it has none or torch cannot load them. Never raises."""
    if not outcome.loaded or not outcome.aot_blobs:
        return None, "the bundle has no ahead-of-time functions (made without precompile --aot-compile)"
    from stages.precompiled import PrecompiledFunctions

    started = time.perf_counter()
    try:
        functions = PrecompiledFunctions.load(key["config"], outcome.aot_manifest, outcome.aot_blobs)
    except Exception as error:  # noqa: BLE001 - unusable functions only cost the compile they would have saved
        return None, f"ahead-of-time functions skipped: torch cannot load them ({type(error).__name__}: {str(error)[:200]})"
    units = ", ".join(f"{unit} ({len(fns)})" for unit, fns in functions.functions.items())
    return functions, f"ahead-of-time functions loaded in {time.perf_counter() - started:.2f} s: {units}"


def _difference(found: dict | None, expected: dict) -> str:
    if not isinstance(found, dict):
        return "no key in its manifest"
    differing = [name for name in expected if found.get(name) != expected[name]]
    return ", ".join(f"{name}: {found.get(name)!r} here {expected[name]!r}" for name in differing[:3]) or "unknown difference"


def compile_counters() -> dict:
    """Cache hits, misses and bypasses of this process so far (torch's own counters)."""
    from torch._dynamo.utils import counters

    wanted = {
        "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
        "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
    }
    summary = {name: counters[group][name] for group, names in wanted.items() for name in names}
    summary["graphs"] = counters["stats"]["unique_graphs"]
    return summary


def describe(outcome: LoadOutcome) -> str:
    return f"compile artifacts {outcome.path}: {outcome.reason}" + (
        f" ({outcome.megabytes} MB in {outcome.seconds} s)" if outcome.loaded else ""
    )
