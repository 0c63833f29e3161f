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


@pytest.mark.parametrize("processes", [1, 2])
def test_run_refuses_a_script_that_does_not_compile(
        files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        processes: int) -> None:
    # Issue 10 item 12: the daemon ran on defaults, logging at info only; a partner's
    # forceTLS rule silently disappeared. Now `mxsend run` exits 2 before any daemon
    # (or the supervisor of several) starts, naming the file and line as Lua does.
    script, _, config = files
    script.write_text("function CheckFile(f, a)\n  return a\nend\n\nlocal x = = 1\n")
    config.write_text(config.read_text() + f'[spool]\npath = "{tmp_path / "spool"}"\n'
                      f'[queue]\nprocesses = {processes}\n')
    code = main(["-c", str(config), "run", "--once"])
    err = capsys.readouterr().err
    assert code == 2
    [line] = err.strip().splitlines()
    assert f"{script}:5:" in line, line
    assert not (tmp_path / "spool").exists()  # nothing started


def test_a_reload_that_does_not_compile_is_an_error_and_keeps_the_script(
        tmp_path: Path) -> None:
    import asyncio
    import logging

    from mxsend.config import Config, ScriptConfig
    from mxsend.log import get_logger
    from mxsend.policy import Policy

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    script = tmp_path / "mxout.lua"
    script.write_text("function CheckFile(f, a) a.Priority = 7 return a end\n")
    handler = Keep()
    logger = get_logger()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # an operator's `log.level = "warning"` sees it

    async def reload_broken() -> int:
        from tests.test_policy import request

        policy = Policy(Config(script=ScriptConfig(path=script)))
        try:
            assert await policy.load()
            script.write_text("function CheckFile(f, a)\n  a.Priority = = 8\nend\n")
            assert await policy.load() is False
            return (await policy.check_file(request())).priority
        finally:
            policy.close()

    try:
        assert asyncio.run(reload_broken()) == 7
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    [record] = records
    assert record.levelno == logging.ERROR
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["function"] == "load" and "mxout.lua:2:" in fields["error"]


HOOKS = """
function CheckFile(Filename, Actions) return Actions end

function ServerDetails(params, headers, actions)
  actions.returnAddressModifier = 1
  actions.defaultReturnAddress = "bounces@example.com"
  return actions
end

function ReturnCodeHandler(LastCommand, FullResponse, LastLine)
  return nil
end

function ModifyReturnPath(ComputedMailFrom, MailFrom, OriginalMailFrom, AuthSender,
                          Recipients, CreationTime, Headers, Size, SenderIPAddress,
                          Subject, AllRecipients)
  if Subject == "keep" then return nil end
  if Subject == "broken" then return "no address" end
  local user, domain = string.match(MailFrom, "^(.*)@(.*)$")
  return "srs0=" .. user .. "=" .. domain .. "=" .. #Recipients .. "@" .. ComputedMailFrom
      :match("@(.*)$")
end
"""


def _hooks(files: tuple[Path, Path, Path], subject: str) -> None:
    script, message, _ = files
    script.write_text(HOOKS)
    message.write_text(MESSAGE.replace("Subject: hello", f"Subject: {subject}"))


def test_modify_return_path_answer_is_shown(files: tuple[Path, Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _hooks(files, "rewrite")
    _, message, config = files
    main(["-c", str(config), "check-script", "--message", str(message)])
    out = capsys.readouterr().out
    assert "ReturnCodeHandler: defined" in out
    # ComputedMailFrom is returnAddressModifier's choice; the answer becomes MAIL FROM.
    assert ('ModifyReturnPath: ComputedMailFrom "bounces@example.com" -> MAIL FROM'
            ' "srs0=alice=example.com=2@example.com"') in out, out


def test_modify_return_path_in_json(files: tuple[Path, Path, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    _hooks(files, "rewrite")
    _, message, config = files
    main(["-c", str(config), "check-script", "--message", str(message), "--json"])
    hooks = json.loads(capsys.readouterr().out)["hooks"]
    assert hooks == {
        "ReturnCodeHandler": {"defined": True},
        "ModifyReturnPath": {"defined": True, "computed": "bounces@example.com",
                             "result": "srs0=alice=example.com=2@example.com",
                             "sender": "srs0=alice=example.com=2@example.com",
                             "error": ""},
    }


def test_modify_return_path_nil_keeps_and_a_bad_answer_is_a_script_error(
        files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _hooks(files, "keep")
    _, message, config = files
    assert main(["-c", str(config), "check-script", "--message", str(message)]) == 0
    out = capsys.readouterr().out
    assert ('ModifyReturnPath: ComputedMailFrom "bounces@example.com" -> keeps it;'
            ' MAIL FROM "bounces@example.com"') in out, out
    _hooks(files, "broken")
    code = main(["-c", str(config), "check-script", "--message", str(message), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1  # a script_error, as the daemon would log it
    assert doc["hooks"]["ModifyReturnPath"]["sender"] == "bounces@example.com"
    [error] = [e for e in doc["events"] if e["event"] == "script_error"]
    assert error["function"] == "ModifyReturnPath" and "not valid" in error["error"]


def test_a_script_without_hooks_says_so(files: tuple[Path, Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, message, config = files
    main(["-c", str(config), "check-script", "--message", str(message)])
    out = capsys.readouterr().out
    assert "ReturnCodeHandler: not defined (no call per reply)" in out
    assert "ModifyReturnPath: not defined" in out
    main(["-c", str(config), "check-script", "--json"])
    assert json.loads(capsys.readouterr().out)["hooks"] == {
        "ReturnCodeHandler": {"defined": False}, "ModifyReturnPath": {"defined": False}}
