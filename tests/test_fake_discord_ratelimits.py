"""Rate limits and fault injection of the fake Discord: on the wire and through discord.py."""

from __future__ import annotations

import asyncio

import aiohttp
import discord
import pytest

from tests.fakes.discord import CALLBACK, EDIT, SEND, DiscordLimits, FakeDiscord
from tests.fakes.discord_fixtures import discord_rest, running_client
from tests.support.fakeclock import FakeClock

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Reset-After",
                "X-RateLimit-Bucket")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def post(fake: FakeDiscord, channel_id: str, content: str = "hi") -> tuple[int, object, dict[str, str]]:
    return await discord_rest(fake, "POST", f"/channels/{channel_id}/messages", json={"content": content})


async def test_channel_bucket_headers_and_429_shape(make_fake_discord, clock: FakeClock) -> None:
    fake = await make_fake_discord(clock=clock.now, limits=DiscordLimits(channel_messages=3, channel_window=10.0))
    ch = fake.default_channel.id
    remaining = []
    for _ in range(3):
        status, _, headers = await post(fake, ch)
        assert status == 200 and all(h in headers for h in RATE_HEADERS)
        assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Reset-After"] == "10.000"
        remaining.append(headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    await clock.advance(4.0)
    status, body, headers = await post(fake, ch)
    assert status == 429
    assert body == {"message": "You are being rate limited.", "retry_after": 6.0, "global": False}
    assert headers["Via"] == "1.1 google" and headers["Retry-After"] == "6"
    assert headers["X-RateLimit-Scope"] == "user" and headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-RateLimit-Reset-After"] == "6.000" and "X-RateLimit-Global" not in headers
    assert headers["Content-Type"] == "application/json"
    await clock.advance(6.0)
    status, _, headers = await post(fake, ch)
    assert status == 200 and headers["X-RateLimit-Remaining"] == "2"
    assert fake.count_429() == 1 and fake.count_429(SEND, channel_id=ch) == 1
    assert len(fake.bot_texts(ch)) == 4


async def test_limiter_allows_exactly_the_configured_rate_and_not_more(make_fake_discord, clock: FakeClock) -> None:
    limit, window = 5, 5.0
    fake = await make_fake_discord(clock=clock.now, limits=DiscordLimits(channel_messages=limit, channel_window=window))
    ch = fake.default_channel.id
    for _ in range(4 * limit):  # at exactly limit/window for four windows: never limited
        status, _, _ = await post(fake, ch)
        assert status == 200
        await clock.advance(window / limit)
    assert fake.count_429() == 0
    statuses = [(await post(fake, ch))[0] for _ in range(limit + 2)]  # a burst in one window
    assert statuses == [200] * limit + [429, 429]


async def test_buckets_are_per_channel_and_edits_count_separately_by_default(make_fake_discord,
                                                                              clock: FakeClock) -> None:
    fake = await make_fake_discord(clock=clock.now, limits=DiscordLimits(channel_messages=2, channel_window=5.0))
    a, b = fake.default_channel.id, fake.text_channel(name="other").id
    _, first, send_headers = await post(fake, a)
    await post(fake, a)
    assert (await post(fake, a))[0] == 429
    assert (await post(fake, b))[0] == 200  # another channel, another bucket
    status, _, edit_headers = await discord_rest(fake, "PATCH", f"/channels/{a}/messages/{first['id']}",
                                                 json={"content": "edited"})
    assert status == 200  # separate counter ...
    assert edit_headers["X-RateLimit-Bucket"] == send_headers["X-RateLimit-Bucket"]  # ... same hash (as observed)


async def test_edits_can_share_the_send_bucket(make_fake_discord, clock: FakeClock) -> None:
    fake = await make_fake_discord(clock=clock.now, limits=DiscordLimits(channel_messages=2, channel_window=5.0,
                                                                     edits_share_send_bucket=True))
    ch = fake.default_channel.id
    _, first, _ = await post(fake, ch)
    await post(fake, ch)
    status, body, _ = await discord_rest(fake, "PATCH", f"/channels/{ch}/messages/{first['id']}",
                                         json={"content": "edited"})
    assert status == 429 and body["global"] is False
    assert fake.count_429(EDIT) == 1 and fake.message(first["id"]).edits == []


async def test_global_limit_spares_interaction_routes(make_fake_discord, clock: FakeClock) -> None:
    fake = await make_fake_discord(clock=clock.now, limits=DiscordLimits(global_rate=3, channel_messages=100))
    channels = [fake.text_channel(name=f"c{i}").id for i in range(4)]
    statuses = [(await post(fake, c))[0] for c in channels[:3]]
    status, body, headers = await post(fake, channels[3])
    assert statuses == [200, 200, 200]
    assert status == 429 and body["global"] is True
    assert headers["X-RateLimit-Global"] == "true" and headers["X-RateLimit-Scope"] == "global"
    assert headers["Via"] == "1.1 google"
    rec = fake.user_runs_command(fake.default_channel, None, "ask")
    status, _, _ = await discord_rest(fake, "POST", f"/interactions/{rec.id}/{rec.token}/callback", auth=False,
                                      json={"type": 5})
    assert status == 204  # interaction callbacks are not subject to the global limit
    await clock.advance(1.0)
    assert (await post(fake, channels[3]))[0] == 200


async def test_disabled_limits_send_no_headers(make_fake_discord) -> None:
    fake = await make_fake_discord(limits=DiscordLimits(channel_messages=1, enabled=False))
    results = [await post(fake, fake.default_channel.id) for _ in range(3)]
    assert [s for s, _, _ in results] == [200, 200, 200]
    assert not any(h.startswith("X-RateLimit") for _, _, headers in results for h in headers)


# -- discord.py against the limits ---------------------------------------------------------------


def plain_client() -> discord.Client:
    return discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)


async def test_discord_py_paces_itself_from_the_headers(make_fake_discord) -> None:
    fake = await make_fake_discord(limits=DiscordLimits(channel_messages=2, channel_window=0.2))
    client = plain_client()
    async with running_client(fake, client):
        channel = client.get_channel(int(fake.default_channel.id))
        for i in range(6):
            await channel.send(f"m{i}")
    assert fake.bot_texts(fake.default_channel) == [f"m{i}" for i in range(6)]
    assert fake.count_429() == 0  # discord.py waited out each exhausted window itself


async def test_429_with_via_is_retried_and_the_message_arrives_once(fake_discord: FakeDiscord) -> None:
    client = plain_client()
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        inj = fake_discord.inject("429", route=SEND, retry_after=0.05)
        sent = await channel.send("only once")
    assert inj.hits == 1 and fake_discord.count_429(SEND) == 1
    assert fake_discord.bot_texts(fake_discord.default_channel) == ["only once"]
    attempts = fake_discord.calls_to(SEND)
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[0].json["nonce"] == attempts[1].json["nonce"] and str(sent.id) == fake_discord.messages(
        fake_discord.default_channel)[0].id


async def test_forced_global_429_is_retried(fake_discord: FakeDiscord) -> None:
    client = plain_client()
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        fake_discord.inject("429", route=SEND, retry_after=0.05, is_global=True)
        await channel.send("after the global pause")
    assert fake_discord.calls_to(SEND)[0].scope == "global"
    assert fake_discord.bot_texts(fake_discord.default_channel) == ["after the global pause"]


async def test_429_without_via_raises(fake_discord: FakeDiscord) -> None:
    client = plain_client()
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        fake_discord.inject("429_no_via", route=SEND)
        with pytest.raises(discord.HTTPException) as exc:
            await channel.send("blocked")
    assert exc.value.status == 429 and not isinstance(exc.value, discord.RateLimited)
    assert fake_discord.bot_texts(fake_discord.default_channel) == []
    assert fake_discord.count_429() == 1


async def test_long_retry_after_becomes_rate_limited_with_max_ratelimit_timeout(fake_discord: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05, max_ratelimit_timeout=30.0)
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        fake_discord.inject("429", route=SEND, retry_after=64.57)
        with pytest.raises(discord.RateLimited) as exc:
            await channel.send("later")
    assert exc.value.retry_after == pytest.approx(64.57)


async def test_5xx_injection(fake_discord: FakeDiscord) -> None:
    client = plain_client()
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        fake_discord.inject("5xx", route=SEND, status=503)
        with pytest.raises(discord.DiscordServerError):
            await channel.send("not retried")
        fake_discord.inject("5xx", route=SEND, status=500)
        await channel.send("retried once")  # discord.py sleeps 1 s and retries 500/502/504/524
    assert [c.status for c in fake_discord.calls_to(SEND)] == [503, 500, 200]
    assert fake_discord.bot_texts(fake_discord.default_channel) == ["retried once"]


async def test_drop_timeout_and_lost_response(fake_discord: FakeDiscord) -> None:
    ch = fake_discord.default_channel.id
    fake_discord.inject("drop", route=SEND)
    with pytest.raises(aiohttp.ClientError):
        await post(fake_discord, ch, "dropped")
    fake_discord.inject("drop_after_apply", route=SEND)
    with pytest.raises(aiohttp.ClientError):
        await post(fake_discord, ch, "delivered, answer lost")
    timeout = fake_discord.inject("timeout", route=SEND)
    with pytest.raises(asyncio.TimeoutError):
        await discord_rest(fake_discord, "POST", f"/channels/{ch}/messages", json={"content": "held"}, timeout=0.2)
    fake_discord.inject("timeout_after_apply", route=SEND)
    with pytest.raises(asyncio.TimeoutError):
        await discord_rest(fake_discord, "POST", f"/channels/{ch}/messages", json={"content": "slow but there"},
                           timeout=0.2)
    assert timeout.hits == 1
    assert fake_discord.bot_texts(ch) == ["delivered, answer lost", "slow but there"]
    status, _, _ = await post(fake_discord, ch, "normal again")
    assert status == 200
    assert [c.injected for c in fake_discord.calls_to(SEND)] == [
        "drop", "drop_after_apply", "timeout", "timeout_after_apply", None]
    assert [c.status for c in fake_discord.calls_to(SEND)][:2] == [None, None]  # never answered


async def test_injection_filters_and_windows(make_fake_discord, clock: FakeClock) -> None:
    fake = await make_fake_discord(clock=clock.now)
    other = fake.text_channel(name="other").id
    inj = fake.inject("5xx", method="POST", route="/channels/{channel_id}/messages", channel_id=other, times=None,
                      start=1.0, end=2.0, status=503)
    assert (await post(fake, other))[0] == 200  # before the window
    await clock.advance(1.5)
    assert (await post(fake, fake.default_channel.id))[0] == 200  # other channel
    assert (await post(fake, other))[0] == 503
    assert (await post(fake, other))[0] == 503  # times=None: every matching call
    await clock.advance(1.0)
    assert (await post(fake, other))[0] == 200  # after the window
    assert inj.hits == 2


async def test_callback_route_key_and_latency_knob(make_fake_discord) -> None:
    fake = await make_fake_discord(latency=0.02)
    rec = fake.user_runs_command(fake.default_channel, None, "x")
    await discord_rest(fake, "POST", f"/interactions/{rec.id}/{rec.token}/callback", auth=False, json={"type": 5})
    call = fake.calls_to(CALLBACK)[0]
    assert call.status == 204 and call.t_responded - call.t_received >= 0.015
