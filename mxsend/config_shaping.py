"""The config sections of traffic shaping (contract §9): `[[shape]]`, `[[reply_rule]]`,
`[cluster]`.

Kept out of config.py, which is big enough; config.py calls `shaping_from_mapping`
with its own duration parser, so this module never imports it (no cycle). Errors name
the dotted key (`shape[0].rate`, `cluster.local_share`), as everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mxsend.errors import ConfigError
from mxsend.shaping import ReplyRule, Shape, reply_rules_from_config, shapes_from_config

SECTIONS = ("shape", "reply_rule", "cluster")
_CLUSTER_KEYS = {"redis", "local_share"}
_REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    redis: str = ""            # "" = no cluster: the limits hold per spool only
    local_share: float = 1.0   # the part of each limit a daemon keeps when Redis is gone


@dataclass(frozen=True, slots=True)
class ShapingConfig:
    shapes: tuple[Shape, ...] = ()
    reply_rules: tuple[ReplyRule, ...] = ()
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def active(self) -> bool:
        """False: nothing to shape, the delivery path skips the limiter entirely."""
        return bool(self.shapes or self.reply_rules or self.cluster.redis)


def shaping_from_mapping(data: Mapping[str, object],
                         duration: Callable[[object, str], float]) -> ShapingConfig:
    """The three sections of a parsed TOML document, validated."""
    return ShapingConfig(
        shapes=shapes_from_config(data.get("shape", [])),
        reply_rules=reply_rules_from_config(data.get("reply_rule", []), duration),
        cluster=_cluster(data.get("cluster", {})),
    )


def _cluster(table: object) -> ClusterConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"cluster: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - _CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"cluster.{unknown[0]}: unknown key")
    redis = table.get("redis", "")
    if not isinstance(redis, str):
        raise ConfigError(f"cluster.redis: expected a URL such as redis://host:6379/0, "
                          f"got {redis!r}")
    redis = redis.strip()
    if redis and (urlsplit(redis).scheme not in _REDIS_SCHEMES
                  or (urlsplit(redis).scheme != "unix" and not urlsplit(redis).hostname)):
        raise ConfigError(f"cluster.redis: expected a URL such as redis://host:6379/0, "
                          f"got {redis!r}")
    share = table.get("local_share", 1.0)
    if (isinstance(share, bool) or not isinstance(share, int | float)
            or not math.isfinite(share) or not 0 < share <= 1):
        raise ConfigError(f"cluster.local_share: expected a number above 0 and at most 1, "
                          f"got {share!r}")
    return ClusterConfig(redis=redis, local_share=float(share))
