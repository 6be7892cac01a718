"""Buttons on Discord end to end: the real DiscordConnector (real discord.py) and the real
Gateway of a whole parley App, against the fake Discord over 127.0.0.1.

Messages get buttons through the Outbox (`send`/`edit` with `buttons`), presses come back
as component interactions and reach `Gateway.on_button` as a `ButtonPress`, and every
press is acknowledged exactly once: by the gateway's answer, or by the connector's own
deferral when the gateway is slow (Discord's 3 s clock), never twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bots.errors import Transient, Undeliverable
from bots.inbound import ButtonPress, Inbound
from bots.outbox import Button, ChatRef
from tests.fakes.discord import EDIT, SEND, FakeDiscord, FakeInteraction
from tests.support.stack import OWNER_DC

NO_LONGER_WAITING = "This is no longer waiting for an answer."

APPROVE = (Button("Approve", "t:yes", "success"), Button("Deny", "t:no", "danger"))


class Presses:
    """A button handler registered on the gateway's router under `prefix`.

    It records every press and answers it as told: `reply` None acknowledges, text
    answers; `gate` holds the answer until set; `answers` > 1 answers more than once.
    """

    def __init__(self, gateway: Any, prefix: str = "t", *, reply: str | None = None,
                 gate: asyncio.Event | None = None, answers: int = 1, fail: bool = False) -> None:
        self.seen: list[tuple[ButtonPress, str]] = []
        self.reply, self.gate, self.answers, self.fail = reply, gate, answers, fail
        self.done = 0
        gateway.buttons.register(prefix, self.handle)

    async def handle(self, press: ButtonPress, rest: str) -> bool:
        self.seen.append((press, rest))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("the handler broke")
        for _ in range(self.answers):
            await press.answer(self.reply, False)
        self.done += 1
        return True


async def start(parley: Any, fake: FakeDiscord) -> tuple[Any, Any]:
    p = await parley(discord=fake)
    return p, p.gateway.connectors["discord"]


def chat_of(channel: Any) -> ChatRef:
    return ChatRef("discord", channel.id, is_private=channel.is_dm)


def shown(fake: FakeDiscord, message_id: str) -> list[tuple[str | None, str | None, str]]:
    return [(b.label, b.custom_id, b.style) for b in fake.buttons(message_id)]


def acked_once(click: FakeInteraction, ack_type: int) -> None:
    """Exactly one acknowledgement, of this type, taken by Discord; nothing refused."""
    assert [(t, status < 300) for _, t, status in click.callbacks] == [(ack_type, True)], click.callbacks
    assert click.response_type == ack_type and not click.rejected


# ---- sending and editing buttons --------------------------------------------------------------


async def test_send_shows_buttons_an_edit_replaces_them_and_an_edit_without_removes_them(
    fast_discord, parley
) -> None:
    _, connector = await start(parley, fast_discord)
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Run `rm -rf build`?", buttons=APPROVE)
    assert shown(fast_discord, ref.message_id) == [("Approve", "t:yes", "success"), ("Deny", "t:no", "danger")]
    assert fast_discord.message(ref.message_id).content == "Run `rm -rf build`?"
    # discord.py keeps no view for it: presses reach on_interaction alone (see _ButtonRow).
    assert connector.client.persistent_views == []

    await connector.outbox.edit(ref, "Pick a model", buttons=[Button("gpt", "m:gpt", "primary"),
                                                              Button("other", "m:other")])
    assert shown(fast_discord, ref.message_id) == [("gpt", "m:gpt", "primary"), ("other", "m:other", "secondary")]
    await connector.outbox.edit(ref, "Model set to gpt.")
    seen = fast_discord.message(ref.message_id)
    assert seen.buttons == [] and seen.content == "Model set to gpt."
    assert [[b.custom_id for b in v] for v in seen.button_versions] == [["t:yes", "t:no"], ["m:gpt", "m:other"], []]
    assert fast_discord.calls_to(EDIT)[-1].json["components"] == [], "the removal was not stated on the wire"
    # A plain text send states no buttons either, and existing sends are unchanged.
    plain = await connector.outbox.send(chat_of(channel), "just text")
    assert fast_discord.buttons(plain.message_id) == []


async def test_many_buttons_wrap_into_rows_long_labels_are_cut_and_more_than_25_are_refused(
    fast_discord, parley
) -> None:
    _, connector = await start(parley, fast_discord)
    chat = chat_of(fast_discord.default_channel)
    many = [Button(f"model-{i}", f"m:{i}") for i in range(12)]
    ref = await connector.outbox.send(chat, "Pick", buttons=many)
    seen = fast_discord.buttons(ref.message_id)
    assert [b.custom_id for b in seen] == [f"m:{i}" for i in range(12)], "the order changed"
    assert [b.row for b in seen] == [0] * 5 + [1] * 5 + [2] * 2
    long = await connector.outbox.send(chat, "Pick", buttons=[Button("x" * 100, "m:long")])
    (cut,) = fast_discord.buttons(long.message_id)
    assert len(cut.label) == 80 and cut.label.endswith("…")
    with pytest.raises(Undeliverable):
        await connector.outbox.send(chat, "Pick", buttons=[Button(str(i), f"m:{i}") for i in range(26)])


async def test_a_retried_send_with_buttons_posts_once(fast_discord, parley) -> None:
    """The nonce path keeps working with buttons: the message that came back is the one."""
    _, connector = await start(parley, fast_discord)
    channel = fast_discord.default_channel
    fast_discord.inject("drop_after_apply", route=SEND, channel_id=channel.id, times=1)
    with pytest.raises(Transient):
        await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    assert [m.id for m in fast_discord.messages(channel)] == [ref.message_id]
    assert [b.custom_id for b in fast_discord.buttons(ref.message_id)] == ["t:yes", "t:no"]
    assert fast_discord.calls_to(EDIT) == [], "an identical message that came back was edited"

    fast_discord.inject("drop_after_apply", route=SEND, channel_id=channel.id, times=1)
    with pytest.raises(Transient):
        await connector.outbox.send(chat_of(channel), "Again?", buttons=APPROVE)
    again = await connector.outbox.send(chat_of(channel), "Again?", buttons=[Button("Sure", "t:sure")])
    assert len(fast_discord.messages(channel)) == 2
    assert [b.custom_id for b in fast_discord.buttons(again.message_id)] == ["t:sure"], \
        "the message that came back keeps buttons the retry no longer wants"


# ---- presses reaching the gateway --------------------------------------------------------------


@pytest.mark.parametrize("where", ["guild", "thread", "dm"])
async def test_a_press_reaches_the_gateway_and_answer_none_defers_the_update(where, fast_discord, parley) -> None:
    p, connector = await start(parley, fast_discord)
    presses = Presses(p.gateway)
    clicker = fast_discord.user(OWNER_DC, "owner", global_name="The Owner")
    if where == "dm":
        channel = fast_discord.dm_channel(clicker)
    elif where == "thread":
        channel = fast_discord.thread(fast_discord.default_channel, "approvals", owner=clicker)
    else:
        channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    click = fast_discord.user_clicks(channel, clicker, ref.message_id, "t:no")
    await fast_discord.wait_for(lambda: presses.done == 1 and click.acknowledged, what="the press answered")

    (press, rest), = presses.seen
    assert rest == "no" and press.data == "t:no"
    assert press.chat == ChatRef("discord", channel.id, is_private=where == "dm")
    assert press.chat == ref.chat, "the press names another chat than the message's"
    assert (press.user_id, press.message_id) == (clicker.id, ref.message_id)
    assert (press.username, press.display_name) == ("owner", "The Owner")
    acked_once(click, 6)
    assert click.replies == [] and fast_discord.message(ref.message_id).versions == ["Approve?"]
    assert [b.custom_id for b in fast_discord.buttons(ref.message_id)] == ["t:yes", "t:no"]


async def test_answer_with_text_is_an_ephemeral_message_for_the_presser_alone(fast_discord, parley) -> None:
    p, connector = await start(parley, fast_discord)
    Presses(p.gateway, reply="Denied. <@&1> @everyone")
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    alice, bob = fast_discord.user(username="alice"), fast_discord.user(username="bob")
    click = fast_discord.user_clicks(channel, alice, ref.message_id, "t:no")
    await fast_discord.wait_for(lambda: click.ephemeral_texts, what="the ephemeral answer")
    acked_once(click, 4)
    (answer,) = click.replies
    assert answer.content == "Denied. <@&1> @everyone" and answer.allowed_mentions == {"parse": []}
    assert fast_discord.visible_to(answer, alice) and not fast_discord.visible_to(answer, bob)
    assert [m.id for m in fast_discord.messages_seen_by(channel, bob)] == [ref.message_id]


async def test_a_second_answer_is_a_no_op(fast_discord, parley) -> None:
    p, connector = await start(parley, fast_discord)
    presses = Presses(p.gateway, reply="once", answers=3)
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    click = fast_discord.user_clicks(channel, None, ref.message_id, "t:yes")
    await fast_discord.wait_for(lambda: presses.done == 1, what="the handler finished")
    acked_once(click, 4)
    assert click.ephemeral_texts == ["once"] and click.followups == []


async def test_an_unknown_prefix_and_a_failing_handler_are_answered_by_the_gateway(fast_discord, parley) -> None:
    p, connector = await start(parley, fast_discord)
    Presses(p.gateway, "boom", fail=True)
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Old question",
                                      buttons=[Button("Stale", "gone:1"), Button("Broken", "boom:1")])
    stale = fast_discord.user_clicks(channel, None, ref.message_id, "gone:1")
    broken = fast_discord.user_clicks(channel, None, ref.message_id, "boom:1")
    await fast_discord.wait_for(lambda: stale.ephemeral_texts and broken.ephemeral_texts, what="both answered")
    acked_once(stale, 4)
    acked_once(broken, 4)
    assert stale.ephemeral_texts == [NO_LONGER_WAITING]
    assert broken.ephemeral_texts == ["Something went wrong; please try again."]


async def test_a_bots_press_is_ignored(fast_discord, parley) -> None:
    p, connector = await start(parley, fast_discord)
    presses = Presses(p.gateway)
    connector.press_ack_after = 0.05  # an ignored press must not be deferred either
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    robot = fast_discord.user(username="robot", bot=True)
    by_bot = fast_discord.user_clicks(channel, robot, ref.message_id, "t:yes")
    # A person's press after it: once that one's deferral (same delay, timer started later)
    # and answer are in, the bot's press would have been acknowledged too had it been taken.
    gate = asyncio.Event()
    presses.gate = gate
    by_person = fast_discord.user_clicks(channel, None, ref.message_id, "t:yes")
    await fast_discord.wait_for(lambda: by_person.acknowledged, what="the person's press deferred")
    gate.set()
    await fast_discord.wait_for(lambda: presses.done >= 1, what="the person's press handled")
    assert [press.user_id for press, _ in presses.seen] == [fast_discord.default_user.id]
    assert by_bot.callbacks == [] and not by_bot.acknowledged


# ---- the 3 s clock -------------------------------------------------------------------------------


@pytest.mark.parametrize("late_reply", ["Approved, a bit late.", None])
async def test_a_slow_gateway_is_deferred_at_2_s_and_its_text_follows_up_ephemerally(
    late_reply, fast_discord, parley
) -> None:
    """The real default (2 s) against the fake's real 3 s clock: the gateway answers at ~2.5 s."""
    p, connector = await start(parley, fast_discord)
    assert connector.press_ack_after == 2.0
    gate = asyncio.Event()
    presses = Presses(p.gateway, reply=late_reply, gate=gate)
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    click = fast_discord.user_clicks(channel, None, ref.message_id, "t:yes")
    await fast_discord.wait_for(lambda: click.acknowledged, timeout=5, what="the connector's own deferral")
    assert presses.done == 0 and len(presses.seen) == 1, "the deferral did not wait for the gateway"
    assert 1.9 <= click.ack_delay < 2.9, f"deferred after {click.ack_delay:.2f}s"
    await fast_discord.wait_for(lambda: fast_discord.clock() - click.created_at >= 2.5, timeout=5,
                                what="2.5 s since the press")
    gate.set()
    await fast_discord.wait_for(lambda: presses.done == 1, what="the late answer")
    if late_reply is None:
        await p.gateway.settle(chat_of(channel).key)
        assert click.followups == []
    else:
        await fast_discord.wait_for(lambda: click.followups, what="the ephemeral follow-up")
        (follow,) = click.followups
        assert follow.ephemeral and follow.content == late_reply
        assert click.ephemeral_texts == [late_reply]
    acked_once(click, 6)
    assert all(not rec.rejected for rec in fast_discord.interactions), "a 10062 or 40060 was provoked"


async def test_the_deferral_delay_is_the_connectors_attribute(fast_discord, parley) -> None:
    p, connector = await start(parley, fast_discord)
    connector.press_ack_after = 0.2
    gate = asyncio.Event()
    Presses(p.gateway, reply="later", gate=gate)
    channel = fast_discord.default_channel
    ref = await connector.outbox.send(chat_of(channel), "Approve?", buttons=APPROVE)
    click = fast_discord.user_clicks(channel, None, ref.message_id, "t:no")
    await fast_discord.wait_for(lambda: click.acknowledged, what="the deferral")
    assert 0.15 <= click.ack_delay < 1.0
    gate.set()
    await fast_discord.wait_for(lambda: click.followups, what="the follow-up")
    acked_once(click, 6)
    assert click.ephemeral_texts == ["later"]


# ---- buttons on a slash command's answer ----------------------------------------------------------


async def slash_inbound(fake: FakeDiscord, p: Any, monkeypatch: Any, channel: Any, user: Any) -> tuple[
        Inbound, FakeInteraction]:
    """Run /help and catch the Inbound the connector hands over, unanswered (the test answers)."""
    caught: list[Inbound] = []

    async def capture(inbound: Inbound) -> None:
        caught.append(inbound)

    monkeypatch.setattr(p.gateway, "handle", capture)
    rec = fake.user_runs_command(channel, user, "help")
    await fake.wait_for(lambda: caught, what="the slash command reached the gateway")
    monkeypatch.undo()
    assert rec.deferred and rec.original.ephemeral and rec.original.loading
    return caught[0], rec


async def test_buttons_on_a_private_slash_answer_and_its_edits(fast_discord, parley, monkeypatch) -> None:
    p, connector = await start(parley, fast_discord)
    presses = Presses(p.gateway, reply="Switched.")
    channel = fast_discord.default_channel
    owner = fast_discord.user(OWNER_DC, "owner")
    inbound, rec = await slash_inbound(fast_discord, p, monkeypatch, channel, owner)

    ref = await connector.outbox.send(inbound.chat, "Pick a model", reply_to=inbound.message_id, private=True,
                                      buttons=[Button("gpt", "t:gpt", "primary"), Button("other", "t:other")])
    original = rec.original
    assert ref.message_id == original.id and original.ephemeral and not original.loading
    assert shown(fast_discord, original.id) == [("gpt", "t:gpt", "primary"), ("other", "t:other", "secondary")]
    await connector.outbox.edit(ref, "Pick a model (2 left)", buttons=[Button("gpt", "t:gpt", "primary")])
    assert shown(fast_discord, original.id) == [("gpt", "t:gpt", "primary")]

    with pytest.raises(ValueError):  # nobody else sees the ephemeral answer, so nobody else can press
        fast_discord.user_clicks(channel, fast_discord.default_user, original.id, "t:gpt")
    click = fast_discord.user_clicks(channel, owner, original.id, "t:gpt")
    await fast_discord.wait_for(lambda: click.ephemeral_texts, what="the press answered")
    (press, rest), = presses.seen
    assert (rest, press.message_id, press.user_id) == ("gpt", original.id, owner.id)
    acked_once(click, 4)

    await connector.outbox.edit(ref, "Model set to gpt.")
    assert fast_discord.message(original.id).buttons == [] and original.content == "Model set to gpt."
    assert not rec.followups

    # A second private answer is an ephemeral follow-up: buttons on it, and on its edits, too.
    more = await connector.outbox.send(inbound.chat, "Also pick a voice", reply_to=inbound.message_id,
                                       private=True, buttons=[Button("calm", "t:calm")])
    (follow,) = rec.followups
    assert follow.id == more.message_id and follow.ephemeral
    assert [b.custom_id for b in follow.buttons] == ["t:calm"]
    click = fast_discord.user_clicks(channel, owner, follow.id, "t:calm")
    await fast_discord.wait_for(lambda: click.ephemeral_texts, what="the press on the follow-up answered")
    assert presses.seen[-1][0].message_id == follow.id
    acked_once(click, 4)
    await connector.outbox.edit(more, "Voice set.")
    assert follow.buttons == [] and follow.content == "Voice set." and not rec.rejected


async def test_buttons_on_a_public_slash_answer_and_its_edits(fast_discord, parley, monkeypatch) -> None:
    p, connector = await start(parley, fast_discord)
    presses = Presses(p.gateway)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    inbound, rec = await slash_inbound(fast_discord, p, monkeypatch, channel, owner)

    ref = await connector.outbox.send(inbound.chat, "Approve the tool call?", reply_to=inbound.message_id,
                                      private=False, buttons=APPROVE)
    (answer,) = rec.followups
    assert rec.original.deleted and not answer.ephemeral and ref.message_id == answer.id
    assert [b.custom_id for b in answer.buttons] == ["t:yes", "t:no"]
    await connector.outbox.edit(ref, "Approve the tool call? (waiting)", buttons=[Button("Approve", "t:yes")])
    assert [b.custom_id for b in answer.buttons] == ["t:yes"]

    click = fast_discord.user_clicks(channel, owner, answer.id, "t:yes")
    await fast_discord.wait_for(lambda: presses.done == 1 and click.acknowledged, what="the press answered")
    assert presses.seen[0][0].message_id == answer.id and presses.seen[0][0].chat.is_private
    acked_once(click, 6)

    await connector.outbox.edit(ref, "Approved.")
    assert answer.buttons == [] and answer.content == "Approved."
    assert not rec.rejected
