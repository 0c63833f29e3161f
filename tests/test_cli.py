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


# --- closed pipes (contract §10: output to a closed pipe ends quietly) ------------------

LOUD_SCRIPT = """
function CheckFile(Filename, Actions)
  for i = 1, 100 do print(string.rep("x", 1900) .. i) end
  return Actions
end
function ServerDetails(Parameters, HeaderLines, Actions) return Actions end
"""
MESSAGE = b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\nDATA\nSubject: x\n\nhi\n.\n"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MXSEND_CONFIG"}


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    # `mxsend check-script --json | head -c1`, a real pipe: ~200 KB of JSON (100 script
    # prints of 1900 characters) overflow the pipe's 64 KB, so the writer is still writing
    # when head exits and gets EPIPE.
    (tmp_path / "loud.lua").write_text(LOUD_SCRIPT)
    (tmp_path / "message").write_bytes(MESSAGE)
    config = tmp_path / "c.toml"
    config.write_text('[spool]\npath = "spool"\n')
    writer = subprocess.Popen(
        [str(MXSEND), "check-script", str(tmp_path / "loud.lua"), "--message",
         str(tmp_path / "message"), "--json", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert writer.stdout is not None and writer.stderr is not None
    head = subprocess.run(["head", "-c1"], stdin=writer.stdout, capture_output=True,
                          timeout=30, check=True)
    writer.stdout.close()  # only head holds the read end now
    try:
        stderr = writer.stderr.read()
        code = writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.stderr.close()
    assert head.stdout == b"{"
    assert stderr == b""
    assert code == 141  # 128 + SIGPIPE, what a shell shows for `yes | head`


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["--help"], ["enqueue", "--help"], ["queue", "list"],
     ["queue", "list", "--json"], ["check-script", "SCRIPT", "--json"],
     ["check-script", "SCRIPT"], ["batv", "sign", "a@b.test"]],
)
def test_every_command_ends_quietly_on_a_closed_pipe(tmp_path: Path, argv: list[str]) -> None:
    # The read end is closed before the command starts, so its first write fails.
    (tmp_path / "key").write_bytes(b"k" * 32)
    (tmp_path / "script.lua").write_text(LOUD_SCRIPT)
    config = tmp_path / "c.toml"
    config.write_text('[spool]\npath = "spool"\n[batv]\nkey_file = "key"\n')
    (tmp_path / "spool").mkdir()
    argv = [str(tmp_path / "script.lua") if a == "SCRIPT" else a for a in argv]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([str(MXSEND), *argv], stdout=write_end,
                                stderr=subprocess.PIPE, env=dict(_env(), MXSEND_CONFIG=str(config)),
                                timeout=30, check=False)
    finally:
        os.close(write_end)
    assert result.stderr == b""
    # argparse's --help and --version swallow a failed write themselves and exit 0 when
    # stdout is unbuffered (PYTHONUNBUFFERED); buffered, main()'s flush finds the pipe.
    # The queue commands finish their work whoever reads and then exit 0 (a `queue
    # delete ALL | head` still deleted everything: test_queue_cli checks that).
    quiet_codes = (0, 141) if "--help" in argv or "--version" in argv else (
        (0,) if argv[0] == "queue" else (141,))
    assert result.returncode in quiet_codes


def test_invoked_as_sendmail_is_enqueue(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/sbin/sendmail", "-bs"])
    assert main() == 64  # enqueue's EX_USAGE, with enqueue's refusal of SMTP mode
    assert "-bs" in one_line(capsys.readouterr().err)
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/mxsend", "-bs"])
    assert main() == 2
