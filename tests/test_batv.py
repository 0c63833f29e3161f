"""BATV prvs= (draft-levine-smtp-batv-01 §4): format, round trip, expiry, and the CLI."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxsend.batv import DAY, BatvKey, is_signed, load_key, sign, verify
from mxsend.cli import main
from mxsend.errors import ConfigError

KEY = BatvKey(b"correct horse battery staple")
NOW = 20_000 * DAY + 3600.0  # day 20000 since the epoch


def test_format_follows_the_draft():
    signed = sign("alice@example.com", KEY, NOW)
    match = re.fullmatch(r"prvs=(\d)(\d{3})([0-9a-f]{6})=alice@example\.com", signed)
    assert match, signed
    number, day, signature = match.groups()
    assert number == "0"
    assert day == f"{(20_000 + 7) % 1000:03d}"  # expiry day, days since 1970, mod 1000
    # §4.3: first three octets of HMAC-SHA1(key, K DDD orig-mailbox), in hex.
    expected = hmac.new(KEY.secret, f"0{day}alice@example.com".encode(),
                        hashlib.sha1).hexdigest()[:6]
    assert signature == expected


def test_round_trip_and_original_address():
    signed = sign("alice@example.com", KEY, NOW)
    result = verify(signed, KEY, NOW + 3 * DAY)
    assert result.valid and result.address == "alice@example.com" and result.reason == ""


def test_domain_case_does_not_matter_but_the_signature_does():
    signed = sign("alice@example.com", KEY, NOW)
    assert verify(signed.replace("example.com", "EXAMPLE.COM"), KEY, NOW).valid
    tampered = signed.replace("=alice@", "=bob@")
    assert verify(tampered, KEY, NOW).reason == "bad signature"
    assert verify(signed, BatvKey(b"other key"), NOW).reason == "bad signature"


def test_expiry():
    signed = sign("alice@example.com", KEY, NOW)
    assert verify(signed, KEY, NOW + 7 * DAY).valid  # the expiry day itself
    assert verify(signed, KEY, NOW + 8 * DAY).reason == "expired"
    assert verify(signed, KEY, NOW + 400 * DAY).reason == "expired"


def test_key_numbers_select_the_key():
    old, new = BatvKey(b"old", number=1), BatvKey(b"new", number=2)
    signed = sign("a@example.com", old, NOW)
    assert signed.startswith("prvs=1")
    assert verify(signed, {1: old, 2: new}, NOW).valid
    assert "unknown key" in verify(signed, {2: new}, NOW).reason


def test_null_sender_and_already_signed_are_left_alone():
    assert sign("", KEY, NOW) == ""
    signed = sign("a@example.com", KEY, NOW)
    assert sign(signed, KEY, NOW) == signed
    assert is_signed(signed) and not is_signed("a@example.com")
    assert verify("a@example.com", KEY, NOW).reason == "not a prvs= address"


def test_key_never_in_repr():
    assert "staple" not in repr(KEY)


@given(local=st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,20}", fullmatch=True),
       day=st.integers(0, 60_000))
def test_round_trip_property(local, day):
    now = day * DAY
    signed = sign(f"{local}@example.org", KEY, now)
    assert verify(signed, KEY, now).address == f"{local}@example.org"


def test_load_key(tmp_path: Path):
    path = tmp_path / "batv.key"
    path.write_bytes(b"  secret\n")
    assert load_key(path) == b"secret"
    with pytest.raises(ConfigError, match=r"batv\.key_file"):
        load_key(None)
    with pytest.raises(ConfigError, match=r"batv\.key_file"):
        load_key(tmp_path / "missing")


def _config(tmp_path: Path) -> Path:
    (tmp_path / "batv.key").write_text("cli-secret\n")
    config = tmp_path / "mxsend.toml"
    config.write_text('[batv]\nkey_file = "batv.key"\n')
    return config


def test_cli_sign_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = str(_config(tmp_path))
    assert main(["-c", config, "batv", "sign", "alice@example.com"]) == 0
    signed = capsys.readouterr().out.strip()
    assert signed.startswith("prvs=") and signed.endswith("=alice@example.com")
    assert main(["batv", "verify", f"<{signed}>", "-c", config]) == 0
    assert capsys.readouterr().out.strip() == "alice@example.com"
    assert main(["-c", config, "batv", "verify", signed.replace("=alice", "=mallory")]) == 1
    assert "bad signature" in capsys.readouterr().err


def test_cli_without_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "mxsend.toml"
    config.write_text("")
    assert main(["-c", str(config), "batv", "sign", "a@example.com"]) == 2
    assert "batv.key_file" in capsys.readouterr().err
