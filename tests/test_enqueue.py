"""`mxsend enqueue` as a real subprocess against a temp config and spool."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mxsend.envelope import Message, parse_bsmtp
from mxsend.spool import Accepted, Spool

MXSEND = Path(sys.executable).with_name("mxsend")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mxsend.toml"
    path.write_text('[spool]\npath = "spool"\nmax_message_size = "64KB"\n')
    return path


def enqueue(config: Path, *args: str, stdin: bytes = b"Subject: hi\n\nbody\n"
            ) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MXSEND_CONFIG"}
    return subprocess.run([str(MXSEND), "enqueue", "-c", str(config), *args], input=stdin,
                          capture_output=True, timeout=30, check=False, env=env)


def queued(config: Path) -> list[Message]:
    spool = config.parent / "spool"
    assert os.listdir(spool / "tmp") == []
    return [parse_bsmtp((spool / "new" / n).read_bytes())
            for n in sorted(os.listdir(spool / "new"))]


def only(config: Path) -> Message:
    messages = queued(config)
    assert len(messages) == 1
    return messages[0]


def nothing_left(config: Path) -> bool:
    spool = config.parent / "spool"
    return all(not (spool / d).exists() or os.listdir(spool / d) == [] for d in ("tmp", "new"))


def test_sender_and_recipient(config: Path) -> None:
    result = enqueue(config, "-f", "a@src.test", "c@d.test")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    message = only(config)
    assert message.envelope.sender == "a@src.test"
    assert [r.address for r in message.envelope.recipients] == ["c@d.test"]
    assert message.data == b"Subject: hi\r\n\r\nbody\r\n"


def test_the_file_is_accepted_by_the_spool(config: Path) -> None:
    assert enqueue(config, "-f", "a@src.test", "c@d.test").returncode == 0
    spool = Spool(config.parent / "spool", owner="t")
    spool.create_dirs()
    (name,) = spool.incoming()
    assert isinstance(spool.accept(name, 0.0), Accepted)


def test_default_sender_is_the_user_at_the_fqdn(config: Path) -> None:
    assert enqueue(config, "c@d.test").returncode == 0
    assert only(config).envelope.sender == f"{getpass.getuser()}@{socket.getfqdn()}"


@pytest.mark.parametrize("null", ["<>", ""])
def test_null_sender(config: Path, null: str) -> None:
    assert enqueue(config, "-f", null, "c@d.test").returncode == 0
    assert only(config).envelope.sender == ""


def test_a_single_dot_line_ends_the_input(config: Path) -> None:
    stdin = b"Subject: x\n\n..two dots stay\nline\n.\nnot part of it\n"
    assert enqueue(config, "-f", "a@b.test", "c@d.test", stdin=stdin).returncode == 0
    assert only(config).data == b"Subject: x\r\n\r\n..two dots stay\r\nline\r\n"


@pytest.mark.parametrize("flag", [["-i"], ["-oi"], ["-o", "i"]])
def test_dash_i_reads_to_the_end(config: Path, flag: list[str]) -> None:
    stdin = b"Subject: x\n\nline\n.\nstill part of it\n"
    assert enqueue(config, *flag, "-f", "a@b.test", "c@d.test", stdin=stdin).returncode == 0
    assert only(config).data == b"Subject: x\r\n\r\nline\r\n.\r\nstill part of it\r\n"


def test_dash_t_takes_to_cc_bcc_and_removes_bcc(config: Path) -> None:
    header = (b"From: Alice <a@src.test>\r\n"
              b"To: Bob <bob@dst.test>,\r\n\tcarol@dst.test\r\n"
              b"X-Odd:   spacing  kept \r\n"
              b"cc: \"Dan, D.\" <dan@dst.test>\r\n"
              b"BCC: secret@dst.test,\r\n more@dst.test\r\n"
              b"Subject: hi\r\n")
    stdin = header + b"\r\nBcc: in the body stays\r\n"
    result = enqueue(config, "-t", "-f", "a@src.test", "extra@dst.test", stdin=stdin)
    assert result.returncode == 0, result.stderr
    message = only(config)
    assert [r.address for r in message.envelope.recipients] == [
        "extra@dst.test", "bob@dst.test", "carol@dst.test", "dan@dst.test",
        "secret@dst.test", "more@dst.test"]
    assert message.data == (b"From: Alice <a@src.test>\r\n"
                            b"To: Bob <bob@dst.test>,\r\n\tcarol@dst.test\r\n"
                            b"X-Odd:   spacing  kept \r\n"
                            b"cc: \"Dan, D.\" <dan@dst.test>\r\n"
                            b"Subject: hi\r\n\r\nBcc: in the body stays\r\n")


def test_dash_t_without_any_recipient(config: Path) -> None:
    result = enqueue(config, "-t", "-f", "a@b.test", stdin=b"Subject: none\n\nx\n")
    assert result.returncode == 65
    assert b"no recipients" in result.stderr
    assert nothing_left(config)


def test_dsn_flags(config: Path) -> None:
    result = enqueue(config, "-f", "a@b.test", "-N", "success,delay", "-R", "hdrs",
                     "-V", "env id+1", "c@d.test", "e@d.test")
    assert result.returncode == 0, result.stderr
    envelope = only(config).envelope
    assert envelope.ret == "HDRS"
    assert envelope.envid == "env+20id+2B1"
    assert [r.notify for r in envelope.recipients] == [("SUCCESS", "DELAY")] * 2
    raw = (config.parent / "spool" / "new").iterdir().__next__().read_bytes()
    assert raw.startswith(b"MAIL FROM:<a@b.test> RET=HDRS ENVID=env+20id+2B1\r\n")


def test_notify_never(config: Path) -> None:
    assert enqueue(config, "-f", "a@b.test", "-N", "never", "c@d.test").returncode == 0
    assert only(config).envelope.recipients[0].notify == ("NEVER",)


def test_eight_bit_data_is_declared(config: Path) -> None:
    stdin = "Subject: é\n\nünïcode\n".encode()
    assert enqueue(config, "-f", "a@b.test", "c@d.test", stdin=stdin).returncode == 0
    assert only(config).envelope.body == "8BITMIME"


@pytest.mark.parametrize(
    ("args", "stdin", "code", "says"),
    [
        (["-f", "a@b.test", "bad@"], b"x\n", 65, b"bad@"),
        (["-f", "a@b.test", "no-domain"], b"x\n", 65, b"no-domain"),
        (["-f", "a@b.test", "a b@c.test"], b"x\n", 65, b"a b@c.test"),
        (["-f", "bad sender@x", "c@d.test"], b"x\n", 65, b"sender"),
        (["-f", "a@b.test", "c@d.test"], b"", 65, b"empty message"),
        (["-f", "a@b.test", "c@d.test"], b".\nafter\n", 65, b"empty message"),
        (["-f", "a@b.test"], b"x\n", 65, b"no recipients"),
        (["-f", "a@b.test", "c@d.test"], b"x" * 70_000, 65, b"max_message_size"),
        (["-N", "sometimes", "c@d.test"], b"x\n", 64, b"-N"),
        (["-N", "never,success", "c@d.test"], b"x\n", 64, b"-N"),
        (["-R", "most", "c@d.test"], b"x\n", 64, b"-R"),
        (["-V", "a" * 101, "c@d.test"], b"x\n", 64, b"-V"),
        (["--bogus", "c@d.test"], b"x\n", 64, b"--bogus"),
    ],
)
def test_refusals(config: Path, args: list[str], stdin: bytes, code: int, says: bytes) -> None:
    result = enqueue(config, *args, stdin=stdin)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
    assert nothing_left(config)


def test_unusable_spool_is_cantcreat(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    config = tmp_path / "c.toml"
    config.write_text('[spool]\npath = "file/spool"\n')
    result = enqueue(config, "-f", "a@b.test", "c@d.test")
    assert result.returncode == 73
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr


def test_several_recipients_in_one_argument_and_duplicates(config: Path) -> None:
    assert enqueue(config, "-f", "a@b.test", "c@d.test, <e@d.test>", "c@d.test").returncode == 0
    assert [r.address for r in only(config).envelope.recipients] == ["c@d.test", "e@d.test"]


def test_double_dash_ends_the_options(config: Path) -> None:
    assert enqueue(config, "-f", "a@b.test", "--", "c@d.test").returncode == 0
    assert [r.address for r in only(config).envelope.recipients] == ["c@d.test"]
