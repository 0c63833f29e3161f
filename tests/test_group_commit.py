"""GroupCommit: one syncfs serves every thread waiting for durability at that moment."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import mxsend.durable as spool_module
from mxsend.committer import Committer
from mxsend.errors import SpoolError
from mxsend.spool import Accepted, GroupCommit, RecipientStatus, Spool

pytestmark = pytest.mark.skipif(not GroupCommit.available(), reason="no syncfs(2) here")

GOOD = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\nSubject: hi\r\n\r\nx\r\n.\r\n"


class _Recorder:
    """Wraps the real syncfs, recording when each call started and ended."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[tuple[float, float]] = []
        self.delay = delay
        self.fail = fail
        self.real = spool_module._syncfs
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        start = time.monotonic()
        if self.fail:
            raise OSError(errno.EIO, "I/O error")
        self.real(fd)
        time.sleep(self.delay)
        with self.lock:
            self.calls.append((start, time.monotonic()))


def test_concurrent_barriers_share_syncfs_calls_and_each_is_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder(delay=0.01)
    monkeypatch.setattr(spool_module, "_syncfs", recorder)
    commit = GroupCommit(tmp_path)
    windows: list[tuple[float, float]] = []
    lock = threading.Lock()

    def wait() -> None:
        asked = time.monotonic()
        commit.barrier()
        with lock:
            windows.append((asked, time.monotonic()))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: wait(), range(64)))
    commit.close()
    assert len(windows) == 64
    assert 1 <= len(recorder.calls) < 64  # shared, not one each
    for asked, returned in windows:
        # Some syncfs started after this thread asked and ended before it returned.
        assert any(asked <= start and end <= returned for start, end in recorder.calls)


def test_a_failed_syncfs_fails_its_waiters(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "_syncfs", _Recorder(fail=True))
    commit = GroupCommit(tmp_path)
    with pytest.raises(OSError, match="syncfs failed"):
        commit.barrier()
    commit.close()


def test_spool_operations_under_group_commit(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(spool_module, "_syncfs", recorder)
    root, commit, spool = _group_spool(tmp_path)
    (root / "tmp" / "m").write_bytes(GOOD)
    (root / "tmp" / "m").rename(root / "new" / "m")
    accepted = spool.accept("m", 1000.0)
    assert isinstance(accepted, Accepted)
    claim = spool.claim("m")
    assert claim is not None
    state = spool.read(claim)
    spool.release(claim, replace(state, next_try=5.0))
    claim = spool.claim("m")
    assert claim is not None
    done = spool.read(claim)
    done = replace(done, recipients=tuple(replace(r, status=RecipientStatus.SENT)
                                          for r in done.recipients))
    spool.complete(claim, done)
    assert spool.find("m") is None
    assert not (root / "msg" / "m").exists()
    assert len(recorder.calls) >= 4  # every barrier went through syncfs
    commit.close()


def _group_spool(tmp_path: Path) -> tuple[Path, GroupCommit, Spool]:
    """A spool whose barriers go through a GroupCommit (its syncfs patched by the test)."""
    root = tmp_path / "spool"
    root.mkdir()
    commit = GroupCommit(root)
    spool = Spool(root, owner="gc", durable=commit)
    spool.create_dirs()
    return root, commit, spool


def _run_together(spool: Spool, operations: list[Any]) -> list[object]:
    """Hand all operations to Spool.run_rolling at once; their results in order."""
    batches = [list(zip(operations, range(len(operations)), strict=True))]
    results: dict[int, object] = {}
    spool.run_rolling(lambda idle: batches.pop() if batches else [],
                      lambda finished: results.update(finished))
    return [results[index] for index in range(len(operations))]


def test_run_together_shares_each_round_and_isolates_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(spool_module, "_syncfs", recorder)
    root, commit, spool = _group_spool(tmp_path)
    names = [f"m{i}" for i in range(50)]
    for name in names:
        (root / "tmp" / name).write_bytes(GOOD)
        (root / "tmp" / name).rename(root / "new" / name)
    (root / "new" / "bad").write_bytes(b"not batch smtp\n")
    before = len(recorder.calls)
    results = _run_together(spool, [spool.accept_steps(n, 1000.0) for n in [*names, "bad"]])
    accept_rounds = len(recorder.calls) - before
    assert all(isinstance(r, Accepted) for r in results[:-1])
    assert results[-1].__class__.__name__ == "Quarantined"
    # One syncfs per step (five for an acceptance, two more for the first heartbeat),
    # not one per message.
    assert accept_rounds <= 7
    claims = [spool.claim(n) for n in names]
    assert all(c is not None for c in claims)
    ops = []
    for claim in claims:
        assert claim is not None
        state = spool.read(claim)
        final = replace(state, recipients=tuple(replace(r, status=RecipientStatus.SENT)
                                                for r in state.recipients))
        # The first one is not final: complete() refuses it, the others are unaffected.
        ops.append(spool.complete_steps(claim, state if claim.id == "m0" else final))
    before = len(recorder.calls)
    results = _run_together(spool, ops)
    assert len(recorder.calls) - before <= 4
    assert isinstance(results[0], SpoolError)
    assert all(r is None for r in results[1:])
    assert spool.find("m0") is not None
    assert all(spool.find(n) is None for n in names[1:])
    assert sorted(p.name for p in (root / "msg").iterdir()) == ["m0"]
    commit.close()


def test_run_rolling_lets_late_operations_join_at_the_next_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(spool_module, "_syncfs", recorder)
    root, commit, spool = _group_spool(tmp_path)
    spool.heartbeat()
    rounds: list[str] = []

    def steps(name: str, barriers: int) -> Generator[Any, None, str]:
        for number in range(barriers):
            rounds.append(f"{name}{number}")
            yield spool_module.Sync(directory=root)
        return name

    arrivals = [[(steps("a", 4), "a")], [], [(steps("b", 1), "b")]]
    idle_asks: list[bool] = []

    def take(idle: bool) -> list[tuple[Any, str]]:
        idle_asks.append(idle)
        return arrivals.pop(0) if arrivals else []

    finished: list[tuple[str, object]] = []
    before = len(recorder.calls)
    spool.run_rolling(take, finished.extend)
    # b arrived while a was half-way, went through one barrier and was done long
    # before a's remaining ones; every result came back, and the runner stopped only
    # when nothing waited and nothing came.
    assert finished == [("b", "b"), ("a", "a")]
    assert rounds.index("b0") < rounds.index("a3")
    assert idle_asks[-1] is True and not arrivals
    # Each barrier was one syncfs, shared by whoever stood at it.
    assert len(recorder.calls) - before == 4
    commit.close()


def test_run_rolling_gives_every_operation_its_own_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_syncfs", _Recorder(fail=True))
    root = tmp_path / "spool"
    root.mkdir()
    commit = GroupCommit(root)
    spool = Spool(root, owner="gc", durable=commit)

    def steps() -> Generator[Any, None, None]:
        yield spool_module.Sync(directory=root)

    batches = [[(steps(), 1), (steps(), 2)]]
    finished: list[tuple[int, object]] = []
    spool.run_rolling(lambda idle: batches.pop(0) if batches else [], finished.extend)
    assert sorted(token for token, _ in finished) == [1, 2]
    assert all(isinstance(result, OSError) for _, result in finished)
    commit.close()


def _claimed(root: Path, spool: Spool, name: str = "m") -> Any:
    """Message `name` accepted and claimed; (claim, its state)."""
    (root / "tmp" / name).write_bytes(GOOD)
    (root / "tmp" / name).rename(root / "new" / name)
    assert isinstance(spool.accept(name, 1000.0), Accepted)
    claim = spool.claim(name)
    assert claim is not None
    return claim, spool.read(claim)


def _all_sent(state: Any) -> Any:
    return replace(state, recipients=tuple(replace(r, status=RecipientStatus.SENT)
                                           for r in state.recipients))


def test_run_rolling_tells_of_a_record_at_its_barrier_before_the_tidying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A completed message is recorded once its removal from msg/ is durable; the
    # state's removal after it is tidying. A released one, once its new state is.
    monkeypatch.setattr(spool_module, "_syncfs", _Recorder())
    root, commit, spool = _group_spool(tmp_path)
    done_claim, done_state = _claimed(root, spool, "done")
    later_claim, later_state = _claimed(root, spool, "later")
    batches = [[(spool.complete_steps(done_claim, _all_sent(done_state)), "done"),
                (spool.release_steps(later_claim, replace(later_state, next_try=5.0)),
                 "later")]]
    calls: list[list[tuple[str, object]]] = []
    seen: dict[str, bool] = {}

    def done(finished: list[tuple[str, object]]) -> None:
        calls.append(list(finished))
        for token, result in finished:
            if result is spool_module.RECORDED:
                seen[token] = (root / "msg" / "done").exists()

    spool.run_rolling(lambda idle: batches.pop() if batches else [], done)
    results = {token: result for batch in calls for token, result in batch
               if result is not spool_module.RECORDED}
    assert results == {"done": None, "later": None}
    for token in ("done", "later"):
        told = [i for i, batch in enumerate(calls)
                if (token, spool_module.RECORDED) in batch]
        finished = [i for i, batch in enumerate(calls) if (token, None) in batch]
        assert len(told) == 1 and told[0] < finished[0], calls  # told at an earlier round
    # Told once the message file was gone (and its removal durable: the round's barrier).
    assert seen["done"] is False
    commit.close()


def test_a_record_whose_barrier_failed_is_never_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, commit, spool = _group_spool(tmp_path)
    claim, state = _claimed(root, spool)
    monkeypatch.setattr(spool_module, "_syncfs", _Recorder(fail=True))
    finished: list[tuple[str, object]] = []
    batches = [[(spool.complete_steps(claim, _all_sent(state)), "m")]]
    spool.run_rolling(lambda idle: batches.pop() if batches else [], finished.extend)
    [(token, result)] = finished
    assert token == "m" and isinstance(result, SpoolError)
    commit.close()


async def test_committer_calls_on_recorded_before_the_operations_last_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller's held end of data waits on on_recorded, not on the spool's tidying:
    # the tidying barrier below is held until on_recorded has run (bounded wait).
    root, commit, spool = _group_spool(tmp_path)
    claim, state = _claimed(root, spool)
    real = spool_module._syncfs
    recorded = threading.Event()
    told_first: list[bool] = []
    syncs = 0

    def syncfs(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        if syncs == 2:  # complete's second barrier: the state's removal
            told_first.append(recorded.wait(5))
        real(fd)

    monkeypatch.setattr(spool_module, "_syncfs", syncfs)
    with ThreadPoolExecutor(1) as executor:
        committer = Committer(spool, executor)
        await committer.run(spool.complete_steps(claim, _all_sent(state)),
                            on_recorded=recorded.set)
    assert told_first == [True] and syncs == 2
    assert spool.find("m") is None
    commit.close()


async def test_a_failing_on_recorded_callback_costs_no_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Results go back a round's batch at a time: one bad callback must not leave the
    # operation (or any other in its batch) waiting forever.
    monkeypatch.setattr(spool_module, "_syncfs", _Recorder())
    root, commit, spool = _group_spool(tmp_path)

    def recorded_at_its_end() -> Generator[Any, None, str]:
        # Told and finished in the same round: both in one batch.
        yield spool_module.Sync(directory=root, recorded=True)
        return "done"

    def broken() -> None:
        raise RuntimeError("a bug")

    with ThreadPoolExecutor(1) as executor:
        committer = Committer(spool, executor)
        result = await asyncio.wait_for(
            committer.run(recorded_at_its_end(), on_recorded=broken), 10)
    assert result == "done"
    commit.close()
