"""The fake Discord's ephemeral deferrals and follow-ups, driven by discord.py's CommandTree.

Discord takes a follow-up sent while a deferred response still shows "thinking…" as that
response: it fills the loading message and keeps the deferral's flags, whatever the
follow-up asks (discord-api-docs#2742 and #3466). Once the response was edited or deleted, a
follow-up is a new message with its own flags.
"""

from __future__ import annotations

import discord
from discord import app_commands

from tests.fakes.discord import FakeDiscord
from tests.fakes.discord_fixtures import running_client


async def test_followup_while_loading_fills_the_deferred_response_with_its_flags(fake_discord: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    tree = app_commands.CommandTree(client)

    @tree.command(name="quiet", description="Deferred ephemerally, answered by a public follow-up")
    async def quiet(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send("meant for everyone", ephemeral=False)
        await interaction.followup.send("second")

    @tree.command(name="loud", description="Deferred publicly, answered by an ephemeral follow-up")
    async def loud(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("meant for you", ephemeral=True)

    @tree.command(name="moved", description="Deferred ephemerally, deleted, then a public follow-up")
    async def moved(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.delete_original_response()
        await interaction.followup.send("for everyone")

    channel = fake_discord.default_channel
    async with running_client(fake_discord, client):
        await tree.sync()
        q = fake_discord.user_runs_command(channel, None, "quiet")
        await fake_discord.wait_for(lambda: len(q.followups) == 1)
        lo = fake_discord.user_runs_command(channel, None, "loud")
        await fake_discord.wait_for(lambda: lo.original is not None and not lo.original.loading)
        mv = fake_discord.user_runs_command(channel, None, "moved")
        await fake_discord.wait_for(lambda: len(mv.followups) == 1)

    # The first follow-up became the ephemeral response; the second is a message of its own.
    assert q.original.ephemeral and q.original.versions == ["", "meant for everyone"]
    assert [(m.content, m.ephemeral) for m in q.followups] == [("second", False)]
    # A public deferral stays public.
    assert not lo.original.ephemeral and lo.original.content == "meant for you" and not lo.followups
    # With the ephemeral response deleted, the follow-up is public.
    assert mv.original.ephemeral and mv.original.deleted
    assert [(m.content, m.ephemeral) for m in mv.followups] == [("for everyone", False)]
