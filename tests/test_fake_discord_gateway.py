"""The fake Discord Gateway: RESUME after disconnects, invalid sessions, reconnect, zlib-stream."""

from __future__ import annotations

import json
import zlib

import aiohttp
import discord

from tests.fakes.discord import FakeDiscord
from tests.fakes.discord_fixtures import running_client


class QuickReidentifyClient(discord.Client):
    """discord.py sleeps 5 s before every non-initial IDENTIFY (Discord's identify limit);
    its documented hook lets a test skip that wait."""

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None


def listening_client() -> tuple[discord.Client, list[str], list[str]]:
    """A bot that records the content of every message and every (re)connection event."""
    intents = discord.Intents.default()
    intents.message_content = True
    client = QuickReidentifyClient(intents=intents, guild_ready_timeout=0.05)
    contents: list[str] = []
    events: list[str] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        contents.append(message.content)

    @client.event
    async def on_resumed() -> None:
        events.append("resumed")

    @client.event
    async def on_ready() -> None:
        events.append("ready")

    return client, contents, events


async def test_resume_after_disconnect_replays_missed_events(fake_discord: FakeDiscord) -> None:
    client, contents, events = listening_client()
    async with running_client(fake_discord, client):
        session = await fake_discord.wait_ready()
        fake_discord.user_says(fake_discord.default_channel, None, "before")
        await fake_discord.wait_for(lambda: contents == ["before"])

        await fake_discord.disconnect_gateway(code=4000, hold=True)
        await fake_discord.wait_for(lambda: not session.connected)
        fake_discord.user_says(fake_discord.default_channel, None, "while away 1")
        fake_discord.user_says(fake_discord.dm_channel(None), None, "while away 2")
        assert contents == ["before"]
        fake_discord.release_gateway()

        await fake_discord.wait_for(lambda: len(contents) == 3 and "resumed" in events)
        assert contents == ["before", "while away 1", "while away 2"]
        assert session.resumes == 1 and session.replayed == 2
        assert len(fake_discord.sessions) == 1 and events.count("ready") == 1  # resumed, not re-identified
        fake_discord.user_says(fake_discord.default_channel, None, "after")
        await fake_discord.wait_for(lambda: contents[-1:] == ["after"])
    resume = [d for _, what, d in fake_discord.gateway_log if what == "resume"]
    assert resume and resume[0]["session_id"] == session.id and resume[0]["seq"] >= 1


async def test_invalid_session_makes_the_bot_identify_again(fake_discord: FakeDiscord) -> None:
    client, contents, events = listening_client()
    async with running_client(fake_discord, client):
        first = await fake_discord.wait_ready()
        await fake_discord.invalidate_session(resumable=False)
        await fake_discord.wait_for(lambda: len(fake_discord.sessions) == 2 and fake_discord.sessions[1].ready)
        assert first.closed and first.resumes == 0
        fake_discord.user_says(fake_discord.default_channel, None, "new session")
        await fake_discord.wait_for(lambda: contents == ["new session"])
        await fake_discord.wait_for(lambda: events.count("ready") == 2)


async def test_reconnect_opcode_and_unresumable_close_codes(fake_discord: FakeDiscord) -> None:
    client, contents, events = listening_client()
    async with running_client(fake_discord, client):
        session = await fake_discord.wait_ready()
        await fake_discord.request_reconnect()
        await fake_discord.wait_for(lambda: session.resumes == 1 and "resumed" in events)
        await fake_discord.disconnect_gateway(code=4009)  # session timed out: RESUME → op 9 → IDENTIFY
        await fake_discord.wait_for(lambda: len(fake_discord.sessions) == 2 and fake_discord.sessions[1].ready)
        fake_discord.user_says(fake_discord.default_channel, None, "still here")
        await fake_discord.wait_for(lambda: contents == ["still here"])


async def test_a_closed_bot_leaves_a_resumable_session_and_a_new_bot_gets_its_own(fake_discord: FakeDiscord) -> None:
    client, _, _ = listening_client()
    async with running_client(fake_discord, client):
        first = await fake_discord.wait_ready()
    # discord.py's close races its own reader and usually sends 4000, which keeps the session
    # resumable, as on Discord: events queue up for a RESUME that never comes.
    await fake_discord.wait_for(lambda: not first.connected)
    client2, contents, _ = listening_client()
    async with running_client(fake_discord, client2):
        second = await fake_discord.wait_ready()
        assert second is not first and second.connected
        fake_discord.user_says(fake_discord.default_channel, None, "to the new bot")
        await fake_discord.wait_for(lambda: contents == ["to the new bot"])
    assert len(fake_discord.sessions) == 2


async def test_world_changes_after_ready_are_dispatched(fake_discord: FakeDiscord) -> None:
    client, contents, _ = listening_client()
    async with running_client(fake_discord, client):
        guild = fake_discord.guild("Second")
        channel = fake_discord.text_channel(guild, "random")
        thread = fake_discord.thread(channel, "side talk")
        await fake_discord.wait_for(lambda: client.get_channel(int(channel.id)) is not None
                                    and client.get_channel(int(thread.id)) is not None)
        assert client.get_guild(int(guild.id)).name == "Second"
        fake_discord.user_says(thread, None, "in the new thread")
        await fake_discord.wait_for(lambda: contents == ["in the new thread"])


async def test_zlib_stream_transport(make_fake_discord) -> None:
    fake = await make_fake_discord(gateway_zlib=True)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(fake.gateway_url + "?v=10&encoding=json&compress=zlib-stream") as ws:
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data.endswith(b"\x00\x00\xff\xff")
            inflate = zlib.decompressobj()
            assert json.loads(inflate.decompress(msg.data))["op"] == 10
            await ws.send_json({"op": 1, "d": None})
            ack = await ws.receive(timeout=5)
            assert json.loads(inflate.decompress(ack.data))["op"] == 11
    client, contents, _ = listening_client()  # discord.py asks for zlib-stream and inflates it
    async with running_client(fake, client):
        fake.user_says(fake.default_channel, None, "compressed")
        await fake.wait_for(lambda: contents == ["compressed"])


async def test_raw_handshake_frames(fake_discord: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(fake_discord.gateway_url + "?v=10&encoding=json&compress=zlib-stream") as ws:
            hello = await ws.receive(timeout=5)
            assert hello.type == aiohttp.WSMsgType.TEXT  # plain text unless gateway_zlib is on
            await ws.send_json({"op": 2, "d": {"token": fake_discord.token, "intents": 1 | 1 << 9,
                                               "properties": {"os": "linux"}}})
            ready = await ws.receive_json(timeout=5)
            assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
            assert ready["d"]["resume_gateway_url"] == fake_discord.gateway_url
            assert ready["d"]["guilds"] == [{"id": fake_discord.default_guild.id, "unavailable": True}]
            guild = await ws.receive_json(timeout=5)
            assert (guild["t"], guild["s"]) == ("GUILD_CREATE", 2)
            assert guild["d"]["member_count"] == len(guild["d"]["members"])
            fake_discord.user_says(fake_discord.default_channel, None, "hidden")
            msg = await ws.receive_json(timeout=5)
            assert msg["t"] == "MESSAGE_CREATE" and msg["s"] == 3
            assert msg["d"]["content"] == ""  # MESSAGE_CONTENT not requested
            assert set(msg["d"]["member"]) >= {"roles", "flags"}
            await ws.send_json({"op": 8, "d": {"guild_id": fake_discord.default_guild.id, "query": "",
                                               "limit": 0, "nonce": "n1"}})
            chunk = await ws.receive_json(timeout=5)
            assert chunk["t"] == "GUILD_MEMBERS_CHUNK" and chunk["d"]["nonce"] == "n1"
