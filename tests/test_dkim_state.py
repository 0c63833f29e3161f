"""DKIM's place in the daemon's values: the state codec, DKIMDomain read back from Lua,
and `check-script --message` naming the key(s) that will sign (contract §7)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mxsend.actions import FileActions
from mxsend.cli import main
from mxsend.dkim_keys import write_new_key
from mxsend.dkim_spool import decided_domain
from mxsend.errors import SpoolError
from mxsend.luavalues import file_actions_from_lua
from mxsend.queue_state import MessageState, RecipientState, state_from_json, state_to_json
from tests.test_dkim import private

STATE = MessageState(id="m1", created=1.0, sender="a@src.test", size=10,
                     recipients=(RecipientState("b@d1.test"),))
FIELDS = "DKIM-Signature: v=1; a=ed25519-sha256; d=src.test; s=e1;\r\n\tb=abc\r\n"


@pytest.mark.parametrize(("fields", "label"), [
    (None, None), ("", None), (FIELDS, "d=src.test s=e1")])
def test_the_dkim_entry_round_trips(fields: str | None, label: str | None) -> None:
    state = dataclasses.replace(STATE, dkim_fields=fields, dkim=label)
    raw = state_to_json(state)
    assert state_from_json(raw) == state
    # Present means decided, even when empty; absent (older files) means not yet.
    assert ("dkim_fields" in json.loads(raw)) == (fields is not None)


@pytest.mark.parametrize("fields", [42, "DKIM-Signature: \u00e9\r\n", "no line end"])
def test_a_corrupt_dkim_entry_is_a_spool_error(fields: object) -> None:
    doc = json.loads(state_to_json(STATE))
    doc["dkim_fields"] = fields
    with pytest.raises(SpoolError):
        state_from_json(json.dumps(doc).encode())


def test_decided_domain() -> None:
    assert decided_domain(None) == ""
    assert decided_domain("d=src.test s=s1,d=src.test s=e1") == "src.test"


GIVEN = FileActions(dkim_domain="src.test")
DOMAINS = frozenset({"src.test", "other.test"})


@pytest.mark.parametrize(("value", "expected", "fault"), [
    (None, "src.test", False),  # untouched (or removed): the value passed in
    (b"src.test", "src.test", False),
    (b"", "", False),  # skip signing
    (b"Other.Test.", "other.test", False),
    (b"nope.test", "src.test", True),
    (42, "src.test", True),
    (b"\xff", "src.test", True),
])
def test_dkim_domain_read_back(value: object, expected: str, fault: bool) -> None:
    fields = {"DKIMDomain": value}
    actions, faults = file_actions_from_lua(fields, GIVEN, DOMAINS)  # type: ignore[arg-type]
    assert actions.dkim_domain == expected
    assert bool(faults) == fault
    if fault:
        assert faults[0][0] == "DKIMDomain" and "keeping 'src.test'" in faults[0][1]


def test_check_script_shows_the_keys_that_will_sign(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    key_file = tmp_path / "k.pem"
    write_new_key(key_file, private("ed25519"))
    pem = key_file.read_text()
    config = tmp_path / "mxsend.toml"
    config.write_text(f'[script]\npath = "{tmp_path / "mxout.lua"}"\n'
                      f'[[dkim.key]]\ndomain = "src.test"\nselector = "e1"\n'
                      f'key_file = "{key_file}"\n')
    (tmp_path / "mxout.lua").write_text(
        "function CheckFile(F, Actions) return Actions end\n"
        "function ServerDetails(P, H, Actions) return Actions end\n")
    message = tmp_path / "m1"
    message.write_bytes(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@d1.test>\r\nDATA\r\n"
                        b"From: a@sub.src.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert main(["-c", str(config), "check-script", "--message", str(message)]) == 0
    out = capsys.readouterr().out
    assert 'DKIM (DKIMDomain in "src.test", out "src.test")' in out
    assert "signs with d=src.test s=e1 a=ed25519-sha256" in out
    assert main(["-c", str(config), "check-script", "--message", str(message),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dkim"]["signs"] == "d=src.test s=e1"
    body = pem.split("\n")[1]
    assert body not in out and body not in json.dumps(doc)  # never the key material
