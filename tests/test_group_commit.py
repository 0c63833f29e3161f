"""GroupCommit: one syncfs serves every thread waiting for durability at that moment."""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

import mxsend.spool as spool_module
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
    root = tmp_path / "spool"
    root.mkdir()
    commit = GroupCommit(root)
    spool = Spool(root, owner="gc", durable=commit)
    spool.create_dirs()
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
