"""Reading SMTP replies off the wire, and the one mapping of I/O failures to ours.

Both halves of a session use these: the set-up (smtp_setup.py) and the transactions
(smtp.py). This is the only place that turns ssl's exceptions and the wire's OSErrors,
timeouts and ValueErrors into TemporaryFailure/PermanentFailure carrying code, DSN code,
phase and host (`translate`), and the only place replies pass the script's
ReturnCodeHandler (contract §9): one by one (`read_reply`), or a pipelined group at once
so that its calls share one worker round trip (`read_group`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

from mxsend.errors import DeliveryError, PermanentFailure, Phase, TemporaryFailure
from mxsend.hooks import command_of
from mxsend.reply import Reply, parse_reply
from mxsend.wire import Wire

# VPOP3 8.8's ReturnCodeHandler (contract §9): (LastCommand, code, text) -> a
# replacement (code, text) or None. Called with every reply, before anything reads it.
ReplyHook = Callable[[str, int, str], Awaitable[tuple[int, str] | None]]


# --- translating foreign exceptions (the one place) ------------------------------------


def failure_from_reply(reply: Reply, phase: Phase, host: str) -> DeliveryError:
    cls = PermanentFailure if reply.permanent else TemporaryFailure
    dsn = reply.dsn if reply.permanent or reply.transient else "4.5.0"
    return cls(str(reply), code=reply.code, dsn=dsn, phase=phase, host=host)


def translate(exc: BaseException, phase: Phase, host: str) -> DeliveryError:
    """ssl, OSError and the wire's built-in exceptions -> our failures."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, TimeoutError):
        dsn = "4.4.1" if phase is Phase.CONNECT else "4.4.2"
        return TemporaryFailure(f"timed out ({phase.value})", dsn=dsn, phase=phase, host=host)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TemporaryFailure(
            f"TLS failure: {exc}", dsn="4.7.5", phase=Phase.STARTTLS, host=host
        )
    if isinstance(exc, OSError) and phase is Phase.CONNECT:
        return TemporaryFailure(
            f"cannot connect: {cause(exc)}", dsn="4.4.1", phase=phase, host=host
        )
    if isinstance(exc, ConnectionError | EOFError):
        return TemporaryFailure(
            f"connection lost ({phase.value})", dsn="4.4.2", phase=phase, host=host
        )
    if isinstance(exc, OSError):
        return TemporaryFailure(
            f"network error: {cause(exc)}", dsn="4.4.2", phase=phase, host=host
        )
    if isinstance(exc, ValueError):
        return TemporaryFailure(
            f"protocol error ({phase.value}): {exc}", dsn="4.5.0", phase=phase, host=host
        )
    return TemporaryFailure(
        f"unexpected error ({phase.value}): {exc!r}", dsn="4.0.0", phase=phase, host=host
    )


def cause(exc: BaseException) -> str:
    """The OS's words for what went wrong (the cause's strerror when there is one)."""
    inner = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(inner) or type(inner).__name__


@contextmanager
def in_phase(phase: Phase, host: str) -> Iterator[None]:
    """Foreign exceptions raised inside become `translate`d failures of `phase`."""
    try:
        yield
    except DeliveryError:
        raise
    except asyncio.CancelledError:
        raise
    except (OSError, ssl.SSLError, ValueError, EOFError, TimeoutError) as exc:
        raise translate(exc, phase, host) from exc


# --- reading replies ---------------------------------------------------------------------


async def read_raw(wire: Wire, phase: Phase, seconds: float, host: str,
                   hook: ReplyHook | None = None, line: bytes = b"") -> tuple[int, str]:
    """The next reply as (code, text), after the script's hook if there is one."""
    # Not `with in_phase(...)`: this runs for every reply, and a generator-based context
    # manager per call showed in profiles; the mapping is the same.
    try:
        code, text = await wire.read(seconds)
    except (OSError, ValueError, TimeoutError) as exc:
        # Out of step with the server (a reply late, missing or garbled): never reused.
        wire.close()
        raise translate(exc, phase, host) from exc
    if hook is not None:
        # Contract §9: the script's replacement is the reply from here on (classified,
        # logged, put in a DSN); without the hook there is no call at all.
        replaced = await hook(command_of(phase, line), code, text)
        if replaced is not None:
            code, text = replaced
    return code, text


async def read_reply(wire: Wire, phase: Phase, seconds: float, host: str,
                     hook: ReplyHook | None = None, line: bytes = b"") -> Reply:
    return parse_reply(*await read_raw(wire, phase, seconds, host, hook, line))


async def ask(wire: Wire, line: bytes, phase: Phase, seconds: float,
              host: str, hook: ReplyHook | None = None) -> tuple[int, str]:
    """Write one command and read its reply (lock-step, for the session set-up)."""
    with in_phase(phase, host):
        wire.write(line, 1)
    return await read_raw(wire, phase, seconds, host, hook, line)


async def read_group(wire: Wire, expected: Sequence[tuple[Phase, float]], host: str,
                     hook: ReplyHook, ahead: deque[Reply | DeliveryError]) -> None:
    """Read the replies of a pipelined group into `ahead`, then ask ReturnCodeHandler
    about them all at once: its calls share one worker round trip (script_calls.py)
    instead of one each (docs/shaping.md has the figures).

    Sound because the replies of a group arrive together (RFC 2920 §3.1) and none
    is acted on before the group is written; each is still replaced before it is
    classified. Reading stops at a failure (kept in its place in `ahead`) or a 421,
    after which nothing more comes (RFC 5321 §3.8).
    """
    read: list[tuple[Phase, int, str]] = []
    failure: DeliveryError | None = None
    for phase, seconds in expected:
        try:
            code, text = await wire.read(seconds)
        except (OSError, ValueError, TimeoutError) as exc:
            wire.close()  # out of step with the server: never reused
            failure = translate(exc, phase, host)
            failure.__cause__ = exc
            break
        read.append((phase, code, text))
        if code == 421:
            break
    answers = await asyncio.gather(*(hook(command_of(phase), code, text)
                                     for phase, code, text in read))
    for (_, code, text), replaced in zip(read, answers, strict=True):
        ahead.append(parse_reply(*(replaced or (code, text))))
    if failure is not None:
        ahead.append(failure)
