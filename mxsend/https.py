"""A small, strict HTTPS client for MTA-STS policy fetches and TLS-RPT report POSTs.

Why h11 on asyncio streams rather than httpx, aiohttp or urllib in an executor:

- the host name must be resolved through `dns.nameservers` (contract §8), never the
  system resolver, so we connect to the address we resolved ourselves and verify the
  certificate against the host name given as SNI; with asyncio streams that is one
  `open_connection(address, port, ssl=context, server_hostname=host)` call;
- the limits of RFC 8461 §3.3 (no redirects, a size cap, a total time limit) are hard
  limits here: one `asyncio.timeout` covers connect, handshake, request and body, and
  the body is counted as it arrives and abandoned past the cap. An executor thread
  cannot be cancelled, and a socket timeout is per read, not total;
- h11 (python-hyper, pure Python, sans-I/O) parses HTTP/1.1 correctly (chunked,
  Content-Length, close-delimited) without a connection pool or a second event loop.

Every failure is an HttpError with a short reason, for logs and TLS-RPT.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h11

_READ_CHUNK = 16384
USER_AGENT = "mxsend"


class HttpError(Exception):
    """An HTTPS request failed (connection, TLS, protocol, limit or time)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response: status, headers with lower-case names, body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def media_type(self) -> str:
        """`text/plain; charset=utf-8` -> `text/plain`."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@lru_cache(maxsize=8)
def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """PKIX validation with the host name checked (RFC 8461 §3.3, RFC 8460 §3).

    With `ca_file`, only that bundle is trusted, as for `verifyCert` (tls.py).
    """
    if ca_file is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def request(
    method: str,
    host: str,
    path: str,
    *,
    addresses: Sequence[str],
    context: ssl.SSLContext,
    port: int = 443,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    max_body: int = 65536,
    time_limit: float = 10.0,
) -> HttpResponse:
    """One request to `https://host:port/path`, connecting to `addresses` in order.

    The whole exchange (every connect attempt included) must finish within `time_limit`
    seconds and the response body must not exceed `max_body` bytes.
    """
    if not addresses:
        raise HttpError(f"{host}: no address")
    try:
        async with asyncio.timeout(time_limit):
            reader, writer = await _connect(host, port, addresses, context)
            try:
                return await _exchange(
                    reader, writer, method, host, path, body, headers, max_body
                )
            finally:
                writer.close()
    except TimeoutError:
        raise HttpError(f"{host}: no complete response within {time_limit:g}s") from None


async def _connect(
    host: str, port: int, addresses: Sequence[str], context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    errors: list[str] = []
    for address in addresses:
        try:
            return await asyncio.open_connection(
                address, port, ssl=context, server_hostname=host
            )
        except ssl.SSLCertVerificationError as exc:
            errors.append(f"{address}: certificate not valid for {host}: {exc.verify_message}")
        except ssl.SSLError as exc:
            errors.append(f"{address}: TLS failed: {exc.reason or exc}")
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise HttpError(f"{host}: " + "; ".join(errors))


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    host: str,
    path: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    max_body: int,
) -> HttpResponse:
    connection = h11.Connection(h11.CLIENT)
    all_headers = [("Host", host), ("User-Agent", USER_AGENT), ("Connection", "close")]
    if body or method == "POST":
        all_headers.append(("Content-Length", str(len(body))))
    all_headers.extend(headers)
    try:
        out = connection.send(h11.Request(method=method, target=path, headers=all_headers))
        if body:
            out = (out or b"") + (connection.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (connection.send(h11.EndOfMessage()) or b"")
        writer.write(out)
        await writer.drain()
        status = 0
        response_headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(_READ_CHUNK)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {
                    name.decode("latin-1").lower(): value.decode("latin-1")
                    for name, value in event.headers
                }
                declared = response_headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_body:
                    raise HttpError(f"{host}: body of {declared} bytes is over {max_body}")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise HttpError(f"{host}: body is over {max_body} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if not status:
                    raise HttpError(f"{host}: connection closed before a response")
                return HttpResponse(status, response_headers, b"".join(chunks))
    except h11.RemoteProtocolError as exc:
        raise HttpError(f"{host}: bad HTTP response: {exc}") from None
    except ssl.SSLError as exc:
        raise HttpError(f"{host}: TLS failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise HttpError(f"{host}: {exc.strerror or exc}") from None
