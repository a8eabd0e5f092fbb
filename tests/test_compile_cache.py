"""Where compile artifacts go: an explicit directory wins over a preset environment."""

from __future__ import annotations

from engine.compile_cache import CACHE_ENV_VAR, configure_compile_cache


def test_explicit_directory_overrides_a_preset_inductor_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "preset"))
    assert configure_compile_cache(tmp_path / "mine") == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir()


def test_without_a_directory_the_project_variable_then_the_preset_one_decide(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "preset"))
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "project"))
    assert configure_compile_cache() == tmp_path / "project"
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "preset"))
    assert configure_compile_cache() == tmp_path / "preset"


def test_torchs_own_default_set_at_import_counts_as_unset(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    import engine.compile_cache as compile_cache

    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers does
    monkeypatch.setattr(compile_cache, "DEFAULT_CACHE_DIR", tmp_path / "persistent")
    assert configure_compile_cache() == tmp_path / "persistent"
