"""A small, fast Server-Sent Events decoder: bytes in, `(event, data)` pairs out.

Why not the SDK's: `openai.AsyncStream` builds a pydantic-style model for every chunk
(`construct_type`), which is most of parley's CPU under load (BENCHMARKS.md, "Where the
CPU goes"), and its decoder turns an empty-data event after an `id:` line into a
`json.JSONDecodeError` (reference `llm-streaming.md` §2). This decoder follows the
WHATWG "event stream interpretation" rules and does as little as it can per read:

- lines end on CR, LF or CRLF (a CRLF split across two reads is one line end);
- a UTF-8 byte order mark at the very start of the stream is dropped;
- `data:` loses one optional leading space; several `data:` lines are joined with LF;
- lines starting with `:` are comments; `event:` is kept; `id:`, `retry:` and unknown
  fields are ignored;
- an event is dispatched on a blank line. Events whose data is empty (`event: ping`,
  `retry: 3000`, `data:`) are **skipped** -- a keepalive, never an error;
- at EOF, an event not closed by a blank line is not dispatched; `close()` tells the
  caller one was cut off, so it can judge the stream truncated.

Data stays `bytes` (`json.loads` takes bytes directly), and the work per read is a few
`bytes` operations plus one list of the events it completed; no object per event beyond
the `(event, data)` tuple. Lines are buffered as a list of parts, so an event spread over
many small reads costs linear, not quadratic, time.
"""

from __future__ import annotations

__all__ = ["SSEDecoder", "ServerSentEvents"]

_BOM = b"\xef\xbb\xbf"

ServerSentEvents = list[tuple[str | None, bytes]]


class SSEDecoder:
    """Incremental decoder for one stream: `feed()` every read, then `close()` at EOF."""

    __slots__ = ("_data", "_event", "_head", "_parts", "_skip_lf")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the unfinished last line, as received
        self._data: list[bytes] | None = None  # data lines of the event being built
        self._event: str | None = None
        self._skip_lf = False  # the previous read ended on CR: a leading LF is its CRLF
        self._head: bytes | None = b""  # bytes seen while a BOM is still possible; None after

    def feed(self, chunk: bytes) -> ServerSentEvents:
        """Decode one read; return the events it completed (often one or a few, may be none)."""
        if self._head is not None:
            head = self._head + chunk
            if len(head) < 3 and _BOM.startswith(head):
                self._head = head  # could still be the start of a BOM
                return []
            self._head = None
            chunk = head[3:] if head.startswith(_BOM) else head
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 10:  # b"\n"
                chunk = chunk[1:]
        if b"\n" not in chunk and b"\r" not in chunk:
            if chunk:
                self._parts.append(chunk)  # no line ends yet: keep the part, join once later
            return []
        if self._parts:
            self._parts.append(chunk)
            chunk = b"".join(self._parts)
            self._parts = []
        if b"\r" in chunk:
            if chunk[-1] == 13:  # b"\r": its LF, if any, arrives with the next read
                self._skip_lf = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            self._parts.append(rest)
        out: ServerSentEvents = []
        data = self._data
        for line in lines:
            if not line:  # blank line: dispatch
                if data is not None:
                    payload = data[0] if len(data) == 1 else b"\n".join(data)
                    if payload:
                        out.append((self._event, payload))
                    data = None
                self._event = None
                continue
            if line[:6] == b"data: ":
                value = line[6:]
            elif line[0] == 58:  # b":" a comment
                continue
            else:
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"event":
                    self._event = value.decode("utf-8", "replace") or None
                    continue
                if name != b"data":
                    continue  # id, retry and unknown fields are ignored
            if data is None:
                data = [value]
            else:
                data.append(value)
        self._data = data
        return out

    def close(self) -> bool:
        """End of the stream. True when an event (or line) was cut off without its blank line."""
        cut = bool(self._parts) or self._data is not None
        self._parts = []
        self._data = None
        self._event = None
        return cut
