"""The state folder and the path-escape guard."""

from __future__ import annotations

import pytest

from resources import state as home


def test_home_follows_the_environment_and_creates_subfolders(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "state"))
    assert home.dataworth_home() == tmp_path / "state"
    for helper, name in [
        (home.delta_root, "delta"),
        (home.mlflow_dir, "mlflow"),
        (home.dagster_home, "dagster"),
        (home.landing_dir, "landing"),
        (home.models_dir, "models"),
    ]:
        assert helper() == tmp_path / "state" / name and helper().is_dir()


def test_default_home_is_under_the_project_root(monkeypatch):
    monkeypatch.delenv("DATAWORTH_HOME", raising=False)
    assert home.dataworth_home() == home.PROJECT_ROOT / ".dataworth"
    assert (home.PROJECT_ROOT / "resources" / "state.py").is_file()


def test_resolve_inside_accepts_nested_paths(tmp_path):
    assert home.resolve_inside(tmp_path, "a/b.txt") == tmp_path.resolve() / "a" / "b.txt"


@pytest.mark.parametrize("relative", ["/etc/passwd", "../x", "a/../../x", ""])
def test_resolve_inside_refuses_escapes(tmp_path, relative):
    with pytest.raises(ValueError, match=str(tmp_path)):
        home.resolve_inside(tmp_path, relative)


def test_resolve_inside_refuses_symlinks_pointing_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        home.resolve_inside(root, "link/secret.txt")
