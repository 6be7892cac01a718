"""A TCP relay on 127.0.0.1 that can go silent, for "the network to PostgreSQL is lost".

A broken network rarely closes connections: bytes just stop arriving, both ways. Killing
a backend (pg_terminate_backend) tests the clean case; this relay tests the silent one.
`freeze()` stops forwarding on every connection without closing any of them.
"""

from __future__ import annotations

import asyncio
import contextlib


class BlackholeRelay:
    """Forwards 127.0.0.1:<port> to `upstream` until frozen."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._frozen = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """From now on nothing passes, and nothing is closed."""
        self._frozen.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(65536)
            if self._frozen.is_set():
                await asyncio.Event().wait()  # swallow this and everything after, forever
            if not data:
                dst.close()
                return
            dst.write(data)
            await dst.drain()
