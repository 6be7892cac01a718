"""Tools and models on Discord, end to end: the real discord.py connector and the real openai
SDK against the fake Discord and the fake provider -- approvals with buttons (granted,
denied, timed out, clicked by the wrong person), an MCP server over streamable HTTP, and
the /model picker as a slash command."""

from __future__ import annotations

from typing import Any

from tests.fakes.llm import Reply
from tests.support.stack import OWNER_DC

pytest_plugins = ["tests.fakes.mcp_fixtures"]  # mcp_http

USER_ID, OTHER_ID = "700000000000000061", "700000000000000062"
TOOLS = {
    "modules": ["examples.weather_tools"],
    "entry_points": False,
    "policy": {"get_weather": {"allow": "user", "approval": "always"}},
}


async def setup(p: Any, fake: Any) -> tuple[Any, Any, Any]:
    await p.store.set_role(f"discord:{USER_ID}", "user")
    await p.store.set_role(f"discord:{OTHER_ID}", "user")
    return fake.user(USER_ID, "asker"), fake.user(OTHER_ID, "bystander"), fake.default_channel


def bot_messages(fake: Any, channel: Any) -> list[Any]:
    return [m for m in fake.messages(channel) if m.from_bot and not m.deleted and not m.ephemeral]


def public_texts(fake: Any, channel: Any) -> list[str]:
    """What everyone in the channel reads from the bot (not what a click showed one person)."""
    return [m.content for m in bot_messages(fake, channel)]


async def question(fake: Any, channel: Any) -> Any:
    await fake.wait_for(lambda: any(m.buttons for m in bot_messages(fake, channel)), timeout=10, what="buttons")
    return next(m for m in bot_messages(fake, channel) if m.buttons)


async def test_approval_on_discord_granted_after_a_bystander_was_refused(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord, overrides={"tools": TOOLS})
    user, other, channel = await setup(p, fast_discord)
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Lima"})]), Reply.text("22 °C and cloudy in Lima."))
    fast_discord.user_says(channel, user, "weather in Lima?", mentions_bot=True)
    asked = await question(fast_discord, channel)
    assert asked.content == "🔐 Run get_weather?\ncity: Lima"
    assert [(b.label, b.style) for b in asked.buttons] == [("✅ Approve", "success"), ("❌ Deny", "danger")]
    approve = asked.buttons[0].custom_id
    bystander = fast_discord.user_clicks(channel, other, asked.id, approve)
    await fast_discord.wait_for(lambda: bystander.acknowledged, timeout=5)
    assert bystander.ephemeral_texts == ["Not yours to answer: only the person who asked, or an admin, can."]
    click = fast_discord.user_clicks(channel, user, asked.id, approve)
    await fast_discord.wait_for(lambda: public_texts(fast_discord, channel)[-1:] == ["22 °C and cloudy in Lima."], timeout=10)
    await p.gateway.settle(f"discord:{channel.id}")
    for interaction in (bystander, click):
        assert len(interaction.callbacks) == 1 and not interaction.rejected  # exactly one acknowledgement, in time
    (reply,) = bot_messages(fast_discord, channel)
    assert reply.content == "22 °C and cloudy in Lima." and reply.buttons == []
    assert fake_llm.requests[1].messages[-1]["content"] == "22 °C and cloudy in Lima"


async def test_approval_on_discord_denied_then_timed_out(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord, overrides={"tools": {**TOOLS, "approval_timeout": 1}})
    user, _, channel = await setup(p, fast_discord)
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Oslo"})]), Reply.text("Fine, I won't."))
    fast_discord.user_says(channel, user, "weather?", mentions_bot=True)
    asked = await question(fast_discord, channel)
    fast_discord.user_clicks(channel, user, asked.id, asked.buttons[1].custom_id)
    await fast_discord.wait_for(lambda: public_texts(fast_discord, channel)[-1:] == ["Fine, I won't."], timeout=10)
    await p.gateway.settle(f"discord:{channel.id}")
    assert fake_llm.requests[1].messages[-1]["content"] == "Not run: the user denied it."
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Paris"})]), Reply.text("Nobody approved."))
    fast_discord.user_says(channel, user, "and Paris?", mentions_bot=True)
    await fast_discord.wait_for(lambda: public_texts(fast_discord, channel)[-1:] == ["Nobody approved."], timeout=10)
    await p.gateway.settle(f"discord:{channel.id}")
    assert fake_llm.requests[-1].messages[-1]["content"] == "Not run: nobody approved it within 1 seconds."
    assert all(m.buttons == [] for m in bot_messages(fast_discord, channel))


async def test_an_mcp_tool_over_http_answers_on_discord(fast_discord, fake_llm, parley, mcp_http) -> None:
    server = await mcp_http()
    tools = {"mcp_servers": [{"name": "web", "url": server.url}], "policy": {"web__*": {"allow": "user"}}}
    p = await parley(discord=fast_discord, overrides={"tools": tools})
    (status,) = await p.app.mcp.ready(30)
    assert status.state == "ready" and status.transport == "http"
    user, _, channel = await setup(p, fast_discord)
    fake_llm.script(Reply.tool_calls([("web__echo", {"text": "over http"})]), Reply.text("It said: over http."))
    fast_discord.user_says(channel, user, "echo over http", mentions_bot=True)
    await fast_discord.wait_for(lambda: public_texts(fast_discord, channel)[-1:] == ["It said: over http."], timeout=15)
    assert fake_llm.requests[1].messages[-1]["content"] == "over http"


async def test_the_model_picker_as_a_slash_command(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    user, _, _ = await setup(p, fast_discord)
    dm = fast_discord.dm_channel(user)
    rec = fast_discord.user_runs_command(dm, user, "model", {})
    await fast_discord.wait_for(lambda: any(m.buttons for m in rec.replies), timeout=10, what="the picker")
    picker = next(m for m in rec.replies if m.buttons)
    assert picker.ephemeral  # what the caller asked to see, for them alone
    assert picker.content == "Model in this chat: fake-model (default)\nAvailable: fake-model, other-model"
    assert [b.label for b in picker.buttons] == ["✓ fake-model", "other-model"]
    click = fast_discord.user_clicks(dm, user, picker.id, picker.buttons[1].custom_id)
    await fast_discord.wait_for(lambda: click.ephemeral_texts, timeout=5)
    assert click.ephemeral_texts == ["Model for this chat set to other-model."]
    fake_llm.script(Reply.text("From the other model."))
    fast_discord.user_says(dm, user, "hi")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(dm)[-1:] == ["From the other model."], timeout=10)
    assert fake_llm.requests[-1].model == "other-model"
    # In a server channel only admins switch the model: a member's click is refused privately.
    channel = fast_discord.default_channel
    rec = fast_discord.user_runs_command(channel, user, "model", {})
    await fast_discord.wait_for(lambda: any(m.buttons for m in rec.replies), timeout=10, what="the member's picker")
    picker = next(m for m in rec.replies if m.buttons)
    click = fast_discord.user_clicks(channel, user, picker.id, picker.buttons[1].custom_id)
    await fast_discord.wait_for(lambda: click.ephemeral_texts, timeout=5)
    assert click.ephemeral_texts == ["Only admins can switch the model."]
    assert (await p.store.chat_settings(f"discord:{channel.id}")).model is None
    owner = fast_discord.user(OWNER_DC, "owner")
    rec = fast_discord.user_runs_command(channel, owner, "model", {})
    await fast_discord.wait_for(lambda: any(m.buttons for m in rec.replies), timeout=10, what="the owner's picker")
    picker = next(m for m in rec.replies if m.buttons)
    click = fast_discord.user_clicks(channel, owner, picker.id, picker.buttons[1].custom_id)
    await fast_discord.wait_for(lambda: click.ephemeral_texts, timeout=5)
    assert click.ephemeral_texts == ["Model for this chat set to other-model."]
    assert (await p.store.chat_settings(f"discord:{channel.id}")).model == "other-model"
