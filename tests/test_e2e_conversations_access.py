"""Access control end to end on Telegram: deny by default, allowed groups, blocks, roles.

Real python-telegram-bot connector, real openai SDK, real config and store, against the
fake Telegram and the fake provider (helpers in tests/support/conversations.py).
"""

from __future__ import annotations

from tests.support.stack import OWNER_TG
from tests.support.conversations import key, start

ACCESS_REPLY_START = "🔒 You don't have access to this bot yet."


async def test_unknown_user_in_private_gets_one_access_reply_and_no_model_call(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    stranger = s.user(77, "Stranger")
    chat = s.private(stranger)
    answer = await s.ask(chat, stranger, "hello, who are you?")
    assert answer.startswith(ACCESS_REPLY_START)
    assert "/allow telegram:77" in answer, "the reply says how to get access"
    assert len(answer) < 200 and "\n" not in answer
    # Within the rate-limit window: silence, whatever they send (commands included).
    s.say(chat, stranger, "hello??")
    s.say(chat, stranger, "/start")
    s.say(chat, stranger, "/model other-model")
    await s.barrier()
    assert len(s.bot_msgs(chat)) == 1
    assert fake_llm.requests == [], "nothing from a stranger reaches the model"
    assert (await s.chat_settings(chat)).model is None


async def test_unknown_users_in_groups_are_ignored(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    group = fast_telegram.supergroup("Team")
    stranger = s.user(77, "Stranger")
    s.say(group, stranger, "@parley_bot hello")
    s.say(group, stranger, "/help")
    s.say(group, stranger, "/model other-model")
    await s.barrier()
    assert s.bot_msgs(group) == []
    assert fake_llm.requests == []


async def test_group_allowed_as_a_whole_by_an_admin_works_for_everyone(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    group = fast_telegram.supergroup("Team")
    other_group = fast_telegram.supergroup("Elsewhere")
    stranger = s.user(77, "Stranger")
    assert (await s.ask(group, s.owner, "/allow chat")).startswith("✅ Everyone in this chat")
    assert await s.turn(group, stranger, "@parley_bot hello") == "You said: hello"
    # ...as a plain user: no admin powers come with it.
    assert (await s.ask(group, stranger, "/mode interrupt")).startswith("⛔")
    # Only that group: the same person elsewhere is still unknown.
    s.say(other_group, stranger, "@parley_bot hello")
    s.say(s.private(stranger), stranger, "hello")
    await s.barrier()
    assert s.bot_msgs(other_group) == []
    assert s.bot_texts(s.private(stranger))[0].startswith(ACCESS_REPLY_START)
    # And it can be taken back.
    assert (await s.ask(group, s.owner, "/deny chat")).startswith("🚫 This chat is no longer allowed")
    requests = len(fake_llm.requests)
    s.say(group, stranger, "@parley_bot still there?")
    await s.barrier()
    assert len(fake_llm.requests) == requests
    assert s.bot_texts(group)[-1].startswith("🚫 This chat is no longer allowed")


async def test_allowed_chats_in_config_work_for_everyone(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(parley, fast_telegram, fake_llm, access={"allowed_chats": [key(group)]})
    assert await s.turn(group, s.user(77, "Stranger"), "@parley_bot hi") == "You said: hi"
    assert await s.turn(group, s.user(78, "Another"), "@parley_bot hey") == "You said: hey"


async def test_allow_everyone_lets_strangers_in_but_not_blocked_users(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, access={"allow_everyone": True})
    stranger = s.user(77, "Stranger")
    assert await s.turn(s.private(stranger), stranger, "hi") == "You said: hi"
    assert (await s.ask(s.owner_chat(), s.owner, "/deny 77")) == "🚫 Stranger (telegram:77) may no longer use the bot."
    requests = len(fake_llm.requests)
    s.say(s.private(stranger), stranger, "hi again")
    s.say(s.private(stranger), stranger, "/help")
    await s.barrier()
    assert len(fake_llm.requests) == requests
    assert s.bot_texts(s.private(stranger)) == ["You said: hi"]


async def test_blocked_user_is_ignored_everywhere(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(parley, fast_telegram, fake_llm, access={"allowed_chats": [key(group)]})
    user = s.user(77, "Mallory")
    assert (await s.ask(s.owner_chat(), s.owner, "/allow 77")) == "✅ telegram:77 may now use the bot."
    assert await s.turn(s.private(user), user, "hi") == "You said: hi"
    assert (await s.ask(s.owner_chat(), s.owner, "/deny 77")).startswith("🚫")
    s.say(s.private(user), user, "hi")
    s.say(group, user, "@parley_bot hi")  # a blocked user stays blocked in allowed groups
    s.say(group, user, "/help")
    await s.barrier()
    assert s.bot_texts(s.private(user)) == ["You said: hi"]
    assert s.bot_msgs(group) == []
    assert len(fake_llm.requests) == 1


async def test_allow_by_id_by_username_and_by_reply(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    owner_chat = s.owner_chat()
    by_id = s.user(71, "Ida")
    by_name = s.user(72, "Nell", username="Nell_72")
    by_reply = s.user(73, "Rey")
    # By id.
    assert await s.ask(owner_chat, s.owner, "/allow 71") == "✅ telegram:71 may now use the bot."
    assert await s.turn(s.private(by_id), by_id, "hi") == "You said: hi"
    # By @username: unknown until they write to the bot once...
    answer = await s.ask(owner_chat, s.owner, "/allow @nell_72")
    assert answer.startswith("I don't know @nell_72 yet") and "\n" not in answer
    assert (await s.ask(s.private(by_name), by_name, "let me in")).startswith(ACCESS_REPLY_START)
    assert await s.ask(owner_chat, s.owner, "/allow @nell_72") == "✅ @Nell_72 (telegram:72) may now use the bot."
    assert await s.turn(s.private(by_name), by_name, "thanks") == "You said: thanks"
    # By replying to their message in a group.
    group = fast_telegram.supergroup("Team")
    s.say(group, by_reply, "@parley_bot can I use you?")
    await s.barrier()
    (theirs,) = [m for m in fast_telegram.messages(group.id) if not m.from_bot]
    assert s.bot_msgs(group) == []
    assert await s.ask(group, s.owner, "/allow", reply_to=theirs.message_id) == "✅ Rey (telegram:73) may now use the bot."
    assert await s.turn(group, by_reply, "@parley_bot now?") == "You said: now?"


async def test_owner_promotes_and_demotes_admins(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    owner_chat = s.owner_chat()
    ada = s.user(81, "Ada", username="ada")
    ada_chat = s.private(ada)
    owners = f"Owners (set in the configuration):\n  discord:9001\n  @the_owner (telegram:{OWNER_TG})"
    assert await s.ask(owner_chat, s.owner, "/admins") == f"{owners}\nAdmins: none"
    assert await s.ask(owner_chat, s.owner, "/promote 81") == "⭐ telegram:81 is now an admin."
    assert await s.ask(owner_chat, s.owner, "/admins") == f"{owners}\nAdmins:\n  telegram:81"
    # An admin may now use the bot and run admin commands, but not owner ones.
    assert await s.turn(ada_chat, ada, "hi") == "You said: hi"
    assert await s.ask(ada_chat, ada, "/mode interrupt") == (
        "Busy policy set to interrupt: new messages interrupt the running reply."
    )
    assert await s.ask(ada_chat, ada, "/promote 82") == "⛔ /promote is for owners only."
    assert await s.store.role("telegram:82") is None
    # Demoted: still allowed as a user, no admin powers.
    assert await s.ask(owner_chat, s.owner, "/demote 81") == (
        "@ada (telegram:81) is no longer an admin (still allowed as a user)."
    )
    assert await s.ask(ada_chat, ada, "/mode queue") == "⛔ /mode is for admins only."
    assert await s.ask(owner_chat, s.owner, "/admins") == f"{owners}\nAdmins: none"
    # Owners come from the configuration only.
    assert await s.ask(owner_chat, s.owner, f"/demote {OWNER_TG}") == (
        "⛔ Owners are set in the configuration and cannot be demoted from chat."
    )
    assert await s.ask(owner_chat, s.owner, f"/deny {OWNER_TG}") == (
        "⛔ Owners are set in the configuration and cannot be denied from chat."
    )


async def test_admin_cannot_deny_another_admin_but_an_owner_can(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    a1, a2 = s.user(81, "Ada"), s.user(82, "Abe")
    for admin in (81, 82):
        assert (await s.ask(s.owner_chat(), s.owner, f"/promote {admin}")).startswith("⭐")
    assert await s.ask(s.private(a1), a1, "/deny 82") == "⛔ Only owners can deny an admin."
    assert await s.store.role("telegram:82") == "admin"
    assert (await s.ask(s.owner_chat(), s.owner, "/deny 82")).startswith("🚫")
    assert await s.store.role("telegram:82") == "blocked"
    s.say(s.private(a2), a2, "/status")
    await s.barrier()
    assert s.bot_msgs(s.private(a2)) == []
