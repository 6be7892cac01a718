"""Slash commands and components against the fake Discord, driven by discord.py's CommandTree."""

from __future__ import annotations

import asyncio

import discord
import pytest
from discord import app_commands

from tests.fakes.discord import CALLBACK, ORIGINAL_EDIT, FakeDiscord
from tests.fakes.discord_fixtures import discord_rest, running_client
from tests.support.fakeclock import FakeClock


def command_bot() -> tuple[discord.Client, app_commands.CommandTree, list[BaseException]]:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    tree = app_commands.CommandTree(client)
    errors: list[BaseException] = []
    return client, tree, errors


async def test_sync_registers_commands_and_options_get_their_types(fake_discord: FakeDiscord) -> None:
    client, tree, _ = command_bot()
    got: list[tuple[str, int, bool]] = []

    @tree.command(name="ask", description="Ask the agent")
    async def ask(interaction: discord.Interaction, q: str, n: int = 1, loud: bool = False) -> None:
        got.append((q, n, loud))
        await interaction.response.send_message(f"{q} x{n}")

    async with running_client(fake_discord, client):
        synced = await tree.sync()
        assert [c.name for c in synced] == ["ask"]
        registered = fake_discord.commands()[0]
        assert registered["id"] == str(synced[0].id) and registered["application_id"] == fake_discord.application_id
        guild = discord.Object(int(fake_discord.default_guild.id))
        tree.copy_global_to(guild=guild)
        assert [c.name for c in await tree.sync(guild=guild)] == ["ask"]

        rec = fake_discord.user_runs_command(fake_discord.default_channel, None, "ask", {"q": "why", "n": 3})
        await fake_discord.wait_for(lambda: rec.original is not None)
    assert got == [("why", 3, False)]
    assert [o["type"] for o in rec.payload["data"]["options"]] == [3, 4]
    assert rec.payload["data"]["guild_id"] == fake_discord.default_guild.id  # guild command wins
    assert rec.response_type == 4 and rec.original.content == "why x3"


async def test_defer_then_stream_by_editing_the_original(fake_discord: FakeDiscord) -> None:
    client, tree, errors = command_bot()

    @tree.command(name="chat", description="Talk")
    async def chat(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer(thinking=True)
        text = ""
        for word in prompt.split():
            text += word + " "
            await interaction.edit_original_response(content=text.strip())
        await interaction.followup.send("(done)")

    async with running_client(fake_discord, client):
        await tree.sync()
        rec = fake_discord.user_runs_command(fake_discord.default_channel, fake_discord.default_user, "chat",
                                             {"prompt": "one two three"})
        await fake_discord.wait_for(lambda: len(rec.followups) == 1)
    assert rec.response_type == 5 and rec.deferred
    original = rec.original
    assert original is not None and not original.loading and original.from_bot
    assert original.versions == ["", "one", "one two", "one two three"]
    assert [m.content for m in fake_discord.messages(fake_discord.default_channel)] == ["one two three", "(done)"]
    assert fake_discord.bot_texts(fake_discord.default_channel) == ["one two three", "(done)"]
    assert len(fake_discord.calls_to(ORIGINAL_EDIT)) == 3
    callback = fake_discord.calls_to(CALLBACK)[0]
    assert callback.json == {"type": 5} and "with_response" in callback.query


async def test_send_message_ephemeral_and_dm_commands(fake_discord: FakeDiscord) -> None:
    client, tree, _ = command_bot()

    @tree.command(name="secret", description="Whisper")
    async def secret(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("only you", ephemeral=True)

    @tree.command(name="hello", description="Greet")
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=True)
    async def hello(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"hello {interaction.user.name}")

    async with running_client(fake_discord, client):
        await tree.sync()
        whisper = fake_discord.user_runs_command(fake_discord.default_channel, None, "secret")
        dm = fake_discord.dm_channel(fake_discord.default_user)
        greet = fake_discord.user_runs_command(dm, None, "hello")
        await fake_discord.wait_for(lambda: whisper.original is not None and greet.original is not None)
    assert whisper.original.ephemeral and whisper.original.content == "only you"
    assert greet.original.content == f"hello {fake_discord.default_user.username}"
    assert greet.original.channel_id == dm.id and "user" in greet.payload and "member" not in greet.payload


async def test_late_acknowledgement_is_unknown_interaction() -> None:
    clock = FakeClock()
    fake = FakeDiscord(clock=clock.now)
    await fake.start()
    try:
        client, tree, _ = command_bot()
        gate = asyncio.Event()
        outcome: list[BaseException] = []

        @tree.command(name="slow", description="Too slow")
        async def slow(interaction: discord.Interaction) -> None:
            await gate.wait()
            try:
                await interaction.response.defer()
            except discord.HTTPException as exc:
                outcome.append(exc)

        async with running_client(fake, client):
            rec = fake.user_runs_command(fake.default_channel, None, "slow")
            await clock.advance(3.01)  # past the 3 s acknowledgement deadline
            gate.set()
            await fake.wait_for(lambda: outcome)
        assert isinstance(outcome[0], discord.NotFound) and outcome[0].code == 10062
        assert "Unknown interaction" in str(outcome[0])
        assert rec.rejected == [10062] and not rec.acknowledged
    finally:
        await fake.stop()


async def test_token_expires_after_15_minutes() -> None:
    clock = FakeClock()
    fake = FakeDiscord(clock=clock.now)
    await fake.start()
    try:
        client, tree, _ = command_bot()
        gate = asyncio.Event()
        outcome: list[BaseException] = []

        @tree.command(name="long", description="Takes ages")
        async def long_(interaction: discord.Interaction) -> None:
            await interaction.response.defer()
            await interaction.edit_original_response(content="working…")
            await gate.wait()
            try:
                await interaction.edit_original_response(content="done")
            except discord.HTTPException as exc:
                outcome.append(exc)

        async with running_client(fake, client):
            rec = fake.user_runs_command(fake.default_channel, None, "long")
            await fake.wait_for(lambda: rec.original is not None and rec.original.content == "working…")
            await clock.advance(15 * 60 + 1)
            gate.set()
            await fake.wait_for(lambda: outcome)
        assert outcome[0].status == 401 and outcome[0].code == 50027
        assert rec.original.content == "working…"
    finally:
        await fake.stop()


async def test_double_acknowledgement_and_wrong_token_on_the_wire(fake_discord: FakeDiscord) -> None:
    rec = fake_discord.user_runs_command(fake_discord.default_channel, None, "anything")
    path = f"/interactions/{rec.id}/{rec.token}/callback?with_response=true"
    status, body, headers = await discord_rest(fake_discord, "POST", path, auth=False,
                                               json={"type": 4, "data": {"content": "first"}})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["interaction"]["id"] == rec.id and body["resource"]["message"]["content"] == "first"
    status, body, _ = await discord_rest(fake_discord, "POST", path, auth=False, json={"type": 4,
                                                                                     "data": {"content": "again"}})
    assert (status, body["code"]) == (400, 40060)
    status, body, _ = await discord_rest(fake_discord, "POST", f"/interactions/{rec.id}/wrong/callback",
                                         auth=False, json={"type": 5})
    assert (status, body["code"]) == (404, 10062)
    status, _, _ = await discord_rest(fake_discord, "POST", f"/interactions/{rec.id}/{rec.token}/callback",
                                      auth=False, json={"type": 5})
    assert status == 400  # still acknowledged once only
    # Without ?with_response the callback answers 204.
    other = fake_discord.user_runs_command(fake_discord.default_channel, None, "anything")
    status, body, _ = await discord_rest(fake_discord, "POST", f"/interactions/{other.id}/{other.token}/callback",
                                         auth=False, json={"type": 5})
    assert status == 204 and other.original is not None and other.original.loading
    # A follow-up to an interaction nobody answered is refused.
    never = fake_discord.user_runs_command(fake_discord.default_channel, None, "anything")
    status, body, _ = await discord_rest(fake_discord, "POST", f"/webhooks/{fake_discord.application_id}/"
                                         f"{never.token}?wait=1", auth=False, json={"content": "x"})
    assert (status, body["code"]) == (404, 10015)


async def test_component_click_updates_the_message(fake_discord: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)

    class Confirm(discord.ui.View):
        @discord.ui.button(label="OK", custom_id="confirm-ok")
        async def ok(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.edit_message(content="confirmed", view=None)

    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        msg = await channel.send("Proceed?", view=Confirm(timeout=None))
        assert fake_discord.message(msg.id).components[0]["components"][0]["custom_id"] == "confirm-ok"
        click = fake_discord.user_clicks(fake_discord.default_channel, None, msg.id, "confirm-ok")
        await fake_discord.wait_for(lambda: click.acknowledged)
    assert click.response_type == 7
    seen = fake_discord.message(msg.id)
    assert seen.versions == ["Proceed?", "confirmed"] and seen.components == []


async def test_type_7_is_refused_for_slash_commands(fake_discord: FakeDiscord) -> None:
    rec = fake_discord.user_runs_command(fake_discord.default_channel, None, "x")
    status, body, _ = await discord_rest(fake_discord, "POST", f"/interactions/{rec.id}/{rec.token}/callback",
                                         auth=False, json={"type": 7, "data": {"content": "nope"}})
    assert status == 400 and body["code"] == 50035 and "type" in body["errors"]
    assert not rec.acknowledged


@pytest.mark.parametrize("late", [False, True])
async def test_ack_deadline_boundary(late: bool) -> None:
    clock = FakeClock()
    fake = FakeDiscord(clock=clock.now)
    await fake.start()
    try:
        rec = fake.user_runs_command(fake.default_channel, None, "x")
        await clock.advance(3.5 if late else 2.9)
        status, _, _ = await discord_rest(fake, "POST", f"/interactions/{rec.id}/{rec.token}/callback",
                                          auth=False, json={"type": 5})
        assert status == (404 if late else 204)
    finally:
        await fake.stop()
