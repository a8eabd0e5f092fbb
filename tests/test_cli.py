"""The command line, run as a user runs it: a subprocess of this Python."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from stages import registry

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "flux_kontext_optimized.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_help_explains_every_command_and_option():
    top = run_cli("--help")
    assert top.returncode == 0 and all(cmd in top.stdout for cmd in ("serve", "edit", "benchmark", "doctor"))
    edit = run_cli("edit", "--help")
    for option in (
        "--image",
        "--prompt",
        "--out",
        "--seed",
        "--steps",
        "--num-images",
        "--aspect-ratio",
        "--output-dir",
        "--device",
        "--model",
        "--compile",
        "--attention",
        "--quantization",
        "--scheduler",
        "--cuda-graphs",
        "--preset",
    ):
        assert option in edit.stdout, option


def test_doctor_lists_every_stage_with_its_availability():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "device        cpu" in result.stdout
    for name in registry.STAGE_NAMES:
        assert name in result.stdout
    assert "needs a CUDA GPU" in result.stdout


def test_edit_writes_valid_images(tmp_path, photo):
    source = tmp_path / "in.png"
    photo.save(source)
    out = tmp_path / "out.png"
    result = run_cli(
        "edit", "--image", str(source), "--prompt", "make the sky red", "--out", str(out), "--seed", "4", "--steps", "3", "--fuse-qkv"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["seed"] == 4 and summary["steps"] == 3 and summary["active_stages"] == ["fuse_qkv"]
    assert summary["model"]["random_weights"] is True
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.size == (summary["width"], summary["height"])


def test_edit_several_images_into_an_output_dir_with_an_aspect_ratio(tmp_path):
    result = run_cli(
        "edit",
        "--prompt",
        "a red sky",
        "--output-dir",
        str(tmp_path),
        "--num-images",
        "2",
        "--steps",
        "2",
        "--aspect-ratio",
        "16:9",
        "--seed",
        "9",
    )
    assert result.returncode == 0, result.stderr
    outputs = [Path(p) for p in json.loads(result.stdout)["outputs"]]
    assert len(outputs) == 2 and all(p.exists() and p.parent == tmp_path for p in outputs)
    with Image.open(outputs[0]) as image:
        assert image.width > image.height


USER_ERRORS = [
    (("edit", "--image", "missing.png", "--prompt", "x"), "missing.png"),
    (("edit", "--prompt", "x", "--aspect-ratio", "1000x1000"), "preferred resolutions"),
    (("edit", "--prompt", "x", "--model", "nonsense"), "neither a directory"),
    (("doctor", "--device", "cuda:0"), "no CUDA GPU"),
]


def test_user_errors_are_one_clear_line_not_a_traceback():
    with ThreadPoolExecutor(len(USER_ERRORS)) as pool:  # four interpreters start at once: most of each is imports
        results = list(pool.map(lambda case: run_cli(*case[0]), USER_ERRORS))
    for (args, message), result in zip(USER_ERRORS, results):
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, args


def test_service_settings_are_read_from_flags_generated_from_their_fields(monkeypatch):
    """Each ServiceSettings field declares its flag once (service/settings.py): every field has one,
    the defaults agree, the README's flags keep their names, and bad values are refused by name."""
    from cli.options import build_parser, service_settings_from_args
    from engine.setting import declared_fields
    from service.settings import ServiceSettings

    monkeypatch.delenv("FLUX_KONTEXT_API_KEY", raising=False)
    parser = build_parser()
    serve = next(action for action in parser._subparsers._group_actions[0].choices.values() if action.prog.endswith(" serve"))
    flags = {flag for action in serve._actions for flag in action.option_strings}
    assert {field.flag for field in declared_fields(ServiceSettings)} <= flags
    assert service_settings_from_args(parser.parse_args(["serve"])) == ServiceSettings()
    given = ["--request-timeout", "5", "--max-pixels", "1000", "--max-body-mb", "2", "--benchmark-stages", "0,4", "--cors-origins", "a, b"]
    settings = service_settings_from_args(parser.parse_args(["serve", *given, "--no-warmup", "--port", "8123"]))
    assert (settings.request_timeout, settings.max_pixels, settings.max_body_bytes) == (5.0, 1000, 2 * 2**20)
    assert settings.benchmark_stages == (0, 4) and settings.cors_origins == ("a", "b") and not settings.warmup and settings.port == 8123
    monkeypatch.setenv("MY_KEY", "secret")
    assert service_settings_from_args(parser.parse_args(["serve", "--api-key-env", "MY_KEY"])).api_key == "secret"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--benchmark-stages", "0-9"])
