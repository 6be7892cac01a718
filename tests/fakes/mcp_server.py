"""A fake MCP server, written with the official SDK's server side (`MCPServer`).

    python -m tests.fakes.mcp_server stdio [--many N] [--page-size N] [--broken-schema]
    python -m tests.fakes.mcp_server http --port N [same options] [--auth TOKEN]

The HTTP variant listens on 127.0.0.1 only and prints its endpoint URL
(`http://127.0.0.1:<port>/mcp`) on the first line of stdout once it accepts
connections; `--port 0` picks a free port. `--page-size N` makes tools/list answer N
tools per page (with a cursor). `--auth TOKEN` answers 401 to any request
without `Authorization: Bearer TOKEN`. The stdio variant prints nothing (stdout is
the protocol channel).

Tools (each exercises one thing parley must handle):

- `echo(text)` — text back.
- `add(a, b)` — an integer, with structured output (`{"result": a + b}`).
- `stats()` — structured content only, no text block.
- `fail(message)` — raises, so the result has `isError: true`.
- `hang(seconds)` — sleeps (the event loop stays free: pings are still answered).
- `image()` — a small PNG.
- `resource()` — an embedded text resource and a blob resource.
- `big(size)` — `size` characters of text.
- `crash()` — `os._exit(1)`: the server dies mid-call.
- `grow()` — adds a tool `extra_<n>` and sends `notifications/tools/list_changed`.
- with `--broken-schema`: `broken`, whose input schema is not valid JSON Schema
  (`additionalProperties: "yes"`).
- `whoami(name)` — whether an env var / request header called `name` is present
  (never its value).
- with `--many N`: `t_000` … `t_<N-1>`, small tools with a few parameters (the
  cost of offering many tools per turn).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import sys
import zlib
from typing import Any

from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import (
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ListToolsResult,
    PaginatedRequestParams,
    TextResourceContents,
)


def tiny_png(width: int = 4, height: int = 4) -> bytes:
    """A valid RGB PNG of one colour (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\xff\x80\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class _PagedServer(MCPServer):
    """`MCPServer` whose tools/list answers `page_size` tools at a time, with a cursor."""

    page_size = 0

    async def _handle_list_tools(self, ctx: Any, params: PaginatedRequestParams | None) -> ListToolsResult:
        tools = await self.list_tools()
        if not self.page_size:
            return ListToolsResult(tools=tools)
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + self.page_size
        return ListToolsResult(tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None)


def build_server(many: int = 0, broken_schema: bool = False, page_size: int = 0) -> MCPServer:
    """The fake's tools on a fresh `MCPServer`."""
    server = _PagedServer("parley-fake", log_level="WARNING")
    server.page_size = page_size
    grown = 0

    @server.tool()
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    async def stats() -> CallToolResult:
        """Structured content only, no text block."""
        return CallToolResult(content=[], structured_content={"count": 3, "names": ["a", "b", "c"]})

    @server.tool()
    async def fail(message: str) -> str:
        """Always fails with the given message."""
        raise ToolError(message)

    @server.tool()
    async def hang(seconds: float) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(seconds)
        return f"slept {seconds:g} s"

    @server.tool()
    async def image() -> Image:
        """A small PNG."""
        return Image(data=tiny_png(), format="png")

    @server.tool()
    async def resource() -> list[Any]:
        """An embedded text resource and an embedded binary one."""
        return [
            EmbeddedResource(
                type="resource", resource=TextResourceContents(uri="memo://note", text="the note", mime_type="text/plain")
            ),
            EmbeddedResource(
                type="resource",
                resource=BlobResourceContents(uri="memo://blob", blob="AAAA" * 512, mime_type="application/pdf"),
            ),
        ]

    @server.tool(structured_output=False)  # the text once, not also as structuredContent
    async def big(size: int) -> str:
        """`size` characters of text."""
        return ("0123456789abcdef" * (size // 16 + 1))[:size]

    @server.tool()
    async def crash() -> str:
        """Exit the whole server process at once."""
        sys.stdout.flush()
        os._exit(1)

    @server.tool()
    async def grow(ctx: Context) -> str:
        """Add a new tool at runtime and tell the client the list changed."""
        nonlocal grown
        grown += 1
        name = f"extra_{grown}"

        async def extra(x: int = 0) -> str:
            return f"{name}: {x}"

        server.add_tool(extra, name=name, description=f"Added at runtime ({name}).")
        await ctx.session.send_tool_list_changed()
        return name

    @server.tool()
    async def whoami(name: str, ctx: Context) -> dict[str, bool]:
        """Whether an environment variable and a request header with this name are present."""
        headers = ctx.headers or {}
        return {"env": name in os.environ, "header": name.lower() in {k.lower() for k in headers}}

    if broken_schema:

        async def broken(items: list[int]) -> str:
            return str(items)

        server.add_tool(broken, name="broken", description="Its input schema is not valid JSON Schema.")
        # Passes the SDK's wire validation (extra keys are allowed) but is not a valid JSON
        # Schema: a provider would reject every request that offered it.
        server._tool_manager.get_tool("broken").parameters = {
            "type": "object",
            "properties": {"items": {"type": "array"}},
            "additionalProperties": "yes",
        }

    for i in range(many):
        server.add_tool(_numbered(i), name=f"t_{i:03d}", description=f"Numbered tool {i}: returns its arguments.")
    return server


def _numbered(i: int) -> Any:
    async def numbered(query: str, limit: int = 10, exact: bool = False) -> str:
        return f"{i}:{query}:{limit}:{exact}"

    return numbered


class _BearerOnly:
    """ASGI middleware: 401 unless `Authorization: Bearer <token>`."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await self.app(scope, receive, send)


async def serve_http(server: MCPServer, port: int, auth: str | None) -> None:
    """Streamable HTTP on 127.0.0.1:`port`; prints the URL once listening."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    app: Any = server.streamable_http_app(host="127.0.0.1")
    if auth:
        app = _BearerOnly(app, auth)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)

    async def announce() -> None:
        while not uv.started:
            await asyncio.sleep(0.01)
        print(f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await uv.serve(sockets=[sock])
    finally:
        announcer.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--many", type=int, default=0, help="also offer N numbered tools")
    parser.add_argument("--broken-schema", action="store_true", help="also offer a tool with a malformed input schema")
    parser.add_argument("--page-size", type=int, default=0, help="answer tools/list in pages of N tools")
    parser.add_argument("--auth", default=None, help="HTTP: require this bearer token")
    args = parser.parse_args(argv)
    server = build_server(args.many, args.broken_schema, args.page_size)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        asyncio.run(serve_http(server, args.port, args.auth))


if __name__ == "__main__":
    main()
