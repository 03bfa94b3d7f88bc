"""HTTP/1.1 and websocket frames at the byte level, for clients that break the rules on purpose
(tests/test_hostile.py and the adversary suite, tests/adversary)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import trio

UPGRADE = (b"GET /api/v1/watch HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lower-cased, body bytes received so far)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return status, headers, body


def complete(data: bytes) -> bool:
    """Whether `data` holds one whole response (its body by Content-Length)."""
    _, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    _, headers, _ = parse_response(data)
    return len(body) >= int(headers.get("content-length", "0"))


async def read_until_closed(stream: trio.SocketStream, limit: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (TooSlowError after
    `limit` seconds: the server held it open)."""
    data = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data  # reset after its answer: closed all the same
            if not chunk:
                return data
            data += chunk


async def read_response(stream: trio.SocketStream, limit: float = 10) -> bytes:
    """One whole response on a connection that may stay open; b"" if it closed first."""
    data = b""
    with trio.fail_after(limit):
        while not complete(data):
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk
    return data


def json_error(data: bytes) -> tuple[int, str | None]:
    """(status, the JSON error text or None when the body is not `{"error": ...}`)."""
    status, headers, body = parse_response(data)
    if not headers.get("content-type", "").startswith("application/json"):
        return status, None
    try:
        parsed: Any = json.loads(body[: int(headers.get("content-length", len(body)))])
    except ValueError:
        return status, None
    if not isinstance(parsed, dict) or set(parsed) != {"error"}:
        return status, None
    return status, str(parsed["error"])


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
          rsv: int = 0) -> bytes:
    """A websocket frame as a client sends it (masked unless told otherwise)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes([first, m | n])
    elif n < 65536:
        head = bytes([first, m | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, m | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(message: dict[str, Any]) -> bytes:
    return frame(TEXT, json.dumps(message).encode())


class FrameReader:
    """Server frames (unmasked) off a stream, after the 101."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes = b"") -> None:
        self.stream = stream
        self.buffer = bytearray(buffered)

    async def _need(self, n: int) -> bool:
        while len(self.buffer) < n:
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            if not chunk:
                return False
            self.buffer += chunk
        return True

    async def next(self) -> tuple[int, bytes] | None:
        """(opcode, payload), or None when the connection ended."""
        if not await self._need(2):
            return None
        n = self.buffer[1] & 0x7F
        offset = 2
        if n == 126:
            if not await self._need(4):
                return None
            n, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif n == 127:
            if not await self._need(10):
                return None
            n, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
        if not await self._need(offset + n):
            return None
        opcode = self.buffer[0] & 0x0F
        payload = bytes(self.buffer[offset:offset + n])
        del self.buffer[:offset + n]
        return opcode, payload

    async def message(self) -> dict[str, Any] | None:
        """The next text message as JSON (pings skipped); None once closed."""
        while True:
            got = await self.next()
            if got is None or got[0] == CLOSE:
                return None
            if got[0] == TEXT:
                parsed: dict[str, Any] = json.loads(got[1])
                return parsed

    async def close_code(self) -> int | None:
        """Read until the server's close frame: its code (None: the stream just ended)."""
        while True:
            got = await self.next()
            if got is None:
                return None
            if got[0] == CLOSE:
                return struct.unpack("!H", got[1][:2])[0] if len(got[1]) >= 2 else 1005


async def open_websocket(host: str, port: int) -> tuple[trio.SocketStream, FrameReader]:
    """A websocket after its 101, spoken by hand."""
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(UPGRADE)
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed during the websocket handshake")
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head[:40]!r}")
    return stream, FrameReader(stream, rest)
