"""Shared fixtures: real SMTP receivers, a real DNS server, the daemon as a process."""

pytest_plugins = [
    "tests.fixtures.smtp_receiver",
    "tests.fixtures.dns_server",
    "tests.fixtures.daemon",
    "tests.fixtures.exim",
    "tests.fixtures.redis_server",
]
