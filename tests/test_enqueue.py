"""`mxsend enqueue` as a real subprocess against a temp config and spool."""

from __future__ import annotations

import getpass
import os
import pwd
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mxsend import addresses
from mxsend.envelope import Message, parse_bsmtp
from mxsend.spool import Accepted, Spool, id_problem
from tests.fixtures.daemon import DaemonProcess, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.smtp_receiver import ReceiverGroup

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
        (["-f", "a@b.test", "no-local@"], b"x\n", 65, b"no-local@"),
        (["-f", "a@b.test", "two@@c.test"], b"x\n", 65, b"two@@c.test"),
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
        (["-bs", "c@d.test"], b"x\n", 64, b"-bs"),
        (["-bp"], b"x\n", 64, b"-bp"),
        (["-ez", "c@d.test"], b"x\n", 64, b"-ez"),
        (["-B", "BINARYMIME", "c@d.test"], b"x\n", 64, b"-B"),
        (["-X", "log", "c@d.test"], b"x\n", 64, b"-X"),
        (["--require-tls=yes", "c@d.test"], b"x\n", 64, b"--require-tls"),
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


# --- sendmail drop-in (contract §10) ----------------------------------------------------


def spool_files(config: Path) -> list[Path]:
    return sorted((config.parent / "spool" / "new").iterdir())


@pytest.fixture
def sendmail(tmp_path: Path) -> Path:
    """A real `sendmail` symlink to the mxsend console script, as an operator makes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    link = bin_dir / "sendmail"
    link.symlink_to(MXSEND)
    return link


def run_sendmail(link: Path, config: Path, *args: str, stdin: bytes
                 ) -> subprocess.CompletedProcess[bytes]:
    """Invoked by name with the config from $MXSEND_CONFIG, as cron or PHP would."""
    env = dict(os.environ, MXSEND_CONFIG=str(config))
    return subprocess.run([str(link), *args], input=stdin, capture_output=True, timeout=30,
                          check=False, env=env)


@pytest.fixture
def helo_config(tmp_path: Path) -> Path:
    path = tmp_path / "mxsend.toml"
    path.write_text('[spool]\npath = "spool"\n\n[smtp]\nhelo_name = "mx.origin.test"\n')
    return path


# Debian's cron (cron 3.0pl1, do_command.c) writes this and calls
# `/usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem root`.
CRON_MESSAGE = (b"From: root (Cron Daemon)\n"
                b"To: root\n"
                b"Subject: Cron <root@host> run-parts /etc/cron.hourly\n"
                b"MIME-Version: 1.0\n"
                b"Content-Type: text/plain; charset=UTF-8\n"
                b"Content-Transfer-Encoding: 8bit\n"
                b"X-Cron-Env: <SHELL=/bin/sh>\n"
                b"\n"
                b"r\xc3\xa9sultat\n.\nnot the end with -i\n")


def test_cron_through_the_sendmail_symlink(sendmail: Path, helo_config: Path) -> None:
    result = run_sendmail(sendmail, helo_config, "-FCronDaemon", "-i", "-B8BITMIME", "-oem",
                          "root", stdin=CRON_MESSAGE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == b""
    (path,) = spool_files(helo_config)
    message = parse_bsmtp(path.read_bytes())
    login = pwd.getpwuid(os.getuid()).pw_name
    # No -f: <login>@<smtp.helo_name>; the bare `root` is qualified the same way.
    assert message.envelope.sender == f"{login}@mx.origin.test"
    assert [r.address for r in message.envelope.recipients] == ["root@mx.origin.test"]
    assert message.envelope.body == "8BITMIME"
    assert message.data == CRON_MESSAGE.replace(b"\n", b"\r\n")  # -i: the "." line stays
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_cronie_with_dash_t(sendmail: Path, helo_config: Path) -> None:
    # cronie (Fedora, Arch) calls `sendmail -FCronDaemon -i -odi -oem -oi -t`.
    stdin = b"From: \"(Cron Daemon)\" <root>\nTo: ops@example.test\nSubject: x\n\nout\n"
    result = run_sendmail(sendmail, helo_config, "-FCronDaemon", "-i", "-odi", "-oem", "-oi",
                          "-t", stdin=stdin)
    assert result.returncode == 0, result.stderr
    (path,) = spool_files(helo_config)
    assert [r.address for r in parse_bsmtp(path.read_bytes()).envelope.recipients] == [
        "ops@example.test"]


def test_php_mail(sendmail: Path, helo_config: Path) -> None:
    # PHP's mail() runs sendmail_path, "sendmail -t -i" by default, and writes To and
    # Subject, then the additional headers, then the body; -f comes from
    # mail()'s additional_params (`-fwww@app.test`).
    stdin = (b"To: user@example.org, Other <other@example.net>\n"
             b"Subject: Your order\n"
             b"From: shop@app.test\n"
             b"X-PHP-Originating-Script: 33:order.php\n"
             b"\n"
             b"Thank you.\n.\nSee you.\n")
    result = run_sendmail(sendmail, helo_config, "-t", "-i", "-fwww@app.test", stdin=stdin)
    assert result.returncode == 0, result.stderr
    (path,) = spool_files(helo_config)
    message = parse_bsmtp(path.read_bytes())
    assert message.envelope.sender == "www@app.test"
    assert [r.address for r in message.envelope.recipients] == [
        "user@example.org", "other@example.net"]
    assert message.data.endswith(b"\r\nThank you.\r\n.\r\nSee you.\r\n")
    assert message.envelope.body is None  # 7-bit data, no -B


@pytest.mark.parametrize(
    "args",
    [
        # What Postfix's pipe(8) or a content filter passes to a sendmail it feeds.
        ["-i", "-odi", "-f", "from@src.test", "-N", "success,failure", "-R", "hdrs",
         "-V", "ENV1", "--", "to@dst.test"],
        # mutt: `sendmail -oem -oi -- addresses`; git send-email: `sendmail -i addresses`.
        ["-oem", "-oi", "-r", "from@src.test", "-N", "success,failure", "-R", "hdrs", "-V",
         "ENV1", "--", "to@dst.test"],
        # Everything the contract lists as accepted and ignored, at once.
        ["-bm", "-em", "-oee", "-oep", "-oeq", "-oew", "-odb", "-odq", "-v", "-U",
         "-F", "Full Name", "-B", "7BIT", "-ffrom@src.test", "-N", "success,failure",
         "-R", "hdrs", "-V", "ENV1", "to@dst.test"],
    ],
)
def test_sendmail_style_callers(sendmail: Path, helo_config: Path, args: list[str]) -> None:
    result = run_sendmail(sendmail, helo_config, *args, stdin=b"Subject: s\n\n.\nbody\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == b""
    (path,) = spool_files(helo_config)
    raw = path.read_bytes()
    assert raw.startswith(b"MAIL FROM:<from@src.test> RET=HDRS ENVID=ENV1\r\n"
                          b"RCPT TO:<to@dst.test> NOTIFY=SUCCESS,FAILURE\r\nDATA\r\n")
    if "-i" in args or "-oi" in args:  # the lone "." is data, dot-stuffed in the file
        assert parse_bsmtp(raw).data == b"Subject: s\r\n\r\n.\r\nbody\r\n"
    else:  # as sendmail: a lone "." ends the message
        assert parse_bsmtp(raw).data == b"Subject: s\r\n\r\n"


def test_sendmail_usage_error_is_ex_usage(sendmail: Path, helo_config: Path) -> None:
    result = run_sendmail(sendmail, helo_config, "-bs", stdin=b"")
    assert result.returncode == 64
    assert result.stderr.count(b"\n") == 1 and b"-bs" in result.stderr


def test_default_sender_without_helo_name_is_the_fqdn(sendmail: Path, config: Path) -> None:
    result = run_sendmail(sendmail, config, "c@d.test", stdin=b"Subject: x\n\nx\n")
    assert result.returncode == 0, result.stderr
    login = pwd.getpwuid(os.getuid()).pw_name
    assert only(config).envelope.sender == f"{login}@{socket.getfqdn()}"


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_files_are_0640_and_folders_0750_whatever_the_umask(tmp_path: Path, umask: int
                                                            ) -> None:
    config = tmp_path / "mxsend.toml"
    config.write_text('[spool]\npath = "spool"\n')
    env = {k: v for k, v in os.environ.items() if k != "MXSEND_CONFIG"}
    result = subprocess.run([str(MXSEND), "enqueue", "-c", str(config), "-f", "a@b.test",
                             "c@d.test"], input=b"x\n", capture_output=True, timeout=30,
                            env=env, umask=umask, check=False)
    assert result.returncode == 0, result.stderr
    spool = tmp_path / "spool"
    for folder in (spool, spool / "tmp", spool / "new"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder
    (path,) = (spool / "new").iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give new/ to another user")
def test_a_writer_of_another_user_writes_0660(config: Path) -> None:
    # fs.protected_hardlinks: the daemon (new/'s owner) may link our file into its queue
    # only if it may read and write it.
    spool = config.parent / "spool"
    (spool / "tmp").mkdir(parents=True)
    (spool / "new").mkdir()
    os.chown(spool / "new", 65534, -1)
    assert enqueue(config, "-f", "a@b.test", "c@d.test").returncode == 0
    (path,) = spool_files(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_require_tls(config: Path) -> None:
    # RFC 8689: REQUIRETLS as a MAIL parameter in the spool file (contract §8).
    result = enqueue(config, "--require-tls", "-f", "a@b.test", "c@d.test")
    assert result.returncode == 0, result.stderr
    raw = spool_files(config)[0].read_bytes()
    assert raw.startswith(b"MAIL FROM:<a@b.test> REQUIRETLS\r\n")
    assert only(config).envelope.requiretls


def test_without_require_tls_the_parameter_is_absent(config: Path) -> None:
    assert enqueue(config, "-f", "a@b.test", "c@d.test").returncode == 0
    assert not only(config).envelope.requiretls


def test_explicit_sender_and_recipient_logins_are_qualified(helo_config: Path) -> None:
    assert enqueue(helo_config, "-f", "daemon", "root", "x@y.test").returncode == 0
    envelope = only(helo_config).envelope
    assert envelope.sender == "daemon@mx.origin.test"
    assert [r.address for r in envelope.recipients] == ["root@mx.origin.test", "x@y.test"]


def test_ids_sort_by_time_and_are_spool_ids(config: Path) -> None:
    for _ in range(3):
        assert enqueue(config, "-f", "a@b.test", "c@d.test").returncode == 0
    names = [p.name for p in spool_files(config)]
    assert len(names) == 3 and all(len(n) == 21 and id_problem(n) is None for n in names)
    by_time = sorted(spool_files(config), key=lambda p: p.stat().st_mtime_ns)
    assert [p.name for p in by_time] == sorted(names)


# --- fast start -------------------------------------------------------------------------

HEAVY = ("lupa", "aiosmtplib", "dns", "cryptography", "uvloop", "watchdog", "asyncio", "ssl",
         "aiosmtpd", "prometheus_client", "redis",
         "mxsend.spool", "mxsend.scheduler", "mxsend.policy", "mxsend.smtp",
         "mxsend.delivery", "mxsend.supervisor", "mxsend.listener", "mxsend.metrics")


def test_enqueue_imports_nothing_of_the_daemon(config: Path) -> None:
    # The same entry point as the console script; sys.modules after a real enqueue.
    code = ("import sys\n"
            "from mxsend.cli import main\n"
            "code = main(['enqueue', '-c', sys.argv[1], '-t', '-f', 'a@b.test'])\n"
            "print('\\n'.join(sorted(sys.modules)))\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code, str(config)],
                            input=b"To: c@d.test\n\nx\n", capture_output=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.decode().split())
    assert "mxsend.commands.enqueue" in loaded  # the probe did run the command
    heavy = sorted(m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY)
    assert heavy == []
    assert len(only(config).envelope.recipients) == 1


@pytest.mark.parametrize(
    ("name", "old"),
    [
        ("_ATEXT", r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"),
        ("_QTEXT", r"[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]"),
        ("_LET_DIG", r"[A-Za-z0-9\u0080-\U0010ffff]"),
        ("_LDH", r"[A-Za-z0-9\-\u0080-\U0010ffff]"),
    ],
)
def test_envelope_character_classes_are_the_rfc_sets(name: str, old: str) -> None:
    # addresses.py writes these as complements so they compile in 0.2 ms, not 5 ms (a
    # cost every enqueue paid at start): the same set, checked at every code point.
    new = re.compile(getattr(addresses, name))
    reference = re.compile(old)
    differ = [c for c in range(0x110000)
              if bool(new.fullmatch(chr(c))) != bool(reference.fullmatch(chr(c)))]
    assert differ == []


# --- docs/integration.md, "An application": the recipe end to end ------------------------


@pytest.mark.slow
def test_application_recipe_end_to_end(tmp_path: Path, sendmail: Path,
                                       dns_server: DnsTestServer,
                                       smtp_receivers: ReceiverGroup,
                                       daemon: Callable[..., DaemonProcess]) -> None:
    # An application (PHP's mail(), here its exact call) hands a message to the
    # `sendmail` symlink; the daemon delivers it to the recipient's MX, a real SMTP
    # server found through a real DNS server, as docs/integration.md describes.
    dns_server.add_mx("example.test", 10, "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.2")
    mx = smtp_receivers.start("127.0.0.2")
    config = write_config(tmp_path, {
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp_receivers.port, "helo_name": "app.origin.test"},
    })
    stdin = b"To: user@example.test\nSubject: order 42\nFrom: shop@origin.test\n\nThanks.\n"
    result = run_sendmail(sendmail, config, "-t", "-i", stdin=stdin)
    assert result.returncode == 0, result.stderr
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    (message,) = mx.wait_for(1)
    assert message.rcpts == ["user@example.test"]
    assert message.mail_from == f"{pwd.getpwuid(os.getuid()).pw_name}@app.origin.test"
    assert message.data == stdin.replace(b"\n", b"\r\n")
