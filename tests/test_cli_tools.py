"""`deepseek-v32 <tool>` reaches the conversion and upload tools, in real subprocesses of the installed script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from modeling_deepseek_v32 import default_model_path
from modeling_deepseek_v32.cli import TOOLS, main


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("deepseek-v32")
    command = [script] if script else [sys.executable, "-m", "modeling_deepseek_v32"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_tool():
    result = _cli("--help")
    assert result.returncode == 0
    for name in TOOLS:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_each_tool_answers_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_verify_passes_on_the_shipped_model_and_fails_on_a_broken_copy(tmp_path):
    ok = _cli("verify", default_model_path())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken"
    shutil.copytree(default_model_path(), broken)
    next(broken.glob("model-00003-*.safetensors")).unlink()
    failed = _cli("verify", str(broken))
    assert failed.returncode != 0
    assert "model-00003" in failed.stdout + failed.stderr


def test_upload_builds_a_folder_without_a_repo(tmp_path):
    result = _cli("upload", default_model_path(), "--local-dir", str(tmp_path / "up"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "up" / "modeling_deepseek_v32.py").exists() and (tmp_path / "up" / "README.md").exists()
