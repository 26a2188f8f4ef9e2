"""CLI conventions: --version, shell completion, closed choices in --help, help that matches behaviour."""

import subprocess
import sys

import pldistill_cli


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pldistill_cli", *args], capture_output=True, text=True, timeout=60)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pldistill {pldistill_cli.__version__}"
    assert pldistill_cli.__version__ != "0+unknown"  # installed: the version comes from the package metadata


def test_shell_completion_is_available():
    assert "--install-completion" in run("--help").stdout
    script = run("--show-completion", "bash")
    assert script.returncode == 0 and "complete" in script.stdout


def test_help_states_defaults_the_code_uses(tmp_path, monkeypatch):
    from typer.main import get_command

    from pldistill_cli.cli import _default_student, app

    export = get_command(app).commands["export"]
    helps = {p.name: p.help or "" for p in export.params}
    assert all(len(helps[name]) > 10 for name in ("out", "dataset", "fold", "method", "seed")), helps
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 7\ndistill:\n  method: kd\n")
    folder, _ = _default_student(tmp_path / "params.yaml", None, None, None, None)
    default = f"export/{folder.parent.parent.name}-{folder.parent.name}-{folder.name}"
    assert default == "export/synthetic-fold1-student-kd-s7"
    assert "export/<dataset>-fold<k>-student-<method>-s<seed>" in helps["out"]
