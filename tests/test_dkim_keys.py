"""DKIM keys: `[[dkim.key]]` validation, loading (errors name the key, warnings for open
modes), and the real `mxsend dkim keygen|record` command line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mxsend.config import DKIM_DEFAULT_HEADERS, DkimKey, config_from_mapping
from mxsend.dkim import Signed, Signer, split_message
from mxsend.dkim_keys import DkimKeyError, load_keys, read_key_file, txt_record
from mxsend.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_key(path: Path, key: object, fmt: serialization.PrivateFormat, mode: int = 0o600,
              password: bytes | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()
    )
    assert isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
                      | ec.EllipticCurvePrivateKey)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
    path.chmod(mode)
    return path


def mxsend(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MXSEND_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "mxsend", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


# --- config --------------------------------------------------------------------------------


def test_config_reads_dkim_keys(tmp_path: Path) -> None:
    config = config_from_mapping({"dkim": {"key": [
        {"domain": "Example.COM.", "selector": "s2026", "key_file": "dkim/a.pem"},
        {"domain": "example.com", "selector": "ed", "key_file": "/k/b.pem",
         "headers": ["From", "Subject"], "canonicalization": "simple"},
    ]}}, base=tmp_path)
    first, second = config.dkim.keys
    assert first == DkimKey("example.com", "s2026", tmp_path / "dkim/a.pem",
                            DKIM_DEFAULT_HEADERS, "relaxed/relaxed")
    assert second.headers == ("from", "subject")
    assert second.canonicalization == "simple/simple"  # RFC 6376 §3.5: body defaults simple


def test_no_dkim_section_means_no_keys() -> None:
    assert config_from_mapping({}).dkim.keys == ()


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ({"selector": "s", "key_file": "k"}, "dkim.key[0].domain: required"),
        ({"domain": "a b", "selector": "s", "key_file": "k"}, "dkim.key[0].domain: not a valid"),
        ({"domain": "x.test", "selector": "s", "key_file": ""}, "dkim.key[0].key_file:"),
        ({"domain": "x.test", "selector": "s.", "key_file": "k", "colour": 1},
         "dkim.key[0].colour: unknown key"),
        ({"domain": "x.test", "selector": "s", "key_file": "k", "headers": ["subject"]},
         "dkim.key[0].headers: must include from"),
        ({"domain": "x.test", "selector": "s", "key_file": "k", "headers": ["fr om"]},
         "dkim.key[0].headers: not a header field name"),
        ({"domain": "x.test", "selector": "s", "key_file": "k", "canonicalization": "loose"},
         "dkim.key[0].canonicalization: expected one of"),
    ],
)
def test_config_errors_name_the_dotted_key(key: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_mapping({"dkim": {"key": [key]}})
    assert str(error.value).startswith(says), str(error.value)


def test_config_rejects_a_duplicate_selector_and_unknown_dkim_keys() -> None:
    same = {"domain": "x.test", "selector": "s", "key_file": "k"}
    with pytest.raises(ConfigError, match=r"^dkim.key\[1\].selector: s is configured twice"):
        config_from_mapping({"dkim": {"key": [same, same]}})
    with pytest.raises(ConfigError, match=r"^dkim.sign: unknown key"):
        config_from_mapping({"dkim": {"sign": True}})


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fmt", "algorithm"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
         serialization.PrivateFormat.PKCS8, "rsa-sha256"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
         serialization.PrivateFormat.TraditionalOpenSSL, "rsa-sha256"),
        (ed25519.Ed25519PrivateKey.generate, serialization.PrivateFormat.PKCS8,
         "ed25519-sha256"),
    ],
    ids=["rsa-pkcs8", "rsa-traditional-1024", "ed25519"],
)
def test_loads_pem_keys(tmp_path: Path, make: object, fmt: serialization.PrivateFormat,
                        algorithm: str) -> None:
    assert callable(make)
    path = write_key(tmp_path / "k.pem", make(), fmt)
    loaded = load_keys((DkimKey("example.com", "s1", path),))
    assert loaded.warnings == ()
    [key] = loaded.keys
    assert key.algorithm == algorithm
    assert "BEGIN" not in repr(key) and "private" not in repr(key)


def test_a_readable_key_file_is_a_warning_naming_the_key(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k.pem", ed25519.Ed25519PrivateKey.generate(),
                     serialization.PrivateFormat.PKCS8, mode=0o644)
    loaded = load_keys((DkimKey("example.com", "s1", path),))
    assert len(loaded.keys) == 1
    [warning] = loaded.warnings
    assert warning.startswith(f"dkim.key[0] (example.com s1): {path}: permissions 0644")


def _small_rsa_pem() -> bytes:
    # cryptography will not make a key under 1024 bits; openssl still does.
    return subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True,
                          timeout=60).stdout


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file or directory"),
        (b"not a key\n", "not a PEM private key"),
        ("ec", "not an RSA or Ed25519 key"),
        ("encrypted", "encrypted"),
        ("small", "RSA key of 512 bits"),
    ],
)
def test_unusable_keys_raise_naming_the_key(tmp_path: Path, content: object, says: str) -> None:
    path = tmp_path / "bad.pem"
    if content == "ec":
        write_key(path, ec.generate_private_key(ec.SECP256R1()),
                  serialization.PrivateFormat.PKCS8)
    elif content == "encrypted":
        write_key(path, ed25519.Ed25519PrivateKey.generate(),
                  serialization.PrivateFormat.PKCS8, password=b"secret")
    elif content == "small":
        if not Path("/usr/bin/openssl").exists():
            pytest.skip("openssl is needed to make a 512-bit key")
        path.write_bytes(_small_rsa_pem())
    elif isinstance(content, bytes):
        path.write_bytes(content)
    good = write_key(tmp_path / "good.pem", ed25519.Ed25519PrivateKey.generate(),
                     serialization.PrivateFormat.PKCS8)
    keys = (DkimKey("example.com", "good", good), DkimKey("example.org", "s9", path))
    with pytest.raises(DkimKeyError) as error:
        load_keys(keys)
    message = str(error.value)
    assert message.startswith(f"dkim.key[1] (example.org s9): {path}: "), message
    assert says in message
    assert isinstance(error.value, ConfigError)  # so `mxsend run` exits 2 with this line


# --- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_keygen_then_record_print_the_same_txt_line(tmp_path: Path, kind: str) -> None:
    made = mxsend("dkim", "keygen", "Example.com", "s2026", "--type", kind, "--out", "k.pem",
                  cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert made.stdout.count("\n") == 1
    assert made.stdout.startswith(f"v=DKIM1; k={kind}; p=")
    assert "s2026._domainkey.example.com" in made.stderr
    key_file = tmp_path / "k.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = mxsend("dkim", "record", str(key_file), cwd=tmp_path)
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout == made.stdout
    key, _ = read_key_file(key_file)
    assert txt_record(key) + "\n" == made.stdout


def test_keygen_defaults_to_rsa_2048_in_domain_selector_pem(tmp_path: Path) -> None:
    made = mxsend("dkim", "keygen", "example.com", "s1", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    key, _ = read_key_file(tmp_path / "example.com.s1.pem")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert made.stdout.startswith("v=DKIM1; k=rsa; p=")
    exists = mxsend("dkim", "keygen", "example.com", "s1", cwd=tmp_path)
    assert exists.returncode == 1 and "exists" in exists.stderr  # never overwritten


def test_record_of_a_bad_file_is_one_line_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    result = mxsend("dkim", "record", "junk.pem", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    bad_bits = mxsend("dkim", "keygen", "x.test", "s", "--bits", "512", cwd=tmp_path)
    assert bad_bits.returncode == 2 and "--bits" in bad_bits.stderr


# --- the Signer the daemon is given -----------------------------------------------------


def _config(tmp_path: Path, name: str, domain: str, selector: str, kind: str) -> DkimKey:
    key = (ed25519.Ed25519PrivateKey.generate() if kind == "ed25519"
           else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    path = write_key(tmp_path / name, key, serialization.PrivateFormat.PKCS8)
    return DkimKey(domain, selector, path)


MESSAGE = b"From: a@news.example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def test_signer_signs_once_per_key_and_names_them(tmp_path: Path) -> None:
    configs = (_config(tmp_path, "r.pem", "example.com", "r1", "rsa"),
               _config(tmp_path, "e.pem", "example.com", "e1", "ed25519"))
    signer, warnings = Signer.from_config(configs)
    assert warnings == ()
    assert signer.dkim_domain(split_message(MESSAGE)[0]) == "example.com"
    assert signer.has_domain("Example.com.") and not signer.has_domain("example.org")
    signed = signer.sign(MESSAGE, None, 1_796_000_000)
    assert signed.label == "d=example.com s=r1,d=example.com s=e1"
    assert signed.fields.count(b"DKIM-Signature:") == 2
    assert signed.fields.isascii()  # storable as text in the message's state
    assert signer.sign(MESSAGE, "", 1_796_000_000) == Signed(b"", None)  # DKIMDomain ""
    resigned = signer.sign(signed.fields + MESSAGE, None, 1_796_000_000)
    assert resigned == Signed(b"", None)  # same d= and s= already there


def test_signer_without_keys_signs_nothing() -> None:
    signer = Signer()
    assert signer.dkim_domain(MESSAGE) == ""
    assert signer.sign(MESSAGE, None, 0) == Signed(b"", None)


def test_reload_with_a_bad_key_keeps_the_previous_keys(tmp_path: Path) -> None:
    good = (_config(tmp_path, "e.pem", "example.com", "e1", "ed25519"),)
    signer, _ = Signer.from_config(good)
    (tmp_path / "broken.pem").write_text("garbage")
    broken = (DkimKey("example.com", "e2", tmp_path / "broken.pem"),)
    with pytest.raises(DkimKeyError, match=r"^dkim.key\[0\] \(example.com e2\)"):
        signer.reload(broken)
    assert [key.selector for key in signer.keys] == ["e1"]
    newer = (_config(tmp_path, "e3.pem", "example.com", "e3", "ed25519"),)
    assert signer.reload(newer) == ()
    assert signer.sign(MESSAGE, None, 0).label == "d=example.com s=e3"
