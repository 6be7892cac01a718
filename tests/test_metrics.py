"""/healthz, /readyz and /metrics of a running gateway (real App, real connectors, fakes).

The App runs in the test process (the `parley` fixture) with `metrics.listen` on a free
127.0.0.1 port; the endpoints are scraped over HTTP like Prometheus would.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp

from tests.fakes.discord import EDIT
from tests.fakes.llm import Reply
from tests.support.stack import OWNER_DC, OWNER_TG

METRICS = {"metrics": {"listen": "127.0.0.1:0"}}


async def get(p: Any, path: str) -> tuple[int, str, str]:
    port = p.app.health.port
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        out[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return out


def value(text: str, name: str, **labels: str) -> float:
    """A sample's value, or the sum over the samples matching `labels` (0 when absent)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and wanted <= ls)


async def scrape(p: Any) -> str:
    status, content_type, text = await get(p, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return text


async def test_health_endpoints_follow_the_gateway(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram, overrides=METRICS)
    assert (await get(p, "/healthz"))[::2] == (200, "ok\n")
    status, _, body = await get(p, "/readyz")
    assert (status, json.loads(body)) == (
        200, {"ready": True, "checks": {"telegram": True, "store": True, "accepting": True}}
    )
    # The store stops answering: not ready, and the body says which check failed.
    await p.app.store.close()
    status, _, body = await get(p, "/readyz")
    assert (status, json.loads(body)["checks"]["store"]) == (503, False)
    assert (await get(p, "/healthz"))[0] == 200  # still alive: liveness is not readiness


async def test_metrics_count_messages_turns_latencies_calls_429s_fallbacks_and_tokens(
    fast_telegram, fast_discord, fake_llm, parley
) -> None:
    p = await parley(telegram=fast_telegram, discord=fast_discord, overrides=METRICS)
    tg_owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(tg_owner)
    dc_owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(dc_owner)

    # Telegram: the stream breaks and the fallback answers; one edit meets a 429.
    answer = "An answer long enough to be streamed in several edits, then finished by the fallback."
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.02, fault="midstream_error"))
    fast_telegram.inject("429", method="editMessageText", chat_id=chat.id, times=1, retry_after=1)
    fast_telegram.user_says(chat, tg_owner, "hello")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [answer], timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")
    # Discord: a streamed turn whose edits meet a 429 that discord.py sleeps through, then
    # a Cloudflare-style one that surfaces: each is counted once.
    dc_answer = "A Discord answer, streamed in enough pieces to need several edits."
    fake_llm.script(Reply.text(dc_answer, chunk=5, delay=0.03))
    fast_discord.inject("429", route=EDIT, channel_id=channel.id, times=1, retry_after=0.1)
    fast_discord.inject("429_no_via", route=EDIT, channel_id=channel.id, times=1)
    fast_discord.user_says(channel, dc_owner, "hello")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == [dc_answer], timeout=15)
    await p.gateway.settle(f"discord:{channel.id}")

    text = await scrape(p)
    assert value(text, "parley_messages_received_total", platform="telegram") == 1
    assert value(text, "parley_messages_received_total", platform="discord") == 1
    assert value(text, "parley_turns_total", platform="telegram", outcome="fell_back") == 1
    assert value(text, "parley_turns_total", platform="discord", outcome="ok") == 1
    assert value(text, "parley_fallbacks_total") == 1
    assert value(text, "parley_time_to_first_token_seconds_count") == 2
    assert value(text, "parley_time_to_first_visible_seconds_count", platform="telegram") == 1
    assert value(text, "parley_time_to_first_visible_seconds_count", platform="discord") == 1
    # Every call parley made counts, the one answered 429 included.
    tg_edits = fast_telegram.calls_to("editMessageText", chat_id=chat.id)
    assert len(tg_edits) >= 2
    assert value(text, "parley_platform_calls_total", platform="telegram", kind="edit") == len(tg_edits)
    assert value(text, "parley_platform_calls_total", platform="telegram", kind="send") == 1
    assert value(text, "parley_platform_calls_total", platform="discord", kind="send") == 1
    assert value(text, "parley_rate_limited_total", platform="telegram") == fast_telegram.count_429() == 1
    assert value(text, "parley_rate_limited_total", platform="discord") == fast_discord.count_429() == 2
    assert value(text, "parley_tokens_total", model="fake-model", kind="prompt") > 0
    assert value(text, "parley_tokens_total", model="fake-model", kind="completion") > 0
    assert value(text, "parley_active_turns") == 0
    assert value(text, "parley_queue_depth") == 0


async def test_gauges_and_the_interrupted_and_error_outcomes(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram, overrides=METRICS)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    gate = asyncio.Event()
    try:
        fake_llm.script(Reply.text("Held here, then stopped.", chunk=8, hold=gate, hold_at=1))
        fast_telegram.user_says(chat, owner, "first")
        await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Held her"], timeout=15)
        fast_telegram.user_says(chat, owner, "second, while the first runs")
        await fast_telegram.wait_for(lambda: any("⏳" in t for t in fast_telegram.bot_texts(chat.id)), timeout=15)
        text = await scrape(p)
        assert (value(text, "parley_active_turns"), value(text, "parley_queue_depth")) == (1, 1)

        fast_telegram.user_says(chat, owner, "/stop")  # stops the turn and drops the queue
        await fast_telegram.wait_for(lambda: any("stopped" in t for t in fast_telegram.bot_texts(chat.id)), timeout=15)
        await p.gateway.settle(f"telegram:{chat.id}")
    finally:
        gate.set()

    fake_llm.script(Reply.text("Never finished", chunk=4, fault="abort_midstream+nonstream_500"))
    fast_telegram.user_says(chat, owner, "third")
    await fast_telegram.wait_for(lambda: any("⚠️" in t for t in fast_telegram.bot_texts(chat.id)), timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")

    text = await scrape(p)
    assert value(text, "parley_turns_total", platform="telegram", outcome="interrupted") == 1
    assert value(text, "parley_turns_total", platform="telegram", outcome="error") == 1
    assert value(text, "parley_messages_received_total", platform="telegram") == 4
    assert (value(text, "parley_active_turns"), value(text, "parley_queue_depth")) == (0, 0)
