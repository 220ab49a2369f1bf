"""Packaging checks: one import namespace (`modeling_deepseek_v32`), presets shipped as package data, and no
top-level `kernels` / `configuration` / `conversion` module (transformers probes for the PyPI package `kernels`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# import name -> source folder, as mapped by [tool.setuptools.package-dir] in pyproject.toml
MAPPED = {
    "modeling_deepseek_v32": "modeling_deepseek_v32",
    "modeling_deepseek_v32/configuration": "configuration",
    "modeling_deepseek_v32/conversion": "conversion",
    "modeling_deepseek_v32/kernels": "kernels",
}
FORBIDDEN_TOP_LEVEL = ("kernels", "configuration", "conversion", "hub_upload", "hub_upload.py", "tests", "benchmarks")
# files at the repo root that a build may read
BUILD_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE", "hub_upload.py")


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # check the installed package, not a path hack
    return env


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """Build a wheel from a copy of the sources (keeps build/ and *.egg-info out of the repo) and list it."""
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    for name in BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in MAPPED.values():
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out)],
        cwd=src,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    assert wheels[0].name.startswith("deepseek_v32-0.1.0-"), wheels[0].name
    with zipfile.ZipFile(wheels[0]) as zf:
        return set(zf.namelist())


def test_wheel_has_single_top_level_package(wheel_names):
    top = {name.split("/", 1)[0] for name in wheel_names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"modeling_deepseek_v32"}, sorted(top)
    for name in FORBIDDEN_TOP_LEVEL:
        assert name not in top, f"top-level {name!r} must not be installed"
    assert not any(n.startswith(("kernels/", "configuration/", "conversion/")) for n in wheel_names)
    assert len(dist_info) == 1, sorted(dist_info)


def test_wheel_contents(wheel_names):
    assert "modeling_deepseek_v32/__init__.py" in wheel_names
    assert "modeling_deepseek_v32/configuration/__init__.py" in wheel_names
    assert "modeling_deepseek_v32/configuration/presets/official.json" in wheel_names
    assert "modeling_deepseek_v32/conversion/__init__.py" in wheel_names
    assert "modeling_deepseek_v32/kernels/__init__.py" in wheel_names


def test_wheel_ships_every_source_file(wheel_names):
    """Every .py file (and every preset) under the mapped folders lands in the wheel.

    Fails when a new subfolder is added but not listed in [tool.setuptools] packages of pyproject.toml.
    """
    missing = []
    for target, folder in MAPPED.items():
        root = REPO / folder
        for path in root.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".py" or (folder == "configuration" and rel.startswith("presets/") and path.suffix == ".json"):
                if f"{target}/{rel}" not in wheel_names:
                    missing.append(f"{folder}/{rel}")
    assert not missing, f"not in the wheel (add the subpackage to pyproject.toml): {missing}"


def test_installed_imports_from_outside_repo(tmp_path):
    """In a fresh interpreter outside the repo, the installed package imports with its mapped subpackages, the
    presets are readable as package data, and no top-level `kernels`/`configuration`/`conversion` resolves to our
    folders."""
    code = textwrap.dedent(
        f"""
        import importlib.util, json, os, sys
        from importlib import resources

        repo = {str(REPO)!r}
        assert os.getcwd() != repo
        import modeling_deepseek_v32.configuration, modeling_deepseek_v32.conversion, modeling_deepseek_v32.kernels
        from modeling_deepseek_v32.kernels import kernels_enabled
        assert isinstance(kernels_enabled(), bool)
        preset = resources.files("modeling_deepseek_v32.configuration").joinpath("presets", "official.json")
        json.loads(preset.read_text(encoding="utf-8"))

        ours = [os.path.join(repo, name) for name in ("kernels", "configuration", "conversion")]
        result = {{}}
        for name in ("kernels", "configuration", "conversion"):
            spec = importlib.util.find_spec(name)
            locations = [] if spec is None else [spec.origin or ""] + list(spec.submodule_search_locations or [])
            bad = [loc for loc in locations if loc and (
                any(os.path.realpath(loc).startswith(os.path.realpath(o)) for o in ours)
                or "modeling_deepseek_v32" in loc
            )]
            result[name] = bad
        print(json.dumps(result))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        "import from outside the repo failed; is the package installed (`pip install -e .`)?\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"kernels": [], "configuration": [], "conversion": []}, result


def test_kernels_module_without_triton(monkeypatch):
    """`modeling_deepseek_v32.kernels` imports without Triton, and the env switch turns the kernels off."""
    from modeling_deepseek_v32 import kernels

    monkeypatch.setenv("DEEPSEEK_V32_KERNELS", "0")
    assert kernels.kernels_enabled() is False
    monkeypatch.delenv("DEEPSEEK_V32_KERNELS")
    assert isinstance(kernels.kernels_enabled(), bool)
