"""Buttons (message components) and clicks on the fake Discord.

Wire-level rules through raw REST (`discord_rest`), and the same paths through the real
discord.py: component validation on create and edit (400 50035), an edit without
`components` keeping them and `components: []` removing them, and the answers to a click
(type 4 ephemeral, 6 deferred update, 7 update) within the 3 s clock, once, with
follow-ups for 15 minutes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import discord
import pytest

from tests.fakes.discord import FakeDiscord, SeenButton
from tests.fakes.discord_fixtures import discord_rest, running_client
from tests.support.fakeclock import FakeClock


def button(custom_id: str | None = "b", label: str | None = "Go", style: int = 1, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": 2, "style": style, **extra}
    if custom_id is not None:
        data["custom_id"] = custom_id
    if label is not None:
        data["label"] = label
    return data


def row(*items: dict[str, Any]) -> dict[str, Any]:
    return {"type": 1, "components": list(items)}


def buttons_row(n: int, prefix: str = "b") -> dict[str, Any]:
    return row(*(button(f"{prefix}{i}", f"B{i}") for i in range(n)))


async def post(fake: FakeDiscord, components: Any, content: str = "pick") -> tuple[int, Any]:
    status, body, _ = await discord_rest(fake, "POST", f"/channels/{fake.default_channel.id}/messages",
                                         json={"content": content, "components": components})
    return status, body


def error_path(body: dict[str, Any]) -> tuple[str, str]:
    """The dotted path and `_errors` code of a 50035 body (its first error)."""
    parts, node = [], body["errors"]
    while "_errors" not in node:
        key = next(iter(node))
        parts.append(key)
        node = node[key]
    return ".".join(parts), node["_errors"][0]["code"]


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("components", "path", "code"), [
    ([buttons_row(6)], "components.0.components", "BASE_TYPE_MAX_LENGTH"),
    ([buttons_row(1, f"r{i}-") for i in range(6)], "components", "BASE_TYPE_MAX_LENGTH"),
    ([row(button("x" * 101))], "components.0.components.0.custom_id", "BASE_TYPE_MAX_LENGTH"),
    ([row(button("ok", "L" * 81))], "components.0.components.0.label", "BASE_TYPE_MAX_LENGTH"),
    ([row(button(None))], "components.0.components.0.custom_id", "BASE_TYPE_REQUIRED"),
    ([row(button(None, style=5))], "components.0.components.0.url", "BASE_TYPE_REQUIRED"),
    ([row(button("a"), button("a"))], "components.0.components.1.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED"),
    ([row(button("a", style=9))], "components.0.components.0.style", "BASE_TYPE_CHOICES"),
    ([button("a")], "components.0.type", "UNION_TYPE_CHOICES"),
    ([row()], "components.0.components", "BASE_TYPE_MIN_LENGTH"),
], ids=["6-in-a-row", "6-rows", "custom-id-101", "label-81", "no-custom-id", "link-without-url", "duplicate-id",
        "bad-style", "button-outside-a-row", "empty-row"])
async def test_invalid_components_are_refused_with_50035(fake_discord: FakeDiscord, components, path, code) -> None:
    status, body = await post(fake_discord, components)
    assert (status, body["code"], body["message"]) == (400, 50035, "Invalid Form Body")
    assert error_path(body) == (path, code)
    assert fake_discord.messages(fake_discord.default_channel) == []


async def test_the_largest_valid_layout_and_every_style_are_accepted(fake_discord: FakeDiscord) -> None:
    status, body = await post(fake_discord, [buttons_row(5, f"r{i}-") for i in range(5)])
    assert status == 200 and len(fake_discord.buttons(body["id"])) == 25
    styled = [row(button("p", "P", 1), button("s", "S", 2), button("ok", "OK", 3), button("no", "No", 4),
                  button(None, "Docs", 5, url="https://example.org")),
              row(button("x" * 100, "L" * 80))]
    status, body = await post(fake_discord, styled)
    assert status == 200
    assert fake_discord.buttons(body["id"]) == [
        SeenButton("P", "p", "primary"), SeenButton("S", "s", "secondary"), SeenButton("OK", "ok", "success"),
        SeenButton("No", "no", "danger"), SeenButton("Docs", None, "link", url="https://example.org"),
        SeenButton("L" * 80, "x" * 100, "primary", row=1),
    ]


async def test_edit_keeps_components_unless_it_states_them(fake_discord: FakeDiscord) -> None:
    status, body = await post(fake_discord, [row(button("yes", "Yes", 3), button("no", "No", 4))])
    assert status == 200
    path = f"/channels/{fake_discord.default_channel.id}/messages/{body['id']}"
    status, _, _ = await discord_rest(fake_discord, "PATCH", path, json={"content": "still deciding"})
    assert status == 200 and [b.custom_id for b in fake_discord.buttons(body["id"])] == ["yes", "no"]
    status, bad, _ = await discord_rest(fake_discord, "PATCH", path, json={"components": [buttons_row(6)]})
    assert (status, bad["code"]) == (400, 50035)
    assert [b.custom_id for b in fake_discord.buttons(body["id"])] == ["yes", "no"], "a refused edit changed it"
    status, _, _ = await discord_rest(fake_discord, "PATCH", path, json={"content": "decided", "components": []})
    seen = fake_discord.message(body["id"])
    assert status == 200 and seen.buttons == [] and seen.content == "decided"
    assert [[b.custom_id for b in v] for v in seen.button_versions] == [["yes", "no"], []]


# ---- through discord.py -------------------------------------------------------------------------


class Choice(discord.ui.View):
    def __init__(self, *ids: str) -> None:
        super().__init__(timeout=None)
        for cid in ids:
            self.add_item(discord.ui.Button(label=cid.title(), custom_id=cid, style=discord.ButtonStyle.success))


async def test_discord_py_views_edits_and_view_none(fake_discord: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        msg = await channel.send("Pick", view=Choice("a", "b"))
        assert [(b.label, b.custom_id, b.style) for b in fake_discord.buttons(msg.id)] == [
            ("A", "a", "success"), ("B", "b", "success")]
        await msg.edit(content="Pick again")  # discord.py sends no components: they stay
        assert [b.custom_id for b in fake_discord.buttons(msg.id)] == ["a", "b"]
        await msg.edit(content="Pick one more", view=Choice("c"))
        assert [b.custom_id for b in fake_discord.buttons(msg.id)] == ["c"]
        await msg.edit(content="Done", view=None)  # components: [] on the wire
        assert fake_discord.buttons(msg.id) == []
        with pytest.raises(discord.HTTPException) as refused:
            await _send_raw_too_wide(client, channel)
        assert refused.value.status == 400 and refused.value.code == 50035
        assert "Must be 5 or fewer in length" in str(refused.value)
    edit = fake_discord.calls_to("PATCH /channels/{channel_id}/messages/{message_id}")
    assert "components" not in edit[0].json and edit[-1].json["components"] == []


async def _send_raw_too_wide(client: discord.Client, channel: Any) -> None:
    """Six buttons in one row: discord.py's View would wrap them, so the route is called directly."""
    route = discord.http.Route("POST", "/channels/{channel_id}/messages", channel_id=channel.id)
    await client.http.request(route, json={"content": "too many", "components": [buttons_row(6)]})


# ---- clicks -------------------------------------------------------------------------------------


async def callback(fake: FakeDiscord, click, body: dict[str, Any]) -> tuple[int, Any]:  # noqa: ANN001
    status, data, _ = await discord_rest(fake, "POST", f"/interactions/{click.id}/{click.token}/callback"
                                         "?with_response=true", auth=False, json=body)
    return status, data


async def followup(fake: FakeDiscord, click, body: dict[str, Any]) -> tuple[int, Any]:  # noqa: ANN001
    status, data, _ = await discord_rest(fake, "POST", f"/webhooks/{fake.application_id}/{click.token}?wait=1",
                                         auth=False, json=body)
    return status, data


async def message_with_buttons(fake: FakeDiscord, *ids: str) -> str:
    status, body = await post(fake, [row(*(button(i, i.upper()) for i in ids))])
    assert status == 200
    return body["id"]


async def test_type_4_with_flags_64_is_seen_by_the_clicker_alone(fake_discord: FakeDiscord) -> None:
    channel = fake_discord.default_channel
    mid = await message_with_buttons(fake_discord, "ok")
    alice, bob = fake_discord.user(username="alice"), fake_discord.user(username="bob")
    click = fake_discord.user_clicks(channel, alice, mid, "ok")
    assert click.type == 3 and click.custom_id == "ok" and click.message_id == mid
    assert click.payload["message"]["id"] == mid and click.payload["data"]["component_type"] == 2
    status, body = await callback(fake_discord, click, {"type": 4, "data": {"content": "noted", "flags": 64}})
    assert status == 200 and body["interaction"]["response_message_ephemeral"] is True
    assert click.response_type == 4 and click.ephemeral_texts == ["noted"]
    (reply,) = click.replies
    assert reply.ephemeral and reply is click.response_message
    assert fake_discord.visible_to(reply, alice) and not fake_discord.visible_to(reply, bob)
    assert reply in fake_discord.messages_seen_by(channel, alice)
    assert reply not in fake_discord.messages_seen_by(channel, bob)
    assert fake_discord.message(mid).versions == ["pick"], "a type 4 answer edited the clicked message"
    # An ephemeral message is reached through its interaction's webhook only, not the channel routes.
    status, body, _ = await discord_rest(fake_discord, "PATCH", f"/channels/{channel.id}/messages/{reply.id}",
                                         json={"content": "edited"})
    assert (status, body["code"]) == (404, 10008)
    status, _, _ = await discord_rest(fake_discord, "PATCH", f"/webhooks/{fake_discord.application_id}/"
                                      f"{click.token}/messages/@original", auth=False, json={"content": "edited"})
    assert status == 200 and reply.content == "edited"
    # A second answer is refused; nobody clicks a button that is not there.
    status, _ = await callback(fake_discord, click, {"type": 6})
    assert status == 400 and click.rejected == [40060]
    assert [(t, s) for _, t, s in click.callbacks] == [(4, 200), (6, 400)]
    assert click.ephemeral_texts == ["edited"]
    with pytest.raises(ValueError):
        fake_discord.user_clicks(channel, alice, mid, "missing")


async def test_type_6_acknowledges_without_a_message_and_7_updates_the_clicked_one(fake_discord: FakeDiscord) -> None:
    channel = fake_discord.default_channel
    mid = await message_with_buttons(fake_discord, "yes", "no")
    first = fake_discord.user_clicks(channel, None, mid, "yes")
    status, _ = await callback(fake_discord, first, {"type": 6})
    assert status == 200 and first.response_type == 6 and first.deferred
    assert first.replies == [] and first.ephemeral_texts == [] and first.original.id == mid
    # After a deferred update, @original is the clicked message: editing it edits that message.
    status, _, _ = await discord_rest(fake_discord, "PATCH", f"/webhooks/{fake_discord.application_id}/"
                                      f"{first.token}/messages/@original", auth=False,
                                      json={"content": "approved", "components": []})
    assert status == 200 and fake_discord.message(mid).content == "approved" and fake_discord.buttons(mid) == []

    mid2 = await message_with_buttons(fake_discord, "a", "b")
    second = fake_discord.user_clicks(channel, None, mid2, "b")
    status, body = await callback(fake_discord, second, {"type": 7, "data": {"content": "b it is",
                                                                             "components": [row(button("c", "C"))]}})
    assert status == 200 and body["resource"]["message"]["id"] == mid2
    assert fake_discord.message(mid2).versions == ["pick", "b it is"]
    assert [b.custom_id for b in fake_discord.buttons(mid2)] == ["c"]
    with pytest.raises(ValueError):  # the button is gone
        fake_discord.user_clicks(channel, None, mid2, "b")
    stale = fake_discord.user_clicks(channel, None, mid2, "b", check=False)  # a client not yet refreshed
    assert stale.custom_id == "b"
    # An update with invalid components is refused and acknowledges nothing.
    third = fake_discord.user_clicks(channel, None, mid2, "c")
    status, body = await callback(fake_discord, third, {"type": 7, "data": {"components": [buttons_row(6)]}})
    assert (status, body["code"]) == (400, 50035) and not third.acknowledged


async def test_the_3_s_clock_40060_and_15_minutes_of_followups() -> None:
    clock = FakeClock()
    fake = FakeDiscord(clock=clock.now)
    await fake.start()
    try:
        channel = fake.default_channel
        mid = await message_with_buttons(fake, "go")
        late = fake.user_clicks(channel, None, mid, "go")
        await clock.advance(3.01)
        status, body = await callback(fake, late, {"type": 6})
        assert (status, body["code"], body["message"]) == (404, 10062, "Unknown interaction")
        assert late.rejected == [10062] and not late.acknowledged

        click = fake.user_clicks(channel, None, mid, "go")
        await clock.advance(2.0)
        status, _ = await callback(fake, click, {"type": 6})
        assert status == 200 and click.ack_delay == pytest.approx(2.0)
        status, body = await callback(fake, click, {"type": 4, "data": {"content": "again"}})
        assert (status, body["code"]) == (400, 40060)
        status, body = await followup(fake, click, {"content": "done, privately", "flags": 64})
        assert status == 200 and click.ephemeral_texts == ["done, privately"]
        await clock.advance(15 * 60)
        status, body = await followup(fake, click, {"content": "too late", "flags": 64})
        assert (status, body["code"]) == (401, 50027)
        assert click.rejected == [40060, 50027] and len(click.followups) == 1
    finally:
        await fake.stop()


async def test_a_followup_may_carry_buttons_and_clicking_them_works(fake_discord: FakeDiscord) -> None:
    channel = fake_discord.default_channel
    mid = await message_with_buttons(fake_discord, "menu")
    click = fake_discord.user_clicks(channel, None, mid, "menu")
    await callback(fake_discord, click, {"type": 6})
    status, body = await followup(fake_discord, click, {"content": "choose", "flags": 64,
                                                        "components": [row(button("m1", "One"))]})
    assert status == 200 and [b.custom_id for b in fake_discord.buttons(body["id"])] == ["m1"]
    inner = fake_discord.user_clicks(channel, None, body["id"], "m1")
    assert inner.payload["message"]["flags"] & 64
    with pytest.raises(ValueError):  # someone else does not see the ephemeral message
        fake_discord.user_clicks(channel, fake_discord.user(username="eve"), body["id"], "m1")
    status, _ = await followup(fake_discord, click, {"content": "x", "components": [buttons_row(6)]})
    assert status == 400


async def test_discord_py_answers_a_click_through_its_view(fake_discord: FakeDiscord) -> None:
    """discord.py's own dispatch (a View with a callback) against the fake: a type 4 ephemeral answer."""
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    answered = asyncio.Event()

    class Ask(discord.ui.View):
        @discord.ui.button(label="Why?", custom_id="why")
        async def why(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
            await interaction.response.send_message("because", ephemeral=True)
            answered.set()

    async with running_client(fake_discord, client):
        channel = client.get_channel(int(fake_discord.default_channel.id))
        msg = await channel.send("Question", view=Ask(timeout=None))
        click = fake_discord.user_clicks(fake_discord.default_channel, None, msg.id, "why")
        await fake_discord.wait_for(lambda: click.acknowledged)
    assert click.response_type == 4 and click.ephemeral_texts == ["because"]
    assert [(t, s) for _, t, s in click.callbacks] == [(4, 200)]
