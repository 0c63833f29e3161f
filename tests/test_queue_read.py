"""queue list/stats read a big queue in forked shares: the same answer as one pass."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxsend.commands import queue_read
from mxsend.commands.queue_format import message_rows, shape, shape_counts, shape_rows
from mxsend.errors import SpoolError
from mxsend.queue_state import MessageState, state_from_json
from mxsend.spool import Accepted, Spool

NOW = 1_800_000_000.0


def _fill(root: Path, count: int) -> Spool:
    spool = Spool(root, owner="t")
    spool.create_dirs()
    for i in range(count):
        domains = ("a.test", "b.test", "c.test")
        raw = (f"MAIL FROM:<s{i}@src.test>\nRCPT TO:<r{i}@{domains[i % 3]}>\n"
               f"RCPT TO:<x{i}@{domains[(i + 1) % 3]}>\nDATA\nSubject: {i}\n\nbody\n.\n")
        (root / "tmp" / f"m{i:03d}").write_bytes(raw.encode())
        (root / "tmp" / f"m{i:03d}").rename(root / "new" / f"m{i:03d}")
        assert isinstance(spool.accept(f"m{i:03d}", NOW - 60 * i), Accepted)
    if count > 7:
        assert spool.hold("m005") is not None  # held: not in stats, listed as on hold
        assert spool.claim("m007") is not None  # in flight
    return spool


def test_shares_in_forked_workers_agree_with_one_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _fill(tmp_path, 30)
    inline = queue_read.fold_states(tmp_path, lambda e: shape_counts(e, NOW)).results
    assert len(inline) == 1  # a small queue: no fork
    monkeypatch.setattr(queue_read, "CHUNK", 4)
    monkeypatch.setattr(queue_read, "INLINE_BELOW", 0)
    shares, unreadable = queue_read.fold_states(tmp_path, lambda e: shape_counts(e, NOW),
                                                workers=2)
    assert len(shares) == 8 and unreadable == []  # 30 files in chunks of 4
    one_pass = shape(spool.entries(), NOW)
    assert shape_rows(shares) == one_pass
    assert sum(row["total"] for row in one_pass) == 2 * 29  # m005 held
    # list: each share's rows, put in order by (created, id), as one pass gives them
    parts = queue_read.fold_states(
        tmp_path, lambda e: [(s.created, s.id, message_rows(s, w, NOW)) for s, w in e],
        workers=2).results
    found = sorted((item for part in parts for item in part), key=lambda i: (i[0], i[1]))
    rows = [row for item in found for row in item[2]]
    expected = [row for s, w in sorted(spool.entries(), key=lambda e: (e[0].created, e[0].id))
                for row in message_rows(s, w, NOW)]
    assert rows == expected
    assert {"on hold", "in flight"} <= {row[5] for row in rows}


def test_a_file_gone_meanwhile_is_skipped(tmp_path: Path) -> None:
    _fill(tmp_path, 3)

    def read_after_a_claim(states: Iterator[tuple[MessageState, str]]) -> list[str]:
        (tmp_path / "queue" / "m000").unlink()  # listed, then gone before it is read
        return sorted(state.id for state, _ in states)

    assert queue_read.fold_states(tmp_path, read_after_a_claim) == ([["m001", "m002"]], [])


@pytest.mark.parametrize("forked", [False, True])
def test_an_unreadable_state_is_named_and_the_rest_still_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: bool) -> None:
    spool = _fill(tmp_path, 12)
    expected = shape(spool.entries(), NOW)
    cut_short, not_json = b'{"version":1,"id":"m003"', b"\xff not json"
    (tmp_path / "queue" / "m003").write_bytes(cut_short)
    (tmp_path / "queue" / "m009").write_bytes(not_json)
    if forked:
        monkeypatch.setattr(queue_read, "CHUNK", 5)
        monkeypatch.setattr(queue_read, "INLINE_BELOW", 0)
    shares, unreadable = queue_read.stats_shares(tmp_path, NOW)
    # m003 and m009 each had two pending recipients
    assert sum(row["total"] for row in shape_rows(shares)) == \
        sum(row["total"] for row in expected) - 4
    assert sorted(unreadable) == [
        f"{tmp_path}/queue/m003: {decoder_error(cut_short)}",
        f"{tmp_path}/queue/m009: {decoder_error(not_json)}",
    ]
    listed = queue_read.fold_listed(tmp_path, lambda e: sorted(s.id for s, _ in e))
    assert sorted(id for share in listed.results for id in share) == \
        [f"m{i:03d}" for i in range(12) if i not in (3, 9)]
    assert sorted(listed.unreadable) == sorted(unreadable)
    # Spool.entries() names the file too, and skips it when asked to
    m003 = re.escape(str(tmp_path / "queue" / "m003"))
    with pytest.raises(SpoolError, match=f"^{m003}: corrupt state file"):
        list(spool.entries())
    skipped: list[str] = []
    assert len(list(spool.entries(skipped))) == 10 and sorted(skipped) == sorted(unreadable)


def decoder_error(raw: bytes) -> str:
    with pytest.raises(SpoolError, match=r"^corrupt state file: ") as caught:
        state_from_json(raw)
    return str(caught.value)


@pytest.mark.parametrize("address", [
    "plain@a.test",
    '"quoted \\"local\\" part"@a.test',  # escapes in the JSON: the full decoder
    "ünïcode@b.test",
])
@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("dkim", [None, "DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=x\r\n"])
def test_the_stats_summary_says_what_the_decoder_says(
        address: str, held: bool, dkim: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mxsend.queue_state import MessageState, RecipientState, RecipientStatus, state_to_json

    state = MessageState(
        id="x", created=NOW - 0.25, sender="s@src.test", size=10, held=held,
        dkim_fields=dkim, dkim=dkim and "signed",
        recipients=(RecipientState(address=address),
                    RecipientState(address="done@c.test", status=RecipientStatus.SENT,
                                   response="250 ok queued"),
                    RecipientState(address="later@c.test", response="451 later")))
    raw = state_to_json(state)
    assert queue_read.stats_summary(raw) == (NOW - 0.25, held, [address, "later@c.test"])
    if "\\" not in address:  # the fast path, DKIM signature or not: no decoder called
        monkeypatch.setattr(queue_read, "state_from_json", None)
        assert queue_read.stats_summary(raw) == (NOW - 0.25, held, [address, "later@c.test"])


def test_stats_shares_agree_with_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _fill(tmp_path, 12)
    monkeypatch.setattr(queue_read, "CHUNK", 5)
    monkeypatch.setattr(queue_read, "INLINE_BELOW", 0)
    assert queue_read.stats_shares(tmp_path, NOW).unreadable == []
    assert shape_rows(queue_read.stats_shares(tmp_path, NOW).results) == \
        shape(spool.entries(), NOW)


@pytest.mark.parametrize("address", [
    "plain@a.test",
    '"quoted \\"local\\" part"@a.test',  # escapes in the JSON: the full decoder
    "ünïcode@b.test",
])
@pytest.mark.parametrize("extra", [
    {},
    {"attempts": 3, "last_try": NOW - 5.5, "next_try": NOW + 600.0,
     "last_error": "451 4.7.1 greylisted"},
    {"dkim_fields": "DKIM-Signature: v=1\r\n", "dkim": "signed"},
    {"sender": ""},
])
def test_the_list_summary_shows_what_the_decoder_shows(address: str,
                                                         extra: dict[str, object]) -> None:
    from mxsend.queue_state import (
        MessageState,
        RecipientState,
        RecipientStatus,
        state_from_json,
        state_to_json,
    )

    state = MessageState(**{  # type: ignore[arg-type]
        "id": "x1", "created": NOW - 0.25, "sender": "s@src.test", "size": 10,
        "recipients": (RecipientState(address=address, response="421  4.4.2 timed   out"),
                       RecipientState(address="done@c.test", status=RecipientStatus.SENT,
                                      response="250 ok"),
                       RecipientState(address="later@c.test", response="451 later")),
        **extra})
    raw = state_to_json(state)
    summary = queue_read.list_summary(raw)
    # the fast path wherever it is exact: not for escapes, but for a DKIM signature's CRLFs
    fast = address != '"quoted \\"local\\" part"@a.test'
    assert isinstance(summary, queue_read.Listed) is fast
    for where in ("queue", "hold", "active"):
        assert message_rows(summary, where, NOW) == message_rows(state_from_json(raw), where, NOW)


def test_a_state_the_summary_cannot_read_exactly_goes_to_the_decoder() -> None:
    from mxsend.errors import SpoolError
    from mxsend.queue_state import MessageState, RecipientState, state_to_json

    raw = state_to_json(MessageState(id="x", created=NOW, sender="s@src.test", size=1,
                                     recipients=(RecipientState("r@a.test"),)))
    with pytest.raises(SpoolError):  # not a status: the decoder's error, as before
        queue_read.list_summary(raw.replace(b'"status":"pending"', b'"status":"lost"'))
    with pytest.raises(SpoolError):
        queue_read.list_summary(raw.replace(b'{"version":1,', b'{"version":2,'))
    for changed in (raw.replace(b'"attempts":0', b'"attempts":2.0'),  # not how we write it
                    raw.replace(b'"attempts":0,', b"").replace(  # nor in this order
                        b'"held":false', b'"held":false,"attempts":2')):
        summary = queue_read.list_summary(changed)
        assert not isinstance(summary, queue_read.Listed)
        assert summary.attempts == 2


@pytest.mark.parametrize("json_out", [False, True])
def test_queue_list_read_in_shares_prints_what_one_pass_prints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        json_out: bool) -> None:
    from mxsend.cli import main
    from tests.fixtures.daemon import write_config

    spool = _fill(tmp_path / "spool", 12)
    # The longest sender in one share only: the table's widths are every share's.
    long_sender = "a-very-long-sender-address-in-the-last-share@src.test"
    message = (f"MAIL FROM:<{long_sender}>\nRCPT TO:<z@a.test>\nDATA\n\nbody\n.\n")
    (tmp_path / "spool" / "new" / "zzz").write_text(message)
    assert isinstance(spool.accept("zzz", NOW + 1), Accepted)
    config = write_config(tmp_path, {})
    args = ["-c", str(config), "queue", "list", *(["--json"] if json_out else [])]

    def printed() -> str:
        assert main(args) == 0
        return capsys.readouterr().out

    monkeypatch.setattr("time.time", lambda: NOW + 5)  # the AGE column: one clock
    one_pass = printed()
    monkeypatch.setattr(queue_read, "CHUNK", 5)
    monkeypatch.setattr(queue_read, "INLINE_BELOW", 0)
    in_shares = printed()
    assert in_shares == one_pass
    assert long_sender in one_pass and "zzz" in one_pass
    if not json_out:
        header, *rows, summary = one_pass.splitlines()
        at = header.index("RECIPIENT")  # after the longest sender, whichever share it is in
        assert at == header.index("SENDER") + len(long_sender) + 4  # <...> and two spaces
        assert all(row[at - 2:at] == "  " and "@" in row[at:].split()[0] for row in rows)
        assert summary == "-- 13 messages, 25 recipients pending"


@pytest.mark.parametrize("damage", [
    (b'"created":1796693422.65,', b'"created":1.2.3,'),  # a number that is none
    (b'"address":"r@a.test"', b'"address":"r\xff@a.test"'),  # not UTF-8
])
def test_a_damaged_state_that_looks_like_ours_is_the_decoders_to_name(
        damage: tuple[bytes, bytes]) -> None:
    from mxsend.queue_state import MessageState, RecipientState, state_to_json

    state = MessageState(id="x", created=1796693422.65, sender="s@src.test", size=10,
                         recipients=(RecipientState(address="r@a.test"),))
    raw = state_to_json(state)
    assert damage[0] in raw
    damaged = raw.replace(*damage)
    for summary in (queue_read.stats_summary, queue_read.list_summary):
        with pytest.raises(SpoolError, match=r"^corrupt state file: "):
            summary(damaged)
