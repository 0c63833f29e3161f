"""The spool's per-message shortcuts: private directories made once (and again when
gone), files read with os.read, string paths; what they do must not change."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mxsend.envelope import parse_bsmtp
from mxsend.errors import EnvelopeError
from mxsend.spool import Accepted, Claim, Quarantined, RecipientStatus, Spool, state_to_json
from tests.spool_crash_driver import SPOOL_MODULES

GOOD = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\nSubject: hi\r\n\r\nx\r\n.\r\n"
NOW = 1_800_000_000.0


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", owner="one")
    s.create_dirs()
    return s


def drop(spool: Spool, name: str, raw: bytes = GOOD) -> None:
    (spool.root / "tmp" / name).write_bytes(raw)
    os.rename(spool.root / "tmp" / name, spool.root / "new" / name)


class _Counting:
    """The os module, counting the calls of some names (as the crash driver does)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.names:
            return real

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return real(*args, **kwargs)

        return counted


def _counting(monkeypatch: pytest.MonkeyPatch, *names: str) -> _Counting:
    counting = _Counting(names)
    for module in SPOOL_MODULES:
        monkeypatch.setattr(module, "os", counting)
    return counting


def _final(spool: Spool, claim: Claim) -> Any:
    state = spool.read(claim)
    return replace(state, recipients=tuple(replace(r, status=RecipientStatus.SENT)
                                           for r in state.recipients))


def test_private_directories_are_made_once_not_per_message(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("m1", "m2", "m3"):
        drop(spool, name)
    counting = _counting(monkeypatch, "makedirs", "mkdir", "fstat")
    for name in ("m1", "m2", "m3"):
        assert isinstance(spool.accept(name, NOW), Accepted)
    for name in ("m1", "m2", "m3"):
        claim = spool.claim(name)
        assert claim is not None
        spool.complete(claim, _final(spool, claim))
    # One for incoming/one, one for active/one; no fstat of the files read.
    assert counting.calls == ["makedirs", "makedirs"]


def test_a_claim_lost_to_another_process_costs_one_rename(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two daemons on one spool both see every due message: the loser's claim is common
    # (about one per message in a sweep) and must stay one failed rename.
    for name in ("m1", "m2"):
        drop(spool, name)
        assert isinstance(spool.accept(name, NOW), Accepted)
    claim = spool.claim("m1")  # our active/ directory exists from here on
    assert claim is not None
    other = Spool(spool.root, owner="two")
    assert other.claim("m2") is not None
    counting = _counting(monkeypatch, "makedirs", "mkdir", "rename")
    assert spool.claim("m2") is None
    assert counting.calls == ["rename"]


@pytest.mark.parametrize("kind", ["incoming", "active"])
def test_a_private_directory_taken_away_is_made_again(spool: Spool, kind: str) -> None:
    drop(spool, "m1")
    assert isinstance(spool.accept("m1", NOW), Accepted)
    claim = spool.claim("m1")
    assert claim is not None
    spool.release(claim, spool.read(claim))
    # What a recoverer does to a process it presumed dead: the whole directory goes.
    shutil.rmtree(spool.root / kind / "one")
    drop(spool, "m2")
    assert isinstance(spool.accept("m2", NOW), Accepted)
    for id in ("m1", "m2"):
        claim = spool.claim(id)
        assert claim is not None and claim.path == spool.root / "active" / "one" / id
        spool.complete(claim, _final(spool, claim))
    assert spool.find("m1") is None and spool.find("m2") is None
    assert os.listdir(spool.root / "msg") == []


def test_a_missing_source_is_none_with_or_without_our_directory(spool: Spool) -> None:
    assert spool.accept("nothing", NOW) is None  # first call: the directory is made
    assert spool.claim("nothing") is None
    assert spool.accept("nothing", NOW) is None  # later calls: found there
    assert spool.claim("nothing") is None
    os.rmdir(spool.root / "incoming" / "one")
    os.rmdir(spool.root / "active" / "one")
    assert spool.accept("nothing", NOW) is None  # gone: made again, still nothing to take
    assert spool.claim("nothing") is None
    assert os.path.isdir(spool.root / "incoming" / "one")
    assert os.path.isdir(spool.root / "active" / "one")


def test_retire_then_work_again(spool: Spool) -> None:
    drop(spool, "m1")
    assert isinstance(spool.accept("m1", NOW), Accepted)
    spool.retire()
    assert not (spool.root / "owners" / "one").exists()
    drop(spool, "m2")
    assert isinstance(spool.accept("m2", NOW), Accepted)
    # The heartbeat comes back before the directory it vouches for.
    assert (spool.root / "owners" / "one").exists()
    assert spool.claim("m2") is not None


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 300_000])
def test_messages_of_any_size_are_read_whole(tmp_path: Path, size: int) -> None:
    spool = Spool(tmp_path / "spool", owner="one", max_message_size=400_000)
    spool.create_dirs()
    head = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\n"
    body = (b"y" * 98 + b"\r\n") * (size // 100) + b"z" * (size % 100)
    raw = head + body + (b"\r\n" if body else b"") + b".\r\n"
    drop(spool, "m", raw)
    result = spool.accept("m", NOW)
    assert isinstance(result, Accepted)
    assert result.message == parse_bsmtp(raw)
    assert spool.load_message("m") == parse_bsmtp(raw)


def test_a_file_growing_after_its_stat_is_read_up_to_the_limit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool", owner="one", max_message_size=1000)
    spool.create_dirs()
    drop(spool, "m", GOOD)
    real_open = os.open

    def open_and_grow(path: Any, flags: int, *args: Any) -> int:
        if os.fspath(path).endswith("/incoming/one/m"):
            with open(path, "ab") as handle:
                handle.write(b"x" * 5000)  # after the size check, before the read
        return real_open(path, flags, *args)

    counting = _counting(monkeypatch)
    monkeypatch.setattr(counting, "open", open_and_grow, raising=False)
    read: list[int] = []
    real_read = os.read

    def recording_read(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(counting, "read", recording_read, raising=False)
    result = spool.accept("m", NOW)
    assert sum(read) == 1001  # max_message_size + 1, as a file object's read(n) did
    with pytest.raises(EnvelopeError) as parsed:
        parse_bsmtp((GOOD + b"x" * 5000)[:1001])
    assert result == Quarantined(id="m", reason=str(parsed.value))


def test_claim_paths_stay_paths(spool: Spool) -> None:
    drop(spool, "m1")
    spool.accept("m1", NOW)
    claim = spool.claim("m1")
    assert claim is not None
    assert isinstance(claim.path, Path)
    assert claim.path == spool.root / "active" / "one" / "m1"
    state = spool.read(claim)
    spool.update(claim, replace(state, attempts=1))
    assert spool.read(claim).attempts == 1
    assert claim.path.read_bytes() == state_to_json(replace(state, attempts=1))


def test_state_json_is_as_json_dumps_wrote_it(spool: Spool) -> None:
    import json

    drop(spool, "m1", GOOD.replace(b"b@dst.test", "bé@dst.test".encode()).replace(
        b"MAIL FROM:<a@src.test>", b"MAIL FROM:<a@src.test> SMTPUTF8"))
    result = spool.accept("m1", NOW)
    assert isinstance(result, Accepted)
    state = replace(result.state, last_error='a "quoted" \\ reply\n')
    written = state_to_json(state)
    doc = json.loads(written)
    expected = (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    assert written == expected
    assert "é".encode() in written
