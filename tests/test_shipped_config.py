"""config/mxsend.toml is the operator's reference: it shows every key (README, §3)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mxsend.config import Config, load_config

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "mxsend.toml"
# Config fields that are not a TOML section of the same name, and what stands for them.
TABLE_ARRAYS = {"dkim": ("dkim.key", ("domain", "selector", "key_file", "headers",
                                      "canonicalization")),
                "shaping": None}  # [[shape]], [[reply_rule]], [cluster]: test below


def _shown(text: str, section: str, key: str) -> bool:
    """`key = ` within `[section]` (a commented-out line counts: an example)."""
    header = re.compile(rf"^#?\s*\[\[?{re.escape(section)}\]\]?\s*$", re.MULTILINE)
    match = header.search(text)
    if match is None:
        return False
    rest = text[match.end():]
    following = re.search(r"^#?\s*\[\[?[a-z_.]+\]\]?\s*$", rest, re.MULTILINE)
    body = rest[:following.start()] if following else rest
    return re.search(rf"^#?\s*{re.escape(key)}\s*=", body, re.MULTILINE) is not None


def test_the_shipped_config_loads() -> None:
    load_config(SHIPPED)


def test_every_key_is_shown_in_the_shipped_config() -> None:
    text = SHIPPED.read_text()
    missing = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(value):
            continue  # `source`: not a key
        if section.name in TABLE_ARRAYS:
            entry = TABLE_ARRAYS[section.name]
            if entry is not None:
                table, keys = entry
                missing += [f"{table}.{k}" for k in keys if not _shown(text, table, k)]
            continue
        missing += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)
                    if not _shown(text, section.name, f.name)]
    assert missing == []


def test_the_shaping_tables_are_shown() -> None:
    text = SHIPPED.read_text()
    for table, keys in (("shape", ("name", "hosts", "max_connections",
                                   "max_messages_per_connection", "rate",
                                   "connection_rate")),
                        ("reply_rule", ("pattern", "action", "duration")),
                        ("cluster", ("redis", "local_share"))):
        assert [k for k in keys if not _shown(text, table, k)] == [], table
