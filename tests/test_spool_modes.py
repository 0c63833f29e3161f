"""Modes and group of what the spool makes (contract §10 Files, docs/spool.md).

Folders 0750 and files 0640, whatever the process's umask lets through; with
`spool.group` the folders belong to that group and are setgid, so every file made in
them belongs to it too, and tmp/ and new/ let the group's writers hand mail over.
Checked on the Spool directly and on a real daemon started with umask 000.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mxsend.config import config_from_mapping
from mxsend.envelope import Envelope, Message, Recipient
from mxsend.errors import ConfigError
from mxsend.spool import Accepted, RecipientStatus, Spool
from mxsend.spool_layout import DIRS, create_writer_dirs
from tests.fixtures.daemon import DaemonProcess, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer

GOOD = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\nSubject: hi\r\n\r\nx\r\n.\r\n"
NOW = 1_800_000_000.0
OTHER_GROUP = 65534  # nogroup: not the test's own group


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: what is checked below is then mxsend's own choice, not the umask's."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def drop(root: Path, name: str, raw: bytes = GOOD) -> None:
    (root / "tmp" / name).write_bytes(raw)
    os.rename(root / "tmp" / name, root / "new" / name)


def daemon_files(spool: Spool, accepted_id: str) -> list[Path]:
    return [
        spool.root / "queue" / accepted_id,  # a state file
        spool.root / "owners" / spool.owner,  # the heartbeat
        spool.root / "bad" / "junk.reason",
    ]


def _exercise(spool: Spool) -> str:
    spool.create_dirs()
    drop(spool.root, "m1")
    accepted = spool.accept("m1", NOW)
    assert isinstance(accepted, Accepted)
    drop(spool.root, "junk", b"not batch smtp\n")
    spool.accept("junk", NOW)
    return accepted.id


def test_folders_0750_and_files_0640_under_any_umask(tmp_path: Path, open_umask: None) -> None:
    spool = Spool(tmp_path / "spool", owner="one")
    queue_id = _exercise(spool)
    claim = spool.claim(queue_id)
    assert claim is not None
    folders = [spool.root, *(spool.root / name for name in DIRS),
               spool.root / "active" / "one", spool.root / "incoming" / "one"]
    assert {str(f): mode(f) for f in folders} == {str(f): 0o750 for f in folders}
    spool.release(claim, replace(spool.read(claim), attempts=1))
    # A DSN is written through the spool like this: tmp/, then new/.
    report = spool.enqueue(Message(Envelope("", (Recipient("a@src.test"),)), b"x\r\n"))
    files = [*daemon_files(spool, queue_id), spool.root / "new" / report]
    assert {str(f): mode(f) for f in files} == {str(f): 0o640 for f in files}
    assert all(os.lstat(f).st_gid == os.getegid() for f in [*folders, *files])


def test_existing_world_readable_folders_are_tightened(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    for name in DIRS:
        (root / name).mkdir(parents=True)
        os.chmod(root / name, 0o777)
    os.chmod(root, 0o755)
    Spool(root, owner="one").create_dirs()
    assert {name: mode(root / name) for name in DIRS} == dict.fromkeys(DIRS, 0o750)
    assert mode(root) == 0o750


def test_spool_group_owns_folders_and_files_through_setgid(tmp_path: Path,
                                                           open_umask: None) -> None:
    if os.geteuid() != 0 and OTHER_GROUP not in os.getgroups():
        pytest.skip("needs root or membership of group 65534 to chgrp")
    spool = Spool(tmp_path / "spool", owner="one", group=OTHER_GROUP, keep_sent=True)
    queue_id = _exercise(spool)
    writers = {spool.root / name for name in ("tmp", "new")}
    folders = [spool.root, *(spool.root / name for name in DIRS)]
    for folder in folders:
        expected = 0o770 if folder in writers else 0o750
        assert mode(folder) == stat.S_ISGID | expected, folder
        assert os.lstat(folder).st_gid == OTHER_GROUP, folder
    claim = spool.claim(queue_id)
    assert claim is not None
    active = spool.root / "active" / "one"
    assert mode(active) == stat.S_ISGID | 0o750 and os.lstat(active).st_gid == OTHER_GROUP
    state = spool.read(claim)
    done = replace(state, recipients=tuple(
        replace(r, status=RecipientStatus.SENT) for r in state.recipients))
    spool.complete(claim, done)
    report = spool.enqueue(Message(Envelope("", (Recipient("a@src.test"),)), b"x\r\n"))
    made = [spool.root / "owners" / "one", spool.root / "bad" / "junk.reason",
            spool.root / "new" / report]
    assert {str(f): mode(f) for f in made} == {str(f): 0o640 for f in made}
    # Whoever made them, they belong to the spool's group: the writer's file too.
    assert all(os.lstat(f).st_gid == OTHER_GROUP
               for f in [*made, spool.root / "sent" / "m1", spool.root / "bad" / "junk"])


def test_a_writer_of_another_user_makes_files_the_daemon_can_link(
        tmp_path: Path, open_umask: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give new/ to another user")
    spool = Spool(tmp_path / "spool", owner="writer")
    spool.create_dirs()
    message = Message(Envelope("", (Recipient("a@src.test"),)), b"x\r\n")
    assert mode(spool.root / "new" / spool.enqueue(message)) == 0o640
    os.chown(spool.root / "new", OTHER_GROUP, -1)  # new/ is now the daemon's, not ours
    assert mode(spool.root / "new" / spool.enqueue(message)) == 0o660


def test_a_writer_before_the_daemon_makes_only_its_folders(tmp_path: Path,
                                                         open_umask: None) -> None:
    root = tmp_path / "spool"
    create_writer_dirs(root)
    assert sorted(os.listdir(root)) == ["new", "tmp"]
    assert mode(root / "tmp") == mode(root / "new") == 0o750
    os.chmod(root / "new", 0o2770)  # as the daemon set it for spool.group
    create_writer_dirs(root)
    assert mode(root / "new") == 0o2770


def test_spool_group_in_the_config() -> None:
    assert config_from_mapping({}).spool.group is None
    assert config_from_mapping({"spool": {"group": ""}}).spool.group is None
    assert config_from_mapping({"spool": {"group": "nogroup"}}).spool.group == 65534
    assert config_from_mapping({"spool": {"group": 4242}}).spool.group == 4242
    assert config_from_mapping({"spool": {"group": "4242"}}).spool.group == 4242
    with pytest.raises(ConfigError, match=r"^spool\.group: no such group 'no-such-grp'"):
        config_from_mapping({"spool": {"group": "no-such-grp"}})
    with pytest.raises(ConfigError, match=r"^spool\.group"):
        config_from_mapping({"spool": {"group": True}})


def test_the_daemon_makes_folders_0750_and_files_0640(
    tmp_path: Path, dns_server: DnsTestServer, open_umask: None,
    daemon: Callable[..., DaemonProcess],
) -> None:
    dns_server.add_null_mx("nullmx.test")
    # The report to the sender goes to a host where nothing listens: it stays queued.
    dns_server.add_mx("src.test", 10, "mx.src.test")
    dns_server.add_a("mx.src.test", "127.0.0.9")
    root = tmp_path / "spool"
    for name in ("tmp", "new"):
        (root / name).mkdir(parents=True)
    drop(root, "m1", GOOD.replace(b"b@dst.test", b"b@nullmx.test"))
    drop(root, "junk", b"not batch smtp\n")
    config = write_config(tmp_path, {
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"helo_name": "mxsend.test"}, "queue": {"retry": ["1h"]},
    })
    process = daemon(config)  # started under umask 000 (the fixture above)
    os.umask(0o022)
    bounce = process.wait_event("bounce", id="m1")[0]["bounce_id"]
    process.wait_event("quarantined", id="junk")
    process.wait_event("delivery", id=bounce, status="deferred")
    wait_until(lambda: (root / "queue" / bounce).exists(), message="the report queued")
    owners = list((root / "owners").iterdir())
    files = [root / "msg" / bounce, root / "queue" / bounce, root / "bad" / "junk.reason",
             *owners]
    assert owners and {str(f): mode(f) for f in files} == {str(f): 0o640 for f in files}
    folders = [root, *(root / name for name in DIRS), *(root / "active").iterdir()]
    assert {str(f): mode(f) for f in folders} == {str(f): 0o750 for f in folders}
    assert process.stop() == 0
