"""The command line through main([...]): -c anywhere, one-line usage errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mxsend import __version__
from mxsend.cli import build_parser, main

MXSEND = Path(sys.executable).with_name("mxsend")


@pytest.fixture(autouse=True)
def no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MXSEND_CONFIG", raising=False)


def one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "F", "run"], ["run", "-c", "F"], ["--config", "F", "run", "--once"],
        ["enqueue", "-c", "F", "a@b.test"], ["-c", "F", "queue", "list"],
        ["queue", "-c", "F", "list"], ["queue", "list", "-c", "F"],
        ["queue", "show", "Q1", "--config", "F"], ["batv", "sign", "a@b.test", "-c", "F"],
        ["check-script", "-c", "F"], ["resolve", "example.test", "-c", "F"],
    ],
)
def test_config_flag_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).config == "F"


def test_no_config_flag() -> None:
    assert build_parser().parse_args(["run"]).config is None


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mxsend {__version__}\n"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "enqueue", "queue", "check-script", "resolve", "batv"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        ([], 2, "COMMAND"),
        (["fly"], 2, "fly"),
        (["run", "--bogus"], 2, "--bogus"),
        (["--bogus", "run"], 2, "--bogus"),
        (["queue"], 2, "ACTION"),
        (["queue", "show"], 2, "ID"),
        (["queue", "show", "enqueue", "--bogus"], 2, "--bogus"),  # an id, not the command
        (["-c", "enqueue", "run", "--bogus"], 2, "--bogus"),  # a file name, likewise
        (["enqueue", "--bogus", "a@b.test"], 64, "--bogus"),
        (["-c", "x.toml", "enqueue", "-f"], 64, "-f"),
        (["run", "-c"], 2, "-c"),
    ],
)
def test_bad_usage_is_one_line(
    argv: list[str], code: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    err = one_line(capsys.readouterr().err)
    assert says in err


@pytest.mark.parametrize(("command", "code"), [(["run"], 2), (["enqueue", "a@b.test"], 64)])
def test_bad_config_names_the_key(
    tmp_path: Path, command: list[str], code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[smtp]\nport = 'x'\n")
    assert main(["-c", str(path), *command]) == code
    assert one_line(capsys.readouterr().err).startswith("mxsend: smtp.port:")


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in one_line(capsys.readouterr().err)


def test_config_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[log]\nfromat = 'json'\n")
    monkeypatch.setenv("MXSEND_CONFIG", str(path))
    assert main(["run"]) == 2
    assert one_line(capsys.readouterr().err).startswith("mxsend: log.fromat: unknown key")


def test_the_console_script(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MXSEND_CONFIG"}
    version = subprocess.run([str(MXSEND), "--version"], capture_output=True, text=True,
                             env=env, timeout=30, check=False)
    assert (version.returncode, version.stdout) == (0, f"mxsend {__version__}\n")
    bad = subprocess.run([str(MXSEND), "run", "-c", str(tmp_path / "none.toml")],
                         capture_output=True, text=True, env=env, timeout=30, check=False)
    assert bad.returncode == 2
    one_line(bad.stderr)
