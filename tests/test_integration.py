"""docs/integration.md's MTA recipes, end to end with the real MTA on loopback.

Each test reads its configuration snippets from the page (the fenced block after a
`<!-- recipe: NAME -->` line), puts in the paths, port and user names of its private
instance, and runs Postfix (`postfix -c DIR start`) or Exim (`exim -bdf -C FILE`, by PID)
with them: the page cannot drift from what works. The application recipe (the
`sendmail` symlink) is `test_application_recipe_end_to_end` in tests/test_enqueue.py;
Postfix relaying to the plaintext listener is `test_postfix_relays_into_the_spool` in
tests/test_listener.py.

Test-rig differences, each forced by the machine and none by the recipe: the writer's
user is `nobody` (Postfix refuses root for pipe(8)) or `Debian-exim` (Exim with a -C
config runs its deliveries as its own user) instead of `mxsend`, and the daemon runs as
root, so the spool's group is the writer's group.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from mxsend.config import config_from_mapping
from mxsend.envelope import Message, Recipient, parse_bsmtp
from mxsend.listener import Listener, start_listener
from mxsend.spool_layout import create_dirs
from tests.fixtures.daemon import DaemonProcess, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.exim import EXIM_USER, EximRelay
from tests.fixtures.postfix import PostfixInstance, free_port, require_postfix
from tests.fixtures.smtp_receiver import ReceiverGroup

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "integration.md"
_RECIPE = re.compile(r"<!-- recipe: (\S+) -->\n```[^\n]*\n(.*?)```", re.DOTALL)


def recipe(name: str, **replace: str) -> str:
    """The snippet `name` of docs/integration.md, with `replace`'s keys replaced."""
    found = {match.group(1): match.group(2) for match in _RECIPE.finditer(DOC.read_text())}
    assert name in found, f"no recipe {name!r} in {DOC}: {sorted(found)}"
    text = found[name]
    for old, new in replace.items():
        assert old in text, f"recipe {name!r} has no {old!r}"
        text = text.replace(old, new)
    return text


def test_every_recipe_on_the_page_is_tested() -> None:
    used = set(re.findall(r'recipe\("([^"]+)"', Path(__file__).read_text()))
    on_page = {match.group(1) for match in _RECIPE.finditer(DOC.read_text())}
    assert on_page == used


def new_files(spool: Path) -> list[Path]:
    return sorted(p for p in (spool / "new").iterdir() if not p.name.startswith("."))


def make_spool(root: Path, group: str) -> tuple[Path, Path]:
    """A spool as the daemon makes it at start with `spool.group = group`, and its
    config, under `root` (outside pytest's tmp_path, which only root may enter)."""
    config = write_config(root, {"spool": {"path": str(root / "spool"), "group": group}})
    config.chmod(0o644)
    create_dirs(root / "spool", grp.getgrnam(group).gr_gid)
    return root / "spool", config


@pytest.fixture
def rig() -> Iterator[Path]:
    """A directory others may enter (the MTAs' users write below it), removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="mxsend-integ-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_writer_file(path: Path, user: str, group: str, mode: int) -> None:
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == mode, oct(info.st_mode)
    assert pwd.getpwuid(info.st_uid).pw_name == user
    assert grp.getgrgid(info.st_gid).gr_name == group


# --- Postfix: a pipe(8) transport calling `mxsend enqueue` ------------------------------


def enqueue_command(user: str) -> str:
    """How `user` runs mxsend: the venv's console script when it may, else the system's
    python3 (enqueue needs only the standard library) with this checkout on the path.
    The venv may sit where only root can read it (a pyenv under /root)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    probe = "import mxsend.commands.enqueue"
    for python, command in ((sys.executable, str(Path(sys.executable).with_name("mxsend"))),
                            ("/usr/bin/python3", "/usr/bin/python3 -m mxsend")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([python, "-c", probe], user=user, env=env, cwd="/",
                              capture_output=True, timeout=60).returncode == 0:
                return command
    pytest.skip(f"no Python that {user} may run imports mxsend")


def test_postfix_pipe_transport(rig: Path) -> None:
    require_postfix()
    spool, config = make_spool(rig, "nogroup")
    master_cf = recipe("postfix-pipe/master.cf", **{
        "/opt/mxsend/bin/mxsend": enqueue_command("nobody"),
        "/etc/mxsend/mxsend.toml": str(config),
        "user=mxsend": "user=nobody:nogroup",
    })
    main_cf = recipe("postfix-pipe/main.cf") + (
        # The rig's only addition: enqueue imports this checkout.
        f"export_environment = TZ MAIL_CONFIG LANG PYTHONPATH={REPO}\n")
    # A complete header, so that Postfix adds only its Received field.
    body = (b"From: alice@src.test\r\nTo: bob@dst.test\r\nSubject: via pipe\r\n"
            b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <pf42@src.test>\r\n\r\n"
            b".leading dot\r\n\xc3\xa9t\xc3\xa9\r\n.\r\nend\r\n")
    with PostfixInstance(main_cf, master_cf) as postfix:
        with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=10) as smtp:
            smtp.ehlo("app.test")
            assert smtp.mail("alice@src.test", ["RET=HDRS", "ENVID=PF42",
                                                "BODY=8BITMIME"])[0] == 250
            assert smtp.rcpt("bob@dst.test", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
            assert smtp.rcpt("carol@dst.test", ["NOTIFY=NEVER"])[0] == 250
            assert smtp.rcpt('"dave smith"@other.test')[0] == 250
            assert smtp.data(body)[0] == 250
        # Two files for the message (one per domain) and Postfix's own "relayed" notice
        # for bob, who asked for NOTIFY=SUCCESS.
        files = wait_until(lambda: len(new_files(spool)) >= 3 and new_files(spool), 60, 0.1,
                           lambda: "3 files in new/; maillog:\n" + postfix.maillog[-3000:])
    assert list((spool / "tmp").iterdir()) == []
    messages = {path.name: parse_bsmtp(path.read_bytes()) for path in files}
    by_recipients = {tuple(r.address for r in m.envelope.recipients): m
                     for m in messages.values()}
    assert set(by_recipients) == {("bob@dst.test", "carol@dst.test"),
                                  ('"dave smith"@other.test',), ("alice@src.test",)}
    for recipients in (("bob@dst.test", "carol@dst.test"), ('"dave smith"@other.test',)):
        envelope = by_recipients[recipients].envelope
        assert envelope.sender == "alice@src.test"
        # What the page says is lost: pipe(8) has no macro for the DSN parameters.
        assert (envelope.ret, envelope.envid) == (None, None)
        assert all(r.notify is None and r.orcpt is None for r in envelope.recipients)
        data = by_recipients[recipients].data
        assert data.startswith(b"Received: from app.test")
        assert data.endswith(body)
    notice = by_recipients[("alice@src.test",)]
    assert notice.envelope.sender == ""  # null_sender=: the null sender stays null
    assert b"Original-Envelope-Id: PF42" in notice.data
    assert re.search(rb"Action: relayed\r\nStatus: 2\.\d\.\d", notice.data)
    # Written by another user than new/'s owner, into a spool shared through its group.
    for path in files:
        check_writer_file(path, "nobody", "nogroup", 0o660)


# --- Postfix: relayhost to the listener with STARTTLS -----------------------------------


@pytest.fixture
async def tls_listener(rig: Path) -> AsyncIterator[tuple[Listener, Path, Path]]:
    """The listener as the page configures it, on a free loopback port, with a
    certificate for `localhost` (the name the test's relayhost uses) and its CA file."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    for pem in cert.cert_chain_pems:
        pem.write_to_path(str(rig / "listen.pem"), append=True)
    cert.private_key_pem.write_to_path(str(rig / "listen.key"))
    ca.cert_pem.write_to_path(str(rig / "ca.pem"))
    (rig / "ca.pem").chmod(0o644)
    toml = recipe("postfix-relayhost-tls/mxsend.toml", **{
        "/etc/mxsend/listen.pem": str(rig / "listen.pem"),
        "/etc/mxsend/listen.key": str(rig / "listen.key"),
    })
    listen = tomllib.loads(toml)["listen"]
    # The rig's address and network: loopback, where the test's Postfix is.
    listen.update(address=f"127.0.0.1:{free_port()}", networks=["127.0.0.0/8"])
    config = config_from_mapping({"spool": {"path": str(rig / "spool")}, "listen": listen,
                                  "smtp": {"helo_name": "relay.test"}})
    listener = await start_listener(config)
    try:
        yield listener, rig / "spool", rig / "ca.pem"
    finally:
        await listener.close()


async def test_postfix_relayhost_with_verified_starttls(
        tls_listener: tuple[Listener, Path, Path]) -> None:
    require_postfix()
    listener, spool, ca_file = tls_listener
    main_cf = recipe("postfix-relayhost-tls/main.cf", **{
        "mxsend.internal": "localhost", "10025": str(listener.port),
        "/etc/postfix/mxsend-ca.pem": str(ca_file),
    }) + "smtp_tls_loglevel = 1\n"  # the rig's: log how the session was verified

    def relay() -> list[Path]:
        with PostfixInstance(main_cf) as postfix:
            with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=10) as smtp:
                smtp.ehlo("app.test")
                smtp.mail("alice@src.test", ["RET=FULL", "ENVID=TLS42"])
                smtp.rcpt("bob@dst.test", ["NOTIFY=FAILURE,DELAY",
                                           "ORCPT=rfc822;Bob@dst.test"])
                assert smtp.data(b"Subject: over tls\r\n\r\nhello\r\n")[0] == 250
            files: list[Path] = wait_until(
                lambda: new_files(spool), 60, 0.1,
                lambda: "the relayed message; maillog:\n" + postfix.maillog[-3000:])
            # Postfix logs the verified session: "Verified TLS connection established".
            wait_until(lambda: "Verified TLS connection established to localhost"
                       in postfix.maillog, 10, 0.1, lambda: postfix.maillog[-3000:])
            return files

    (path,) = await asyncio.to_thread(relay)
    message = parse_bsmtp(path.read_bytes())
    envelope = message.envelope
    assert (envelope.sender, envelope.ret, envelope.envid) == ("alice@src.test", "FULL",
                                                               "TLS42")
    assert envelope.recipients == (Recipient("bob@dst.test", notify=("FAILURE", "DELAY"),
                                             orcpt="rfc822;Bob@dst.test"),)
    assert b"with ESMTPS id" in message.data
    assert b"\r\nSubject: over tls\r\n" in message.data
    assert message.data.endswith(b"\r\n\r\nhello\r\n")


# --- Exim: Batch SMTP into the spool -----------------------------------------------------


def submit(port: int, sender: str, recipients: list[tuple[str, list[str]]], data: bytes,
           mail_options: tuple[str, ...] = ()) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=10) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail(sender, list(mail_options))
        assert code == 250, reply
        for address, options in recipients:
            code, reply = smtp.rcpt(address, options)
            assert code == 250, reply
        code, reply = smtp.data(data)
        assert code == 250, reply


def test_exim_bsmtp_into_the_spool(rig: Path, dns_server: DnsTestServer,
                                   smtp_receivers: ReceiverGroup,
                                   daemon: Callable[..., DaemonProcess]) -> None:
    spool, _ = make_spool(rig, EXIM_USER)
    # The page's one-off shell line, as the rig's user.
    subprocess.run(recipe("exim-bsmtp/shell", **{
        "-o mxsend -g mxsend": f"-o {EXIM_USER} -g {EXIM_USER}",
        "/var/lib/mxsend": str(spool)}), shell=True, check=True)
    transports = recipe("exim-bsmtp/transports", **{
        "/var/lib/mxsend": str(spool), "user = mxsend": f"user = {EXIM_USER}",
        "group = mxsend": f"group = {EXIM_USER}"})
    body = b"Subject: via exim\r\n\r\n.leading dot\r\nline\r\n"
    with EximRelay("", recipe("exim-bsmtp/routers"), transports) as exim:
        submit(exim.port, "alice@src.test",
               [("bob@example.test", []), ("carol@example.test", [])], body)
        (path,) = wait_until(lambda: new_files(spool), 30, 0.05,
                             lambda: "Exim's file in new/; mainlog:\n" + exim.mainlog)
        wait_until(lambda: "Completed" in exim.mainlog, 10, 0.05, lambda: exim.mainlog)
    assert not path.name.startswith(".")
    assert list((spool / "tmp").iterdir()) == []
    check_writer_file(path, EXIM_USER, EXIM_USER, 0o640)
    message = parse_bsmtp(path.read_bytes())
    assert message.envelope.sender == "alice@src.test"
    assert [r.address for r in message.envelope.recipients] == ["bob@example.test",
                                                                "carol@example.test"]
    assert message.data.startswith(b"Received: from [127.0.0.1] (helo=app.test)")
    assert b"Subject: via exim\r\n" in message.data
    assert message.data.endswith(b"\r\n\r\n.leading dot\r\nline\r\n")

    # A real daemon takes Exim's file from new/ (cur/ beside it) and delivers it.
    dns_server.add_mx("example.test", 10, "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.2")
    mx = smtp_receivers.start("127.0.0.2")
    config = write_config(rig, {
        "spool": {"path": str(spool), "group": EXIM_USER},
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp_receivers.port, "helo_name": "out.test"},
    }, name="daemon.toml")
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    (delivered,) = mx.wait_for(1)
    assert delivered.mail_from == "alice@src.test"
    assert sorted(delivered.rcpts) == ["bob@example.test", "carol@example.test"]
    assert delivered.data == message.data
    assert (spool / "cur").is_dir() and list((spool / "cur").iterdir()) == []


# --- Exim: smarthost to the listener -----------------------------------------------------


@pytest.fixture
async def plain_listener(rig: Path) -> AsyncIterator[Listener]:
    config = config_from_mapping({
        "spool": {"path": str(rig / "spool")},
        "listen": {"address": f"127.0.0.1:{free_port()}"},
        "smtp": {"helo_name": "relay.test"}})
    listener = await start_listener(config)
    try:
        yield listener
    finally:
        await listener.close()


async def test_exim_smarthost_to_the_listener(plain_listener: Listener, rig: Path) -> None:
    spool = rig / "spool"
    routers = recipe("exim-smarthost/routers", **{"10025": str(plain_listener.port)})

    def relay() -> Message:
        with EximRelay(recipe("exim-smarthost/main"), routers,
                       recipe("exim-smarthost/transports")) as exim:
            submit(exim.port, "alice@src.test",
                   [("bob@dst.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@dst.test"]),
                    ("carol@dst.test", ["NOTIFY=NEVER"])],
                   b"Subject: via exim smarthost\r\n\r\nhello\r\n",
                   ("RET=HDRS", "ENVID=EX42"))
            (path,) = wait_until(lambda: new_files(spool), 30, 0.05,
                                 lambda: "the relayed message; mainlog:\n" + exim.mainlog)
            wait_until(lambda: "Completed" in exim.mainlog, 10, 0.05, lambda: exim.mainlog)
        return parse_bsmtp(path.read_bytes())

    message = await asyncio.to_thread(relay)
    envelope = message.envelope
    assert (envelope.sender, envelope.ret, envelope.envid) == ("alice@src.test", "HDRS",
                                                               "EX42")
    assert envelope.recipients == (
        Recipient("bob@dst.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Bob@dst.test"),
        Recipient("carol@dst.test", notify=("NEVER",)),
    )
    assert b"Subject: via exim smarthost\r\n\r\nhello\r\n" in message.data

