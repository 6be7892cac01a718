"""The fake Discord, driven by the real discord.py: login, messages, intents, errors, control API."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import aiohttp
import discord
import pytest

from bots.discord_endpoints import (
    DEFAULT_API_BASE,
    DEFAULT_GATEWAY_URL,
    current_discord_endpoints,
    point_discord_at,
)
from bots.errors import ConfigError
from tests.fakes.discord import SEND, DiscordLimits, FakeDiscord, Intents, SeenMessage, snowflake_time
from tests.fakes.discord_fixtures import discord_rest, running_client

REPO = Path(__file__).resolve().parents[1]


def record(client: discord.Client, event: str, bucket: list, key=lambda *args: args[0]) -> None:
    """Register an event handler on `client` that appends `key(*args)` to `bucket`."""

    async def handler(*args: object) -> None:
        bucket.append(key(*args))

    handler.__name__ = event
    client.event(handler)


def echo_client(*, message_content: bool = True, members: bool = False) -> tuple[discord.Client, list[discord.Message]]:
    """A discord.py bot that records every message it sees and echoes people's messages."""
    intents = discord.Intents.default()
    intents.message_content = message_content
    intents.members = members
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    seen: list[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message)
        if message.author == client.user:
            return  # the fake echoes the bot's own messages, like Discord
        await message.channel.send(f"echo: {message.content}")

    return client, seen


# -- pointing discord.py at an endpoint --------------------------------------------------


def test_point_discord_at_sets_both_endpoints_and_is_idempotent() -> None:
    previous = current_discord_endpoints()
    try:
        point_discord_at("http://127.0.0.1:9/api/v10/", "ws://127.0.0.1:9/gateway")
        point_discord_at("http://127.0.0.1:9/api/v10/", "ws://127.0.0.1:9/gateway")
        assert current_discord_endpoints() == ("http://127.0.0.1:9/api/v10", "ws://127.0.0.1:9/gateway")
        assert discord.http.Route("GET", "/users/@me").url == "http://127.0.0.1:9/api/v10/users/@me"
        point_discord_at(DEFAULT_API_BASE, DEFAULT_GATEWAY_URL)
        assert current_discord_endpoints() == (DEFAULT_API_BASE, DEFAULT_GATEWAY_URL)
    finally:
        point_discord_at(*previous)


@pytest.mark.parametrize(
    ("api_base", "gateway_url"),
    [("ftp://x/api/v10", "ws://x/gateway"), ("http:///api", "ws://x/"), ("http://x/api/v10", "http://x/gw"),
     ("http://x/api/v10", "ws://x/gw?v=10")],
)
def test_point_discord_at_rejects_bad_urls(api_base: str, gateway_url: str) -> None:
    previous = current_discord_endpoints()
    with pytest.raises(ConfigError):
        point_discord_at(api_base, gateway_url)
    assert current_discord_endpoints() == previous


# -- login and the Gateway handshake ----------------------------------------------------------


async def test_login_and_ready_with_guild_channels_and_threads(fake_discord: FakeDiscord) -> None:
    thread = fake_discord.thread(fake_discord.default_channel, "existing thread")
    client, _ = echo_client(members=True)  # members intent: chunking would stall on_ready for 5 s
    async with running_client(fake_discord, client, timeout=3.0):
        assert client.user is not None and str(client.user.id) == fake_discord.bot_user.id
        assert str(client.application_id) == fake_discord.application_id
        guild = client.get_guild(int(fake_discord.default_guild.id))
        assert guild is not None and guild.chunked
        assert str(guild.get_channel(int(fake_discord.default_channel.id))) == "general"
        assert guild.get_thread(int(thread.id)) is not None
        session = await fake_discord.wait_ready()
        assert session.intents & Intents.MESSAGE_CONTENT and session.intents & Intents.GUILD_MEMBERS
    assert not any(what == "op8" for _, what, _ in fake_discord.gateway_log)  # never asked for chunks
    assert [c.route for c in fake_discord.calls[:2]] == ["GET /users/@me", "GET /oauth2/applications/@me"]


async def test_wrong_token_is_a_login_failure(fake_discord: FakeDiscord) -> None:
    client, _ = echo_client()
    with pytest.raises(discord.LoginFailure):
        async with running_client(fake_discord, client, token="not-the-token"):
            pass
    assert fake_discord.calls[0].status == 401


async def test_identify_with_wrong_token_closes_4004(fake_discord: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(fake_discord.gateway_url + "?v=10&encoding=json") as ws:
            hello = await ws.receive_json(timeout=5)
            assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] > 0
            await ws.send_json({"op": 1, "d": None})
            assert (await ws.receive_json(timeout=5))["op"] == 11
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 513, "properties": {}}})
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4004


async def test_privileged_intent_not_granted_closes_4014(make_fake_discord) -> None:
    fake = await make_fake_discord(privileged_intents=0)
    client, _ = echo_client(message_content=True)
    with pytest.raises(discord.PrivilegedIntentsRequired):
        async with running_client(fake, client, timeout=5.0):
            pass


# -- messages round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["guild", "thread", "dm"])
async def test_echo_bot_round_trip(fake_discord: FakeDiscord, where: str) -> None:
    client, seen = echo_client()
    async with running_client(fake_discord, client):
        channel = {
            "guild": lambda: fake_discord.default_channel,
            "thread": lambda: fake_discord.thread(fake_discord.default_channel, "t"),
            "dm": lambda: fake_discord.dm_channel(fake_discord.default_user),
        }[where]()
        said = fake_discord.user_says(channel, fake_discord.default_user, "hello")
        await fake_discord.wait_for(lambda: fake_discord.bot_texts(channel) == ["echo: hello"])
        # The bot saw the person's message in the right channel type, then its own echo.
        await fake_discord.wait_for(lambda: len(seen) == 2)
        expected = {"guild": discord.TextChannel, "thread": discord.Thread, "dm": discord.DMChannel}[where]
        assert isinstance(seen[0].channel, expected)
        assert str(seen[0].id) == said["id"] and seen[0].content == "hello"
        assert seen[1].author == client.user and seen[1].content == "echo: hello"
        if where != "dm":
            assert isinstance(seen[0].author, discord.Member)
    msgs = fake_discord.messages(channel)
    assert [(m.from_bot, m.content) for m in msgs] == [(False, "hello"), (True, "echo: hello")]
    assert int(msgs[0].id) < int(msgs[1].id)
    assert abs(snowflake_time(msgs[1].id) - msgs[1].created_wall) < 1.0
    send = fake_discord.calls_to(SEND, channel_id=channel.id)
    assert len(send) == 1 and send[0].json["content"] == "echo: hello" and send[0].json["enforce_nonce"] is True


async def test_message_content_intent_rules(fake_discord: FakeDiscord) -> None:
    client, seen = echo_client(message_content=False)
    async with running_client(fake_discord, client):
        ch = fake_discord.default_channel
        fake_discord.user_says(ch, None, "plain guild message")
        fake_discord.user_says(ch, None, "hey bot", mentions_bot=True)
        fake_discord.user_says(fake_discord.dm_channel(None), None, "private")
        await fake_discord.wait_for(lambda: len([m for m in seen if m.author != client.user]) == 3)
    people = [m for m in seen if m.author != client.user]
    assert people[0].content == ""  # no MESSAGE_CONTENT intent: stripped
    assert people[1].content == f"<@{fake_discord.bot_user.id}> hey bot" and client.user in people[1].mentions
    assert people[2].content == "private"  # DMs always carry content
    assert all(m.content.startswith("echo: ") for m in seen if m.author == client.user)  # own messages


async def test_replies_carry_reference_and_count_as_mention(fake_discord: FakeDiscord) -> None:
    intents = discord.Intents.default()  # no message_content
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    got: list[discord.Message] = []
    record(client, "on_message", got)
    async with running_client(fake_discord, client):
        ch = fake_discord.default_channel
        bot_msg = await client.get_channel(int(ch.id)).send("question?")
        said = fake_discord.user_says(ch, None, "an answer", reply_to=bot_msg.id)
        await fake_discord.wait_for(lambda: any(str(m.id) == said["id"] for m in got))
        reply = next(m for m in got if str(m.id) == said["id"])
        assert reply.content == "an answer"  # replying to the bot pings it: content visible
        assert reply.reference is not None and reply.reference.message_id == bot_msg.id
        assert isinstance(reply.reference.resolved, discord.Message)
        answer = await reply.reply("thanks")
    seen = fake_discord.message(answer.id)
    assert seen.reference == said["id"] and seen.content == "thanks"


async def test_bot_edits_and_deletes_are_recorded_and_echoed(fake_discord: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    edits: list[discord.RawMessageUpdateEvent] = []
    deletes: list[discord.RawMessageDeleteEvent] = []
    record(client, "on_raw_message_edit", edits)
    record(client, "on_raw_message_delete", deletes)
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        msg = await channel.send("draft")
        await msg.edit(content="draft, longer")
        edited = await msg.edit(content="final")
        assert edited.edited_at is not None
        async with channel.typing():
            pass
        await msg.delete()
        await fake_discord.wait_for(lambda: len(edits) == 2 and len(deletes) == 1)
    seen = fake_discord.message(msg.id)
    assert seen.versions == ["draft", "draft, longer", "final"]
    assert [text for _, text in seen.edits] == ["draft, longer", "final"]
    assert seen.deleted and fake_discord.bot_texts(fake_discord.default_channel) == []
    assert len(fake_discord.typing_events(fake_discord.default_channel)) == 1


async def test_user_edits_deletes_and_redelivery_reach_the_bot(fake_discord: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    created: list[int] = []
    deleted: list[int] = []
    edited: list[int] = []
    record(client, "on_message", created, lambda m: m.id)
    record(client, "on_raw_message_delete", deleted, lambda p: p.message_id)
    record(client, "on_raw_message_edit", edited, lambda p: p.message_id)
    async with running_client(fake_discord, client):
        ch = fake_discord.default_channel
        msg = fake_discord.user_says(ch, None, "once")
        fake_discord.redeliver(msg["id"])
        await fake_discord.wait_for(lambda: len(created) == 2)
        assert created[0] == created[1] == int(msg["id"])  # same id twice: de-dup is the bot's job
        fake_discord.user_edits(ch, msg["id"], "once more")
        fake_discord.user_deletes(ch, msg["id"])
        await fake_discord.wait_for(lambda: deleted == [int(msg["id"])] and edited == [int(msg["id"])])
    assert fake_discord.message(msg["id"]).deleted


# -- errors, through discord.py ----------------------------------------------------------------------


async def test_errors_have_the_real_codes(make_fake_discord) -> None:
    # Failed calls count against the channel bucket too; room for all of them in one window.
    fake_discord = await make_fake_discord(limits=DiscordLimits(channel_messages=50))
    client, seen = echo_client()
    async with running_client(fake_discord, client):
        ch = fake_discord.default_channel
        channel = client.get_channel(int(ch.id))

        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        assert too_long.value.status == 400 and too_long.value.code == 50035
        assert "Must be 2000 or fewer in length." in str(too_long.value)
        assert "In content" in str(too_long.value)
        ok = await channel.send("😀" * 2000)  # 2000 code points (4000 UTF-16 units) is fine
        assert len(ok.content) == 2000
        with pytest.raises(discord.HTTPException) as too_long_edit:
            await ok.edit(content="y" * 2001)
        assert too_long_edit.value.code == 50035

        with pytest.raises(discord.HTTPException) as empty:
            await channel.send("")
        assert empty.value.status == 400 and empty.value.code == 50006
        assert "Cannot send an empty message" in str(empty.value)

        with pytest.raises(discord.NotFound) as unknown_msg:
            await channel.get_partial_message(12345).edit(content="nope")
        assert unknown_msg.value.code == 10008 and "Unknown Message" in str(unknown_msg.value)
        with pytest.raises(discord.NotFound) as unknown_del:
            await channel.get_partial_message(12345).delete()
        assert unknown_del.value.code == 10008

        with pytest.raises(discord.NotFound) as unknown_channel:
            await client.get_partial_messageable(424242).send("hello?")
        assert unknown_channel.value.code == 10003

        fake_discord.user_says(ch, None, "mine")
        await fake_discord.wait_for(lambda: any(m.content == "mine" for m in seen))
        theirs = next(m for m in seen if m.content == "mine")
        with pytest.raises(discord.Forbidden) as not_author:
            await theirs.edit(content="hijacked")
        assert not_author.value.code == 50005
        assert "Cannot edit a message authored by another user" in str(not_author.value)

        with pytest.raises(discord.HTTPException) as bad_reply:
            await channel.send("re", reference=discord.MessageReference(message_id=1, channel_id=int(ch.id)))
        assert bad_reply.value.code == 50035

        fake_discord.revoke_send(ch)
        with pytest.raises(discord.Forbidden) as no_perm:
            await channel.send("let me in")
        assert no_perm.value.code == 50013
    assert fake_discord.message(theirs.id).content == "mine"


async def test_error_bodies_on_the_wire(fake_discord: FakeDiscord) -> None:
    ch = fake_discord.default_channel.id
    status, body, headers = await discord_rest(fake_discord, "POST", f"/channels/{ch}/messages",
                                               json={"content": "z" * 2001})
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert body == {"message": "Invalid Form Body", "code": 50035, "errors": {"content": {"_errors": [
        {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}}
    status, body, _ = await discord_rest(fake_discord, "PATCH", f"/channels/{ch}/messages/1", json={"content": "a"})
    assert (status, body) == (404, {"message": "Unknown Message", "code": 10008})
    status, body, _ = await discord_rest(fake_discord, "GET", "/users/@me", token="bad")
    assert (status, body["code"]) == (401, 0)
    status, body, _ = await discord_rest(fake_discord, "GET", "/no/such/route")
    assert status == 404 and fake_discord.unhandled[-1].path == "/no/such/route"


async def test_nonce_enforcement_deduplicates_sends(fake_discord: FakeDiscord) -> None:
    path = f"/channels/{fake_discord.default_channel.id}/messages"
    payload = {"content": "exactly once", "nonce": "1234567890", "enforce_nonce": True}
    _, first, _ = await discord_rest(fake_discord, "POST", path, json=payload)
    _, again, _ = await discord_rest(fake_discord, "POST", path, json=payload)
    assert first["id"] == again["id"]
    _, third, _ = await discord_rest(fake_discord, "POST", path, json=dict(payload, enforce_nonce=False))
    assert third["id"] != first["id"]
    assert fake_discord.bot_texts(fake_discord.default_channel) == ["exactly once", "exactly once"]


# -- waiting ---------------------------------------------------------------------------------------------


async def test_wait_for_times_out_with_a_useful_message(fake_discord: FakeDiscord) -> None:
    with pytest.raises(TimeoutError, match="the bot replied.*messages per channel"):
        await fake_discord.wait_for(lambda: fake_discord.bot_texts(fake_discord.default_channel), 0.05,
                                    what="the bot replied")


async def test_wait_for_wakes_on_state_change(fake_discord: FakeDiscord) -> None:
    waiter = asyncio.create_task(
        fake_discord.wait_for(lambda: fake_discord.messages(fake_discord.default_channel), 2.0))
    await asyncio.sleep(0)  # one loop turn: the waiter has checked once and is now waiting
    assert not waiter.done()
    fake_discord.user_says(fake_discord.default_channel, None, "now")
    msgs = await waiter
    assert isinstance(msgs[0], SeenMessage) and msgs[0].content == "now"


# -- cross-process control ----------------------------------------------------------------------------


async def test_control_endpoints_drive_a_bot(fake_discord: FakeDiscord) -> None:
    client, _ = echo_client()
    async with running_client(fake_discord, client), aiohttp.ClientSession(fake_discord.base_url) as http:
        async with http.get("/_fake/world") as r:
            world = await r.json()
        ch = world["default_channel_id"]
        async with http.post("/_fake/user_says", json={"channel_id": ch, "content": "from afar"}) as r:
            assert r.status == 200 and (await r.json())["content"] == "from afar"
        await fake_discord.wait_for(lambda: fake_discord.bot_texts(ch) == ["echo: from afar"])
        async with http.get("/_fake/messages", params={"channel_id": ch}) as r:
            assert [m["content"] for m in await r.json()] == ["from afar", "echo: from afar"]
        async with http.post("/_fake/config", json={"latency": 0.01, "limits": {"channel_messages": 7}}) as r:
            assert (await r.json())["limits"]["channel_messages"] == 7
        assert fake_discord.latency == 0.01 and fake_discord.limits.channel_messages == 7
        async with http.get("/_fake/stats") as r:
            stats = await r.json()
        assert stats["by_route"][SEND]["200"] == 1 and stats["count_429"] == 0
        async with http.get("/_fake/calls", params={"since": 2}) as r:
            assert (await r.json())[0]["route"] == SEND
        async with http.post("/_fake/text_channel", json={"name": "bench"}) as r:
            created = await r.json()
        assert created["name"] == "bench" and created["guild_id"] == fake_discord.default_guild.id
        assert fake_discord.bot_texts(created["id"]) == []  # a channel of its own, fresh buckets
        async with http.post("/_fake/reset") as r:
            assert r.status == 200
        assert fake_discord.messages(ch) == [] and fake_discord.calls == []


async def test_standalone_cli_serves_the_fake() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.discord", "--port", "0", "--latency", "0.001",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("api_base=http://127.0.0.1:")
        api_base = line.strip().split("=", 1)[1]
        base = api_base.rsplit("/api/v10", 1)[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/_fake/world") as r:
                world = json.loads(await r.text())
            async with http.get(api_base + "/users/@me", headers={"Authorization": f"Bot {world['token']}"}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        assert world["gateway_url"].startswith("ws://127.0.0.1:")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_fetches_files_reactions_and_dms_opened_by_the_bot(fake_discord: FakeDiscord) -> None:
    client, _ = echo_client()
    async with running_client(fake_discord, client):
        channel = await client.fetch_channel(int(fake_discord.default_channel.id))
        assert isinstance(channel, discord.TextChannel) and channel.name == "general"
        sent = await channel.send("see attached", file=discord.File(io.BytesIO(b"hello"), "a.txt"))
        assert [a.filename for a in sent.attachments] == ["a.txt"]
        fetched = await channel.fetch_message(sent.id)
        assert fetched.content == "see attached"
        await fetched.add_reaction("👍")
        history = [m.content async for m in channel.history(limit=10)]
        assert history == ["see attached"]
        dm = await client.create_dm(discord.Object(int(fake_discord.default_user.id)))
        await dm.send("psst")
    assert fake_discord.dm_channel(fake_discord.default_user).id == str(dm.id)
    assert fake_discord.bot_texts(dm.id) == ["psst"]
    seen = fake_discord.message(sent.id)
    assert seen.attachments[0]["filename"] == "a.txt" and seen.attachments[0]["size"] == 5
    assert seen.reactions == ["👍"]
