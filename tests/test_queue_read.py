"""queue list/stats read a big queue in forked shares: the same answer as one pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxsend.commands import queue_read
from mxsend.commands.queue_format import list_rows, message_rows, shape, shape_counts, shape_rows
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
    inline = queue_read.fold_states(tmp_path, lambda e: shape_counts(e, NOW))
    assert len(inline) == 1  # a small queue: no fork
    monkeypatch.setattr(queue_read, "CHUNK", 4)
    monkeypatch.setattr(queue_read, "INLINE_BELOW", 0)
    shares = queue_read.fold_states(tmp_path, lambda e: shape_counts(e, NOW), workers=2)
    assert len(shares) == 8  # 30 files in chunks of 4
    one_pass = shape(spool.entries(), NOW)
    assert shape_rows(shares) == one_pass
    assert sum(row["total"] for row in one_pass) == 2 * 29  # m005 held
    # list: each share's rows, put in order by (created, id), as one pass gives them
    parts = queue_read.fold_states(
        tmp_path, lambda e: [(s.created, s.id, message_rows(s, w, NOW)) for s, w in e],
        workers=2)
    found = sorted((item for part in parts for item in part), key=lambda i: (i[0], i[1]))
    rows = [row for item in found for row in item[2]]
    expected = list_rows(sorted(spool.entries(), key=lambda e: (e[0].created, e[0].id)), NOW)
    assert rows == expected[1:]
    assert {"on hold", "in flight"} <= {row[5] for row in rows}


def test_a_file_gone_meanwhile_is_skipped(tmp_path: Path) -> None:
    _fill(tmp_path, 3)
    paths = queue_read.state_files(tmp_path)
    (tmp_path / "queue" / "m000").unlink()
    assert sorted(s.id for s, _ in queue_read.read_states(paths)) == ["m001", "m002"]


@pytest.mark.parametrize("address", [
    "plain@a.test",
    '"quoted \\"local\\" part"@a.test',  # escapes in the JSON: the full decoder
    "ünïcode@b.test",
])
@pytest.mark.parametrize("held", [False, True])
def test_the_stats_summary_says_what_the_decoder_says(address: str, held: bool) -> None:
    from mxsend.queue_state import MessageState, RecipientState, RecipientStatus, state_to_json

    state = MessageState(
        id="x", created=NOW - 0.25, sender="s@src.test", size=10, held=held,
        recipients=(RecipientState(address=address),
                    RecipientState(address="done@c.test", status=RecipientStatus.SENT,
                                   response='250 ok "queued"'),
                    RecipientState(address="later@c.test", response="451 later")))
    assert queue_read.stats_summary(state_to_json(state)) == (
        NOW - 0.25, held, [address, "later@c.test"])


def test_stats_shares_agree_with_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _fill(tmp_path, 12)
    monkeypatch.setattr(queue_read, "CHUNK", 5)
    monkeypatch.setattr(queue_read, "INLINE_BELOW", 0)
    assert shape_rows(queue_read.stats_shares(tmp_path, NOW)) == shape(spool.entries(), NOW)
