"""`mxsend resolve` end to end through cli.main, against the loopback DNS server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mxsend.cli import main
from tests.fixtures.dns_server import DnsTestServer


@pytest.fixture
def config_file(tmp_path: Path, dns_server: DnsTestServer) -> Path:
    path = tmp_path / "mxsend.toml"
    path.write_text(
        f'[dns]\nnameservers = ["{dns_server.nameserver}"]\ntimeout = "1s"\n'
        f'[smtp]\nport = 2525\nhelo_name = "relay.test"\n'
        f'[script]\npath = "{tmp_path / "absent.lua"}"\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    return path


@pytest.fixture
def two_mx(dns_server: DnsTestServer) -> DnsTestServer:
    dns_server.add_mx("example.test", 20, "mx2.example.test")
    dns_server.add_mx("example.test", 10, "mx1.example.test")
    dns_server.add_aaaa("mx1.example.test", "::1")
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    dns_server.add_a("mx2.example.test", "127.0.0.12")
    return dns_server


def resolve(
    capsys: pytest.CaptureFixture[str], config: Path, *args: str
) -> tuple[int, str, str]:
    code = main(["-c", str(config), "resolve", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_plan_in_order_with_addresses_and_server_details(
    capsys: pytest.CaptureFixture[str], config_file: Path, two_mx: DnsTestServer
) -> None:
    code, out, err = resolve(capsys, config_file, "example.test")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("example.test: 2 server(s)")
    first = next(i for i, line in enumerate(lines) if "mx1.example.test" in line)
    second = next(i for i, line in enumerate(lines) if "mx2.example.test" in line)
    assert first < second
    assert "addresses: ::1, 127.0.0.11" in out
    assert "connection: mx1.example.test[::1]:2525" in out
    assert "connection: mx2.example.test[127.0.0.12]:2525" in out
    assert "tryESMTP=1 tryTLS=1 HELOname=relay.test" in out
    assert "timeouts: connect=60 greeting=300" in out
    assert "built-in defaults" in lines[0]  # the configured script does not exist


def test_json_plan(
    capsys: pytest.CaptureFixture[str], config_file: Path, two_mx: DnsTestServer
) -> None:
    code, out, _ = resolve(capsys, config_file, "EXAMPLE.test", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["domain"] == "example.test"
    assert [(h["preference"], h["name"]) for h in doc["hosts"]] == [
        (10, "mx1.example.test"),
        (20, "mx2.example.test"),
    ]
    assert doc["hosts"][0]["addresses"] == ["::1", "127.0.0.11"]
    details = doc["hosts"][1]["server_details"]
    assert details["tryTLS"] == 1 and details["forceTLS"] == 0
    assert details["HELOname"] == "relay.test"
    assert details["timeouts"]["dataend"] == 600


def test_an_address_resolves_its_domain_and_implicit_mx_is_marked(
    capsys: pytest.CaptureFixture[str], config_file: Path, dns_server: DnsTestServer
) -> None:
    dns_server.add_a("plain.test", "127.0.0.30")
    code, out, _ = resolve(capsys, config_file, "bob@Plain.test")
    assert code == 0
    assert "plain.test  (implicit MX" in out
    assert "addresses: 127.0.0.30" in out


def test_address_literal_needs_no_dns(
    capsys: pytest.CaptureFixture[str], config_file: Path, dns_server: DnsTestServer
) -> None:
    code, out, _ = resolve(capsys, config_file, "[127.0.0.5]", "--json")
    assert code == 0
    assert json.loads(out)["hosts"][0]["connection"] == "[127.0.0.5][127.0.0.5]:2525"
    assert dns_server.query_count() == 0


@pytest.mark.parametrize(
    ("setup", "dsn"),
    [
        (lambda s: s.add_null_mx("fail.test"), "5.1.10"),
        (lambda s: None, "5.1.2"),
        (lambda s: s.set_servfail("fail.test"), "4.4.3"),
    ],
    ids=["null-mx", "nxdomain", "servfail"],
)
def test_dns_errors_are_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    dns_server: DnsTestServer,
    setup: Callable[[DnsTestServer], None],
    dsn: str,
) -> None:
    setup(dns_server)
    code, out, err = resolve(capsys, config_file, "fail.test")
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("mxsend: resolve: ") and "fail.test" in err
    assert f"({dsn})" in err


def test_a_bad_message_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], config_file: Path, two_mx: DnsTestServer, tmp_path: Path
) -> None:
    code, _, err = resolve(capsys, config_file, "example.test", "--message", "/nonexistent/m")
    assert code == 2 and "--message /nonexistent/m" in err
    bad = tmp_path / "bad.msg"
    bad.write_bytes(b"RCPT TO:<a@b.test>\n")
    code, _, err = resolve(capsys, config_file, "example.test", "--message", str(bad))
    assert code == 2 and "--message" in err and len(err.strip().splitlines()) == 1


def test_a_message_file_is_accepted(
    capsys: pytest.CaptureFixture[str], config_file: Path, two_mx: DnsTestServer, tmp_path: Path
) -> None:
    spool_file = tmp_path / "Q123"
    spool_file.write_bytes(
        b"MAIL FROM:<alice@sender.test>\nRCPT TO:<bob@example.test>\nDATA\n"
        b"Subject: hi\n\nbody\n.\n"
    )
    code, out, err = resolve(capsys, config_file, "example.test", "--message", str(spool_file))
    assert code == 0, err
    assert "mx1.example.test" in out


def test_server_details_come_from_the_script(
    capsys: pytest.CaptureFixture[str], config_file: Path, two_mx: DnsTestServer, tmp_path: Path
) -> None:
    (tmp_path / "absent.lua").write_text(
        "function ServerDetails(Parameters, HeaderLines, Actions)\n"
        "  if Parameters.server == 'mx2.example.test' then Actions.tryTLS = 0 end\n"
        "  Actions.HELOname = 'helo-' .. Parameters.connid\n"
        "  Actions.checkCertName = Parameters.originator\n"
        "  return Actions\n"
        "end\n"
    )
    spool_file = tmp_path / "Q124"
    spool_file.write_bytes(
        b"MAIL FROM:<alice@sender.test>\nRCPT TO:<bob@example.test>\nDATA\nSubject: x\n\n.\n"
    )
    code, out, err = resolve(
        capsys, config_file, "example.test", "--json", "--message", str(spool_file)
    )
    assert code == 0, err
    assert json.loads(out)["server_details_from"].startswith("script ")
    first, second = (host["server_details"] for host in json.loads(out)["hosts"])
    assert (first["tryTLS"], second["tryTLS"]) == (1, 0)
    assert (first["HELOname"], second["HELOname"]) == ("helo-1", "helo-2")
    assert first["checkCertName"] == "alice@sender.test"


def test_without_a_script_the_defaults_are_shown(
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    two_mx: DnsTestServer,
) -> None:
    code, out, err = resolve(capsys, config_file, "example.test", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["server_details_from"].startswith("built-in defaults (")
    assert doc["server_details_from"].endswith("absent.lua not found)")
    assert doc["hosts"][0]["server_details"]["HELOname"] == "relay.test"


RULES = """\
function GetOverrides(Domain, Retries, Size)
  if Domain == "example.test" then
    return "[127.0.0.3]:2600, smart.example.test  nowhere.example.test:2700", true
  end
  if Domain == "stop.test" then return nil, false end
  return nil
end

function CheckServer(Domain, MXServer, Retries, Size, DefaultResult)
  if MXServer == "smart.example.test" then return false, 0 end
  if MXServer == "mx2.example.test" then return true, 30 end
  return DefaultResult, 0
end
"""


@pytest.fixture
def rules_config(config_file: Path, tmp_path: Path) -> Path:
    (tmp_path / "mxserverrules.lua").write_text(RULES)
    config_file.write_text(config_file.read_text().replace(
        "[script]\n", f'[script]\nserver_rules_path = "{tmp_path / "mxserverrules.lua"}"\n'))
    return config_file


def test_get_overrides_smart_hosts_keep_their_ports_and_check_server_is_shown(
    capsys: pytest.CaptureFixture[str], rules_config: Path, two_mx: DnsTestServer
) -> None:
    two_mx.add_a("smart.example.test", "127.0.0.4")
    code, out, err = resolve(capsys, rules_config, "example.test")
    assert code == 0, err
    # The smart host that does not resolve is passed over, as the daemon does.
    assert "example.test: 2 server(s)" in out
    assert "GetOverrides: [127.0.0.3]:2600 smart.example.test:2525 " \
           "nowhere.example.test:2700" in out
    # Each smart host's connection is on its own port; a port-less one on smtp.port.
    assert "connection: [127.0.0.3][127.0.0.3]:2600" in out
    assert "connection: smart.example.test[127.0.0.4]:2525" in out
    checks = [line.strip() for line in out.splitlines() if "CheckServer:" in line]
    assert checks == ["CheckServer: allowed", "CheckServer: skipped"]
    assert "mx1.example.test" not in out  # the overrides replace the MX records

    code, out, err = resolve(capsys, rules_config, "example.test", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["server_rules"]["overrides"] == [
        "[127.0.0.3]:2600", "smart.example.test:2525", "nowhere.example.test:2700"]
    assert doc["server_rules"]["continue"] is True
    assert [(h["name"], h["connection"], h["check_server"]["allowed"])
            for h in doc["hosts"]] == [
        ("[127.0.0.3]", "[127.0.0.3][127.0.0.3]:2600", True),
        ("smart.example.test", "smart.example.test[127.0.0.4]:2525", False)]


def test_check_server_hold_on_the_mx_records_and_continue_false(
    capsys: pytest.CaptureFixture[str], rules_config: Path, two_mx: DnsTestServer
) -> None:
    two_mx.add_mx("other.test", 10, "mx2.example.test")
    code, out, err = resolve(capsys, rules_config, "other.test", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["server_rules"]["overrides"] == []  # nil: the MX records
    [host] = doc["hosts"]
    assert host["connection"] == "mx2.example.test[127.0.0.12]:2525"
    assert host["check_server"] == {"allowed": True, "hold_minutes": 30.0,
                                    "decision": "hold 30 minutes (not an attempt)"}

    code, out, err = resolve(capsys, rules_config, "stop.test")
    assert code == 0, err
    assert "stop.test: 0 server(s)" in out
    assert "GetOverrides: Continue=false (deferred: no MX, no address)" in out


def test_without_server_rules_nothing_is_said_about_them(
    capsys: pytest.CaptureFixture[str], config_file: Path, two_mx: DnsTestServer
) -> None:
    code, out, _ = resolve(capsys, config_file, "example.test", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["server_rules"] is None
    assert all(h["check_server"] is None for h in doc["hosts"])
