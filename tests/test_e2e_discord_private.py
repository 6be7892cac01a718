"""Discord answers the caller alone when the answer concerns the caller alone (issue 12, point 7).

Real discord.py and the whole parley App against the fake Discord (`tests/fakes/discord.py`).
Every slash command is deferred ephemerally, so even its "thinking…" is seen by the caller
only. Access denials, usage errors and what the caller asked about themselves (/usage,
/status, /admins) replace that ephemeral response; answers for the whole channel (/new, a
/retry's streamed reply) delete it and follow up publicly. A stranger's `!` commands in a
server channel get nothing at all.
"""

from __future__ import annotations

import pytest

from tests.fakes.discord import FakeInteraction, SeenMessage
from tests.fakes.llm import Reply
from tests.support.stack import OWNER_DC

DENIAL = "🔒 You don't have access to this bot yet."


def chat_key(channel) -> str:  # noqa: ANN001
    return f"discord:{channel.id}"


def public_bot_messages(fake, channel) -> list[SeenMessage]:  # noqa: ANN001
    """Every message of the bot that everyone in the channel saw, deleted ones included."""
    return [m for m in fake.messages(channel) if m.from_bot and not m.ephemeral]


async def run(fake, p, channel, who, name: str, options=None) -> FakeInteraction:  # noqa: ANN001
    """Run a slash command and wait until it was answered (its "thinking…" replaced)."""
    rec = fake.user_runs_command(channel, who, name, options or {})

    def answered() -> bool:
        original = rec.original
        return original is not None and (bool(rec.followups) or not (original.loading or original.deleted))

    await fake.wait_for(answered, timeout=10, what=f"an answer to /{name}")
    await p.gateway.settle(chat_key(channel))
    assert rec.deferred and not rec.rejected
    assert rec.original.ephemeral, f"/{name} was deferred publicly: everyone saw the bot thinking"
    return rec


def private_answer(rec: FakeInteraction) -> str:
    """The answer only the caller saw: the ephemeral response, edited once, nothing else."""
    assert rec.original.ephemeral and not rec.original.deleted and not rec.original.loading
    assert rec.original.versions[0] == "" and len(rec.original.edits) == 1
    assert not rec.followups, f"/{rec.name} also posted {[m.content for m in rec.followups]}"
    return rec.original.content


def public_answer(rec: FakeInteraction) -> SeenMessage:
    """The answer everyone saw: the ephemeral "thinking…" is gone, one public follow-up."""
    assert rec.original.deleted, f"/{rec.name} left its ephemeral 'thinking…' behind"
    (answer,) = rec.followups
    assert not answer.ephemeral and not answer.deleted
    return answer


async def test_a_strangers_slash_commands_are_denied_to_them_alone_every_time(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    stranger = fast_discord.default_user
    channel = fast_discord.default_channel
    for name, options in [("model", {}), ("model", {"name": "other-model"}), ("help", {})]:
        rec = await run(fast_discord, p, channel, stranger, name, options)
        assert private_answer(rec).startswith(DENIAL)
    # A blocked user's slash command is answered too (else Discord shows "The application
    # did not respond"), to them alone.
    blocked = fast_discord.user(username="mallory")
    await p.store.set_role(f"discord:{blocked.id}", "blocked")
    rec = await run(fast_discord, p, channel, blocked, "new")
    assert private_answer(rec) == "⛔ You can't use this bot."
    assert public_bot_messages(fast_discord, channel) == []
    assert len([m for m in fast_discord.messages(channel) if m.from_bot]) == 4
    assert fake_llm.requests == []


async def test_answers_about_the_caller_and_usage_errors_are_ephemeral(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord, overrides={"access": {"allow_everyone": True}})
    owner = fast_discord.user(OWNER_DC, "owner")
    user = fast_discord.default_user
    channel = fast_discord.default_channel
    assert private_answer(await run(fast_discord, p, channel, user, "usage")).startswith("Your usage")
    assert private_answer(await run(fast_discord, p, channel, user, "help")).startswith("Commands you can use")
    assert private_answer(await run(fast_discord, p, channel, owner, "status")) != ""
    assert private_answer(await run(fast_discord, p, channel, owner, "admins")) != ""
    assert private_answer(await run(fast_discord, p, channel, owner, "usage")).startswith("Your usage")
    # Role denials and usage errors.
    assert private_answer(await run(fast_discord, p, channel, user, "status")).startswith("⛔")
    assert private_answer(await run(fast_discord, p, channel, user, "model", {"name": "other-model"})).startswith("⛔")
    bad = await run(fast_discord, p, channel, owner, "budget", {"user": str(user.id), "tokens": "lots"})
    assert private_answer(bad).startswith("Usage: /budget")
    unknown = await run(fast_discord, p, channel, owner, "model", {"name": "no-such-model"})
    assert private_answer(unknown).startswith("Unknown model")
    assert await p.store.budget(f"discord:{user.id}") is None
    assert (await p.store.chat_settings(chat_key(channel))).model is None
    assert public_bot_messages(fast_discord, channel) == []


@pytest.mark.parametrize("where", ["guild", "dm"])
async def test_new_is_answered_for_everyone_without_a_leftover_thinking(where, fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel if where == "guild" else fast_discord.dm_channel(owner)
    rec = await run(fast_discord, p, channel, owner, "new")
    answer = public_answer(rec)
    assert answer.content == "🆕 Started a new conversation."
    assert answer.versions == [answer.content] and answer.allowed_mentions == {"parse": []}
    assert public_bot_messages(fast_discord, channel) == [answer]
    assert [m.content for m in fast_discord.messages(channel) if m.from_bot and not m.deleted] == [answer.content]


async def test_model_switch_is_public(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    rec = await run(fast_discord, p, channel, owner, "model", {"name": "other-model"})
    assert public_answer(rec).content == "Model for this chat set to other-model."
    assert (await p.store.chat_settings(chat_key(channel))).model == "other-model"


async def test_retry_streams_its_answer_publicly_in_one_message(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    key = chat_key(channel)
    fake_llm.script(Reply.text("A first answer."))
    fast_discord.user_says(channel, owner, "tell me something", mentions_bot=True)
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["A first answer."], timeout=10)
    await p.gateway.settle(key)
    (first,) = public_bot_messages(fast_discord, channel)

    answer = " ".join(f"again{i}" for i in range(80))
    fake_llm.script(Reply.text(answer, chunk=12, delay=0.01))
    rec = fast_discord.user_runs_command(channel, owner, "retry")
    await fast_discord.wait_for(lambda: [m.content for m in rec.followups] == [answer], timeout=15)
    await p.gateway.settle(key)

    assert rec.deferred and not rec.rejected and rec.original.ephemeral
    streamed = public_answer(rec)
    versions = streamed.versions
    assert len(versions) >= 3, f"the retried answer was not streamed: {versions}"
    assert all(answer.startswith(v.rstrip()) for v in versions)
    assert streamed.content == answer
    assert public_bot_messages(fast_discord, channel) == [first, streamed]
    assert fake_llm.requests[-1].messages[-1]["content"] == "tell me something"


async def test_strangers_prefix_commands_in_a_server_get_nothing(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    stranger = fast_discord.default_user
    blocked = fast_discord.user(username="mallory")
    await p.store.set_role(f"discord:{blocked.id}", "blocked")
    channel = fast_discord.default_channel
    for who in (stranger, blocked):
        for text in ("!model", "!model other-model", "!help", "!nosuchcommand", "!status"):
            fast_discord.user_says(channel, who, text)
        fast_discord.user_says(channel, who, f"<@{fast_discord.bot_user.id}> !usage", mentions_bot=True)
    # The owner's command after them: one chat's messages are handled in order, so once this
    # is answered every message before it was handled -- and answered nothing.
    marker = fast_discord.user_says(channel, owner, "!stop")
    await fast_discord.wait_for(lambda: any(m.reference == marker["id"] for m in fast_discord.messages(channel)))
    await p.gateway.settle(chat_key(channel))
    (only,) = [m for m in fast_discord.messages(channel) if m.from_bot]
    assert only.reference == marker["id"]
    assert (await p.store.chat_settings(chat_key(channel))).model is None
    assert fake_llm.requests == []


async def test_a_private_answer_is_never_posted_publicly_when_the_interaction_is_gone(
    fast_discord, fake_llm, parley
) -> None:
    # The acknowledgement came too late (the fake refuses it with 10062, like Discord past
    # 3 s): a public answer still reaches the channel as a plain message, a private one in
    # a server channel is dropped rather than shown to everyone.
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    stranger = fast_discord.default_user
    channel = fast_discord.default_channel
    denied = fast_discord.user_runs_command(channel, stranger, "model")
    switched = fast_discord.user_runs_command(channel, owner, "model", {"name": "other-model"})
    for rec in (denied, switched):  # before parley hears of them: already past the deadline
        rec.created_at -= 60
    await fast_discord.wait_for(lambda: "Model for this chat set to other-model." in fast_discord.bot_texts(channel),
                               timeout=10)
    await p.gateway.settle(chat_key(channel))
    assert denied.rejected[:1] == [10062] and switched.rejected[:1] == [10062]
    assert not denied.acknowledged and not switched.acknowledged
    assert [m.content for m in public_bot_messages(fast_discord, channel)] == ["Model for this chat set to other-model."]
    assert [m for m in fast_discord.messages(channel) if m.from_bot and m.ephemeral] == []
