"""pytest fixtures for the fake Discord (registered as a plugin by tests/conftest.py).

- `fake_discord`: a `FakeDiscord` on a free 127.0.0.1 port, stopped after the test.
- `make_fake_discord`: a factory, `await make_fake_discord(limits=..., latency=..., clock=...)`,
  for custom limits, latency or a clock (`tests.support.fakeclock.FakeClock().now`);
  every fake it made is stopped afterwards.
- `running_client(fake, client)`: an async context manager that points discord.py at the
  fake (the one documented helper, `bots.discord_endpoints.point_discord_at`), starts
  `client` with the fake's token, waits for `on_ready`, and on exit closes the client and
  restores the previous endpoints.
- `discord_rest(fake, method, path, json=...)`: one raw REST call for wire-level tests.

discord.py sleeps 5 s before every non-initial IDENTIFY (after INVALID_SESSION); tests of
that path override the public `Client.before_identify_hook` (see test_fake_discord_gateway).

Typical use::

    async def test_echo(fake_discord):
        client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
        async with running_client(fake_discord, client):
            fake_discord.user_says(fake_discord.default_channel, None, "hi")
            await fake_discord.wait_for(lambda: fake_discord.bot_texts(fake_discord.default_channel))
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from bots.discord_endpoints import current_discord_endpoints, point_discord_at
from tests.fakes.discord import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start(host="127.0.0.1", port=0)
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def make_fake_discord() -> AsyncIterator[Callable[..., Awaitable[FakeDiscord]]]:
    made: list[FakeDiscord] = []

    async def factory(**kwargs: Any) -> FakeDiscord:
        fake = FakeDiscord(**kwargs)
        await fake.start(host="127.0.0.1", port=0)
        made.append(fake)
        return fake

    try:
        yield factory
    finally:
        for fake in reversed(made):
            await fake.stop()


@contextlib.asynccontextmanager
async def running_client(fake: FakeDiscord, client: Any, *, timeout: float = 10.0,
                         token: str | None = None) -> AsyncIterator[Any]:
    """Run a discord.py `Client` against `fake` until the block exits.

    Raises what discord.py raised if the client failed before becoming ready (e.g.
    `discord.LoginFailure` for a wrong token, `discord.PrivilegedIntentsRequired` for a
    privileged intent the fake's app does not grant), or TimeoutError.
    """
    previous = current_discord_endpoints()
    point_discord_at(fake.api_base, fake.gateway_url)
    try:
        await client.login(token if token is not None else fake.token)  # LoginFailure surfaces here
    except BaseException:
        await client.close()
        point_discord_at(*previous)
        raise
    start = asyncio.create_task(client.connect(), name="discord-client")
    ready = asyncio.create_task(client.wait_until_ready())
    try:
        done, _ = await asyncio.wait({start, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()  # raises the start-up error
            raise RuntimeError("discord client stopped before it became ready")
        if ready not in done:
            raise TimeoutError(f"discord client not ready after {timeout}s; {fake.describe()}")
        yield client
    finally:
        ready.cancel()
        await client.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(start, 5.0)
        point_discord_at(*previous)


async def discord_rest(
    fake: FakeDiscord,
    method: str,
    path: str,
    *,
    json: Any = None,
    token: str | None = None,
    auth: bool = True,
    timeout: float = 5.0,
) -> tuple[int, Any, dict[str, str]]:
    """One raw REST call to the fake (for wire-level tests): (status, body, headers).

    `path` is relative to the API base (`/channels/1/messages`). The body is parsed as
    JSON when the response says exactly `application/json`, as discord.py does.
    """
    import aiohttp

    headers = {"Authorization": f"Bot {token or fake.token}"} if auth else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.request(method, fake.api_base + path, json=json, headers=headers) as resp:
            text = await resp.text()
            body: Any = text
            if resp.headers.get("Content-Type") == "application/json":
                import json as _json

                body = _json.loads(text)
            return resp.status, body, dict(resp.headers)
