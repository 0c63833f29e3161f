"""mxsend: a direct-MX outbound mail daemon with a VPOP3-compatible Lua policy."""

__version__ = "0.1.0"
