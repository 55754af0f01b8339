"""What a non-editable install needs (pyproject.toml): every config ships as package data, and the configs/...
paths the docs give resolve to the shipped copy from any directory (var_mclr/files.py, config_file)."""
from __future__ import annotations

from pathlib import Path

import pytest

from var_mclr.config import ConfigError, load_config
from var_mclr.files import CONFIG_DIR, config_file

REPO = Path(__file__).resolve().parents[1]


def test_every_config_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the project supports 3.10)
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    root = setuptools["package-dir"]["var_mclr.configs"]
    shipped = set()
    for package, patterns in setuptools["package-data"].items():
        if package.startswith("var_mclr.configs"):
            assert package in setuptools["packages"], package
            folder = REPO / root / Path(*package.split(".")[2:])
            shipped |= {p for pattern in patterns for p in folder.glob(pattern)}
    on_disk = set((REPO / root).rglob("*.yaml"))
    assert on_disk and on_disk == shipped, sorted(str(p.relative_to(REPO)) for p in on_disk ^ shipped)


def test_configs_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    assert CONFIG_DIR == REPO / "configs"  # a checkout (editable install) reads the repository's files
    monkeypatch.chdir(tmp_path)
    assert config_file("configs/mnist/mclr.yaml") == CONFIG_DIR / "mnist" / "mclr.yaml"
    assert load_config("configs/var_d20.yaml", check_files=False).model.depth == 20  # base: var_d16.yaml too
    # A file of that name in the working directory wins over the shipped one.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "var_d20.yaml").write_text("base: " + str(CONFIG_DIR / "var_d16.yaml") + "\n")
    assert load_config("configs/var_d20.yaml", check_files=False).model.depth == 16
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/no_such.yaml")
