"""log.py's buffered writer, the process field, and the pure parts of the new log fields."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator

import pytest

from mxsend import log
from mxsend.config import config_from_mapping
from mxsend.delivery_event import format_delays, message_id_of
from mxsend.errors import ConfigError
from mxsend.transcript import is_debug_peer
from mxsend.wire import _reply_text, _tell_written


@pytest.fixture
def packets() -> Iterator[tuple[socket.socket, log.BufferedWriter]]:
    """A SOCK_SEQPACKET pair: each write(2) arrives as one packet, so writes can be
    counted on the receiving end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handler = log.BufferedWriter(ours.fileno())
    handler.setFormatter(log.JsonFormatter())
    logger = log.get_logger()
    saved = logger.handlers[:], logger.level
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    try:
        yield theirs, handler
    finally:
        logger.handlers[:], level = saved
        logger.setLevel(level)
        ours.close()
        theirs.close()


def _received(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(1 << 20))
        except BlockingIOError:
            return out


def test_one_write_per_event_loop_turn(packets: tuple[socket.socket, log.BufferedWriter]
                                       ) -> None:
    theirs, _ = packets

    async def main() -> None:
        for n in range(50):
            log.event("queued", f"q{n}", sender="a@b.test", recipients=["c@d.test"], size=1)
        assert _received(theirs) == []  # nothing written within the turn
        await asyncio.sleep(0)
        [batch] = _received(theirs)
        lines = batch.decode().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [f"q{n}" for n in range(50)]
        log.event("skipped", "q1", reason="later")
        await asyncio.sleep(0)
        [again] = _received(theirs)
        assert json.loads(again)["event"] == "skipped"

    asyncio.run(main())


def test_a_full_batch_is_written_at_once(packets: tuple[socket.socket, log.BufferedWriter]
                                         ) -> None:
    theirs, handler = packets

    async def main() -> None:
        for n in range(handler.MAX_LINES + 1):
            log.event("skipped", f"q{n}", reason="r")
        assert len(_received(theirs)[0].splitlines()) == handler.MAX_LINES
        await asyncio.sleep(0)
        assert len(_received(theirs)) == 1

    asyncio.run(main())


def test_without_a_loop_each_line_is_written_and_flush_empties(
        packets: tuple[socket.socket, log.BufferedWriter]) -> None:
    theirs, handler = packets
    log.event("skipped", "a", reason="r")
    log.event("skipped", "b", reason="r")
    assert len(_received(theirs)) == 2

    async def main() -> None:
        log.event("skipped", "c", reason="r")

    asyncio.run(main())  # the loop may close before its turn ends: flush() at exit
    handler.flush()
    received = b"".join(_received(theirs))
    assert b'"id": "c"' in received


def test_process_field_in_both_formats() -> None:
    record = logging.LogRecord("mxsend", logging.INFO, __file__, 0, "delivery", (), None)
    record.event = "delivery"
    record.fields = {"id": "Q1", "status": "sent"}
    saved = log._process
    try:
        log._process = "2/3"
        assert json.loads(log.JsonFormatter().format(record))["process"] == "2/3"
        assert " info process=2/3 delivery id=Q1 status=sent" in log.TextFormatter().format(
            record)
        log._process = None
        assert "process" not in json.loads(log.JsonFormatter().format(record))
    finally:
        log._process = saved


@pytest.mark.parametrize(("lines", "expected"), [
    (["From: a@b", "Message-ID: <x@y>", "Subject: s"], "<x@y>"),
    (["message-id:   <x@y>  "], "<x@y>"),
    (["Message-ID:", " <folded@y>", "To: z"], "<folded@y>"),
    (["Message-Id: <first@y>", "Message-ID: <second@y>"], "<first@y>"),
    (["Subject: Message-ID: <no@y>"], None),
    (["X-Message-ID: <no@y>"], None),
    (["Message-ID: " + "x" * 1000], "x" * 256),
    ([], None),
])
def test_message_id_of(lines: list[str], expected: str | None) -> None:
    assert message_id_of(lines) == expected


def test_format_delays() -> None:
    assert format_delays(12.345, 0.004, 1.2) == "12.35/0.00/1.20"
    assert format_delays(-1.0, 0.0, 0.0) == "0.00/0.00/0.00"  # a clock step back


@pytest.mark.parametrize(("peer", "name", "ip", "expected"), [
    ("mx1.example.org", "MX1.Example.ORG.", "192.0.2.1", True),
    ("mx1.example.org", "mx2.example.org", "192.0.2.1", False),
    (".example.org", "mx1.example.org", "192.0.2.1", True),
    (".example.org", "example.org", "192.0.2.1", False),
    (".example.org", "badexample.org", "192.0.2.1", False),
    ("192.0.2.1/32", "mx.other.test", "192.0.2.1", True),
    ("192.0.2.0/24", "mx.other.test", "192.0.2.77", True),
    ("2001:db8::/32", "mx.other.test", "2001:db8::25", True),
    ("2001:db8::/32", "mx.other.test", "192.0.2.1", False),
])
def test_is_debug_peer(peer: str, name: str, ip: str, expected: bool) -> None:
    assert is_debug_peer(name, ip, (peer,)) is expected


def test_debug_peers_config_is_normalised_and_validated() -> None:
    config = config_from_mapping({"log": {"debug_peers": [
        "MX1.Example.org.", ".Example.NET", "192.0.2.1", "2001:db8::/32"]}})
    assert config.log.debug_peers == ("mx1.example.org", ".example.net", "192.0.2.1/32",
                                      "2001:db8::/32")
    assert config_from_mapping({}).log.debug_peers == ()
    for bad in ("mx1.example.org", ["bad host"], [""], [3], ["a..b"]):
        with pytest.raises(ConfigError, match=r"^log\.debug_peers: "):
            config_from_mapping({"log": {"debug_peers": bad}})


def test_transcript_lines_never_show_data_and_redact_auth() -> None:
    said: list[tuple[str, str]] = []

    def tell(direction: str, line: str) -> None:
        said.append((direction, line))

    _tell_written(tell, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n", body=False)
    _tell_written(tell, b"AUTH PLAIN c2VjcmV0\r\n", body=False)
    _tell_written(tell, b"Subject: secret\r\n\r\nbody\r\n", body=True)
    _tell_written(tell, b"more body\r\n.\r\n", body=True)
    _tell_written(tell, b".\r\n", body=True)
    assert said == [(">", "MAIL FROM:<a@b>"), (">", "RCPT TO:<c@d>"), (">", "DATA"),
                    (">", "AUTH PLAIN [redacted]"), (">", "[message data: 25 bytes]"),
                    (">", "[message data: 11 bytes]"), (">", "."), (">", ".")]
    assert _reply_text(250, "mx.test\nPIPELINING\nSIZE 10") == \
        "250-mx.test\n250-PIPELINING\n250 SIZE 10"


def test_a_full_non_blocking_stderr_is_waited_for(
        packets: tuple[socket.socket, log.BufferedWriter]) -> None:
    # One batch of ~200 KB into a non-blocking pipe of 4 KB: its write meets EAGAIN
    # and waits for room instead of dropping the lines.
    import fcntl
    import os
    import threading

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # one page: full at every write
    os.set_blocking(write_end, False)
    handler = log.BufferedWriter(write_end)
    handler.setFormatter(log.JsonFormatter())
    log.get_logger().handlers[:] = [handler]
    received = bytearray()

    def drain() -> None:
        # Not a byte read until the pipe is full: the writer has met EAGAIN by then.
        import struct
        import termios
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            waiting = fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0")
            if struct.unpack("i", waiting)[0] >= 4096:
                break
            time.sleep(0.001)
        while chunk := os.read(read_end, 4096):
            received.extend(chunk)

    async def main() -> None:
        for n in range(200):
            log.event("script_log", f"q{n}", message="x" * 1000)
        await asyncio.sleep(0)  # the end of the turn: one write of the whole batch

    reader = threading.Thread(target=drain)
    reader.start()
    asyncio.run(main())
    os.close(write_end)
    reader.join(timeout=10)
    os.close(read_end)
    assert received.count(b"\n") == 200
