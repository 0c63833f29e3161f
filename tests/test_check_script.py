"""`mxsend check-script`, through main(argv) as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mxsend.cli import main

SCRIPT = """
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  if HeaderData["precedence"] == "bulk" then Actions.Priority = 15 end
  print("recipients", #Recipients)
  return Actions
end

function ServerDetails(params, headers, actions)
  if params["server"] == "mail.broken.com" then
    actions["tryTLS"] = 0
  end
  return actions
end
"""

MESSAGE = (
    "MAIL FROM:<alice@example.com>\n"
    "RCPT TO:<bob@broken.com>\n"
    "RCPT TO:<carol@broken.com>\n"
    "DATA\n"
    "Subject: hello\n"
    "Precedence: bulk\n"
    "\n"
    "body\n"
    ".\n"
)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    monkeypatch.delenv("MXSEND_CONFIG", raising=False)
    script = tmp_path / "mxout.lua"
    script.write_text(SCRIPT)
    message = tmp_path / "Q123"
    message.write_text(MESSAGE)
    config = tmp_path / "mxsend.toml"
    config.write_text('[script]\npath = "mxout.lua"\n[smtp]\nhelo_name = "out.example.com"\n')
    return script, message, config


def test_table_output(files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
                      ) -> None:
    script, message, config = files
    code = main(["-c", str(config), "check-script", "--message", str(message),
                 "--server", "mail.broken.com"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"script {script}: compiled" in out
    assert "* Priority      15" in out
    assert "* tryTLS" in out and "false" in out.split("* tryTLS")[1].splitlines()[0]
    assert "ServerDetails (server=mail.broken.com, domain=broken.com)" in out
    assert '"out.example.com"' in out
    assert "script_log" in out and "recipients\\t2" in out


def test_json_output(files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
                     ) -> None:
    script, message, config = files
    code = main(["check-script", str(script), "-c", str(config), "--message", str(message),
                 "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["compiled"] is True
    assert doc["check_file"]["priority"] == 15
    # Without --server, ServerDetails is asked about the first recipient's domain.
    assert doc["server_details"]["server"] == "broken.com"
    assert doc["server_details"]["try_tls"] is True
    assert doc["message"]["recipients"] == ["bob@broken.com", "carol@broken.com"]
    assert [e["event"] for e in doc["events"]] == ["script_log"]


def test_compile_error_exits_1_with_line(files: tuple[Path, Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    script, _, config = files
    script.write_text("function CheckFile(f, a)\n  return a +\nend\n")
    code = main(["-c", str(config), "check-script"])
    err = capsys.readouterr().err
    assert code == 1
    assert "mxout.lua:3:" in err and "near 'end'" in err


def test_runtime_error_exits_1(files: tuple[Path, Path, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    script, message, config = files
    script.write_text("function CheckFile(f, a) error('no way') end")
    code = main(["-c", str(config), "check-script", "--message", str(message)])
    out = capsys.readouterr().out
    assert code == 1
    assert "script_error" in out and "no way" in out


def test_missing_script_and_bad_message(files: tuple[Path, Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, message, config = files
    assert main(["-c", str(config), "check-script", str(tmp_path / "nope.lua")]) == 1
    assert "nope.lua" in capsys.readouterr().err
    message.write_text("not a spool file\n")
    assert main(["-c", str(config), "check-script", "--message", str(message)]) == 1
    assert "Q123" in capsys.readouterr().err


def test_shipped_sample_compiles(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MXSEND_CONFIG", raising=False)
    root = Path(__file__).resolve().parent.parent
    code = main(["-c", str(root / "config" / "mxsend.toml"), "check-script",
                 "--server", "mail.broken.com"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "* tryTLS" in out
