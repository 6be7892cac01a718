"""Owners stay in charge (issue 12): the role ladder, ids people type, and what /status shows.

End to end on Telegram: real python-telegram-bot connector, real config and store, real
openai SDK against the fakes (helpers in tests/support/conversations.py). Every refusal
is checked for its words (it says who can) and for changing nothing.
"""

from __future__ import annotations

import pytest

from bots.ids import chat_id_problem, quote_input, user_id_problem
from bots.logs import url_without_secrets
from tests.support.conversations import Stack, start

ADMIN, OTHER_ADMIN, USER = 62, 64, 63


async def ladder(parley, fast_telegram, fake_llm) -> Stack:  # noqa: ANN001
    s = await start(parley, fast_telegram, fake_llm)
    for uid in (ADMIN, OTHER_ADMIN):
        assert (await s.ask(s.owner_chat(), s.owner, f"/promote {uid}")).startswith("⭐")
    assert (await s.ask(s.owner_chat(), s.owner, f"/allow {USER}")).startswith("✅")
    return s


async def test_an_admin_cannot_lift_a_budget_the_owner_set_on_them(fast_telegram, fake_llm, parley) -> None:
    s = await ladder(parley, fast_telegram, fake_llm)
    admin = s.user(ADMIN)
    assert await s.ask(s.owner_chat(), s.owner, f"/budget {ADMIN} 100") == f"telegram:{ADMIN} may now use 100 tokens per day."
    before = s.state()
    for text in (f"/budget {ADMIN} off", f"/budget {ADMIN} 999999", f"/budget telegram:{ADMIN} off"):
        assert await s.ask(s.private(admin), admin, text) == "⛔ You can't change your own budget; only an owner can."
    # Nor through another admin: the owner's decision outranks them too.
    other = s.user(OTHER_ADMIN)
    assert await s.ask(s.private(other), other, f"/budget {ADMIN} off") == (
        f"⛔ User{ADMIN} (telegram:{ADMIN}) is an admin like you; only an owner can change their budget."
    )
    assert s.state() == before
    assert await s.store.budget(f"telegram:{ADMIN}") == 100


async def test_an_admin_cannot_allow_a_user_the_owner_blocked(fast_telegram, fake_llm, parley) -> None:
    s = await ladder(parley, fast_telegram, fake_llm)
    admin = s.user(ADMIN)
    assert (await s.ask(s.owner_chat(), s.owner, f"/deny {USER}")).startswith("🚫")
    before = s.state()
    assert await s.ask(s.private(admin), admin, f"/allow {USER}") == (
        f"⛔ An owner set telegram:{USER}'s access; only an owner can change it."
    )
    assert s.state() == before
    assert await s.store.role(f"telegram:{USER}") == "blocked"
    # An admin's own decision is theirs (and any admin's) to undo; the owner can undo either.
    stranger = 70
    assert (await s.ask(s.private(admin), admin, f"/deny {stranger}")).startswith("🚫")
    assert (await s.ask(s.private(admin), admin, f"/allow {stranger}")).startswith("✅")
    assert (await s.ask(s.owner_chat(), s.owner, f"/allow {USER}")).startswith("✅")
    assert await s.store.role(f"telegram:{USER}") == "user"


async def test_an_admin_cannot_undo_a_chat_setting_the_owner_made(fast_telegram, fake_llm, parley) -> None:
    s = await ladder(parley, fast_telegram, fake_llm)
    admin = s.user(ADMIN)
    group = fast_telegram.supergroup("Team")
    assert await s.ask(group, s.owner, "/model other-model") == "Model for this chat set to other-model."
    assert (await s.ask(group, s.owner, "/allow chat")).startswith("✅")
    before = s.state()
    refusals = {
        "/model default": "⛔ An owner set this chat's model; only an owner can change it.",
        "/model fake-model": "⛔ An owner set this chat's model; only an owner can change it.",
        "/deny chat": "⛔ An owner set this chat's access; only an owner can change it.",
    }
    for text, refusal in refusals.items():
        assert await s.ask(group, admin, text) == refusal
    assert s.state() == before
    # What the owner did not decide stays an admin's to change.
    assert (await s.ask(group, admin, "/mode interrupt")).startswith("Busy policy set to interrupt")
    assert await s.ask(group, s.owner, "/model default") == "Model reset to the default, fake-model."
    assert await s.ask(group, admin, "/model other-model") == "Model for this chat set to other-model."


async def test_nobody_acts_on_their_own_role_or_an_equal(fast_telegram, fake_llm, parley) -> None:
    s = await ladder(parley, fast_telegram, fake_llm)
    admin = s.user(ADMIN)
    before = s.state()
    assert await s.ask(s.private(admin), admin, f"/deny {ADMIN}") == "⛔ You can't change your own access; only an owner can."
    assert await s.ask(s.private(admin), admin, f"/deny {OTHER_ADMIN}") == "⛔ Only owners can deny an admin."
    assert s.state() == before


async def test_promote_and_demote_never_lift_a_block(fast_telegram, fake_llm, parley) -> None:
    s = await ladder(parley, fast_telegram, fake_llm)
    assert (await s.ask(s.owner_chat(), s.owner, f"/deny {USER}")).startswith("🚫")
    assert await s.ask(s.owner_chat(), s.owner, f"/promote {USER}") == (
        f"telegram:{USER} is blocked.\nSend /allow telegram:{USER} first, then /promote."
    )
    assert await s.ask(s.owner_chat(), s.owner, f"/demote {USER}") == (
        f"telegram:{USER} is blocked, not an admin (/allow lifts the block)."
    )
    assert await s.store.role(f"telegram:{USER}") == "blocked"


async def test_other_commands_on_a_blocked_user_say_so_and_keep_the_block(fast_telegram, fake_llm, parley) -> None:
    """Issue 13.5: a budget, a second /deny, /budget's view -- each says the user is blocked,
    none lifts the block; only /allow does, and says it did."""
    s = await ladder(parley, fast_telegram, fake_llm)
    owner = s.owner_chat()
    assert (await s.ask(owner, s.owner, f"/deny {USER}")).startswith("🚫")
    assert await s.ask(owner, s.owner, f"/budget {USER} 100") == (
        f"telegram:{USER} may now use 100 tokens per day.\nThey stay blocked until /allow lifts the block."
    )
    assert await s.ask(owner, s.owner, f"/budget {USER}") == (
        f"Budget of telegram:{USER}: 100 tokens per day\nUsed today: 0 tokens\n⛔ Blocked: /allow lifts the block."
    )
    assert await s.ask(owner, s.owner, f"/deny {USER}") == f"telegram:{USER} is blocked already."
    assert await s.store.role(f"telegram:{USER}") == "blocked"
    assert await s.ask(owner, s.owner, f"/allow {USER}") == (
        f"✅ telegram:{USER} is no longer blocked and may use the bot."
    )
    assert await s.store.role(f"telegram:{USER}") == "user"
    assert await s.ask(owner, s.owner, f"/allow {USER}") == f"telegram:{USER} may use the bot already."


BAD_IDS = [
    ("/allow " + "9" * 5000, "is not a user id: that number is too large for a telegram user id."),
    ("/allow 0", "'0' is not a user id: a telegram user id is a positive whole number."),
    ("/allow -5", "'-5' is not a user id: a telegram user id is a positive whole number."),
    ("/promote " + "1" * 300, "is not a user id: that number is too large for a telegram user id."),
    ("/budget 00063 5", "'00063' is not a user id: a telegram user id is a positive whole number."),
    ("/deny discord:0", "'0' is not a user id: a discord user id is a positive whole number."),
    ("/allow discord:" + "9" * 21, "is not a user id: that number is too large for a discord user id."),
    ("/allow @" + "x" * 300, "is not a user: name one by id or @username, or reply to one of their messages."),
]


async def test_ids_no_platform_could_send_are_refused_and_not_echoed(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    before = s.state()
    for text, ending in BAD_IDS:
        answer = await s.ask(s.owner_chat(), s.owner, text)
        assert answer.endswith(ending), (text[:40], answer)
        assert len(answer) < 160 and "\n" not in answer, answer
    assert s.state() == before


async def test_a_long_argument_is_never_echoed_back_whole(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    junk = "A" * 5000 + "\n<b>bold</b>\n" + "B" * 100
    answer = await s.ask(s.owner_chat(), s.owner, "/model " + junk)
    assert answer == "Unknown model 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA…'. Available: fake-model, other-model"
    assert (await s.chat_settings(s.owner_chat())).model is None


@pytest.mark.parametrize(
    "base_path",
    ["/v1?api-key=sk-querysecret123", "/v1"],
)
async def test_status_never_shows_credentials_of_the_provider_url(
    fast_telegram, fake_llm, parley, base_path: str
) -> None:
    # The provider URL carries a password and (first case) a key in its query: /status
    # names the host only in a group, and shows the endpoint without either to an owner
    # in private.
    host_port = fake_llm.base_url.split("://", 1)[1].split("/", 1)[0]
    url = f"http://alice:hunter2-secret@{host_port}{base_path}"
    s = await start(parley, fast_telegram, fake_llm, provider={"base_url": url})
    admin = s.user(ADMIN)
    await s.store.set_role(f"telegram:{ADMIN}", "admin")
    group = fast_telegram.supergroup("Team")
    in_group = await s.ask(group, admin, "/status")
    owner_private = await s.ask(s.owner_chat(), s.owner, "/status")
    for answer in (in_group, owner_private):
        assert "hunter2" not in answer and "alice" not in answer and "querysecret" not in answer, answer
        assert "Provider: 127.0.0.1" in answer
    assert "Configuration" not in in_group and "endpoint" not in in_group
    assert f"endpoint: http://{host_port}/v1" in owner_private
    # Owner, but in a group: no configuration details either.
    assert "endpoint" not in await s.ask(group, s.owner, "/status")
    # Every line is for people: no Python reprs.
    assert "{" not in owner_private and "'" not in owner_private


def test_platform_id_rules() -> None:
    assert user_id_problem("telegram", "123456") is None
    assert user_id_problem("telegram", str(2**63 - 1)) is None
    assert user_id_problem("telegram", str(2**63)) is not None
    assert user_id_problem("discord", str(2**64 - 1)) is None
    assert user_id_problem("discord", str(2**64)) is not None
    assert user_id_problem("discord", "0") is not None
    assert user_id_problem("console", "local") is None
    assert chat_id_problem("telegram", "-1001234567890") is None
    assert chat_id_problem("telegram", "-0") is not None
    assert chat_id_problem("discord", "-5") is not None


def test_echoes_are_short_single_line_and_quoted() -> None:
    assert quote_input("gpt-4o") == "'gpt-4o'"
    shown = quote_input("x" * 500 + "\n\x00y")
    assert len(shown) == 42 and shown.endswith("…'") and "\n" not in shown
    assert quote_input("a\nb\tc") == "'a b c'"


def test_urls_shown_in_chat_lose_userinfo_and_query() -> None:
    assert url_without_secrets("https://u:p@api.example.com:8443/v1/?api-key=k#f") == "https://api.example.com:8443/v1"
    assert url_without_secrets("http://[::1]:9/v1") == "http://[::1]:9/v1"
    assert url_without_secrets("nonsense") == "(not a URL)"


def test_configured_owners_and_chats_must_be_ids_a_platform_could_send() -> None:
    from bots.config import ConfigProblems, load_config

    env = {"PARLEY_ACCESS__OWNERS": "telegram:0,discord:" + "9" * 30, "PARLEY_ACCESS__ALLOWED_CHATS": "telegram:-0"}
    with pytest.raises(ConfigProblems) as caught:
        load_config(env=env, env_file=None)
    text = str(caught.value)
    assert "access.owners[0]: '0' is not a user_id: a telegram user id is a positive whole number" in text
    assert "access.owners[1]:" in text and "too large for a discord user id" in text
    assert "access.allowed_chats[0]:" in text


async def test_in_a_group_a_member_stops_only_their_own_reply(fast_telegram, fake_llm, parley) -> None:
    import asyncio

    from tests.fakes.llm import Reply
    from tests.support.conversations import key

    s = await start(parley, fast_telegram, fake_llm)
    group = fast_telegram.supergroup("Team")
    assert (await s.ask(group, s.owner, "/allow chat")).startswith("✅")
    ann, bob = s.user(71, "Ann"), s.user(72, "Bob")
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Ann's long answer here.", chunk=5, hold=gate, hold_at=1), Reply.text("Bob's answer."))
    s.say(group, ann, "@parley_bot tell me a story")
    await fast_telegram.wait_for(lambda: len(fake_llm.requests) == 1 and len(s.bot_msgs(group)) >= 2, timeout=10)
    s.say(group, bob, "@parley_bot and my question")  # queued behind Ann's reply
    await fast_telegram.wait_for(lambda: any("right after" in t for t in s.bot_texts(group)), timeout=10)
    # Bob may not stop Ann's reply, nor reset the group's conversation; his own queued
    # message is his to drop.
    assert await s.ask(group, bob, "/stop") == (
        "⏹️ Dropped 1 of your queued message. The reply being written is someone else's; only admins can stop it."
    )
    assert await s.ask(group, bob, "/stop") == "⛔ The reply being written is someone else's; only admins can stop it."
    assert await s.ask(group, bob, "/new") == "⛔ Only admins can start a new conversation for the whole group here."
    assert s.gateway.lanes.is_busy(key(group))
    # Ann may stop her own.
    assert await s.ask(group, ann, "/stop") == "⏹️ Stopped."
    gate.set()
    await s.settle(group)
    assert len(fake_llm.requests) == 1, "Bob's dropped message never reached the model"
    # An admin may let everyone do it.
    assert await s.ask(group, s.owner, "/control everyone") == (
        "Everyone here may now stop any reply and reset the group's conversation."
    )
    assert await s.ask(group, bob, "/new") == "🆕 Started a new conversation."
    assert await s.ask(group, bob, "/control admins") == "⛔ /control is for admins only."
