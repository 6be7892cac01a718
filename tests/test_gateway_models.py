"""Picking models in a chat, and replies another model gave: a real Gateway, Store and
Agent against two fake providers; the platform is the in-memory Outbox (with buttons)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from agent.providers import Catalogue, ModelSpec
from bots.access import Access, AccessPolicy
from bots.gateway import ChatDefaults, Gateway
from bots.inbound import ButtonPress, Inbound
from bots.model_choice import model_token
from bots.outbox import ChatRef
from bots.store import Store
from tests.fakes.llm import FakeLLM, Reply
from tests.support.crash import wait_until
from tests.test_gateway import MemoryConnector

PRIVATE = ChatRef("memory", "3", is_private=True)
GROUP = ChatRef("memory", "-100", is_private=False)
OWNER, ADMIN, USER = "1", "2", "3"
_ids = itertools.count(1)


@pytest.fixture
async def backup_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(listed_models=("backup-model",)) as fake:
        yield fake


def message(chat: ChatRef, user: str, text: str, *, command: str | None = None, args: str = "") -> Inbound:
    n = next(_ids)
    return Inbound(chat, user, text, message_id=str(n), update_id=f"m{n}", command=command, args=args,
                   mentions_bot=True)


@pytest.fixture
async def stack(sqlite_url: str, fake_llm: FakeLLM, backup_llm: FakeLLM) -> AsyncIterator[Any]:
    store = await Store.open(sqlite_url)
    await store.set_role(f"memory:{ADMIN}", "admin")
    await store.set_role(f"memory:{USER}", "user")
    cat = Catalogue(
        {"main": fake_llm.config(), "spare": backup_llm.config()},
        (
            ModelSpec("fake-model", "main", display_name="Main Model"),
            ModelSpec("backup", "spare", id="backup-model", display_name="Backup Model"),
            ModelSpec("big", "main", id="other-model", display_name="Big Model"),
        ),
        fallback=("backup",),
    )
    agent = Agent(cat, tools=ToolRegistry())
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({f"memory:{OWNER}"}))),
        defaults=ChatDefaults(model="fake-model", models=("backup", "big"), model_roles={"big": "admin"}),
    )
    connector = MemoryConnector()
    gateway.attach(connector)
    try:
        yield gateway, connector
    finally:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


async def ask(gateway: Gateway, inbound: Inbound) -> None:
    await gateway.handle(inbound)
    await gateway.settle(inbound.chat.key)


async def press(gateway: Gateway, chat: ChatRef, user: str, message_id: str, data: str) -> list[tuple[Any, bool]]:
    answers: list[tuple[Any, bool]] = []

    async def answer(text: str | None, alert: bool) -> None:
        answers.append((text, alert))

    await gateway.on_button(ButtonPress(chat, user, message_id, data, answer))
    return answers


async def picker(connector: MemoryConnector) -> Any:
    return await wait_until(
        lambda: next((m for m in reversed(connector.outbox.visible()) if m.buttons), None), timeout=10, what="a picker"
    )


async def test_in_a_private_chat_each_person_picks_their_own_model(stack: Any, fake_llm: FakeLLM, backup_llm) -> None:
    gateway, connector = stack
    await ask(gateway, message(PRIVATE, USER, "/model", command="model"))
    shown = await picker(connector)
    assert shown.text == "Model in this chat: Main Model (default)\nAvailable: Main Model, Backup Model"
    assert [b.label for b in shown.buttons] == ["✓ Main Model", "Backup Model"]  # "big" is for admins
    answers = await press(gateway, PRIVATE, USER, shown.id, shown.buttons[1].data)
    assert answers == [("Model for this chat set to Backup Model.", False)]
    backup_llm.script(Reply.text("From the backup."))
    await ask(gateway, message(PRIVATE, USER, "hi"))
    assert backup_llm.requests[-1].model == "backup-model" and fake_llm.requests == []
    assert connector.texts()[-1] == "From the backup."


async def test_in_a_group_only_admins_switch_and_the_mark_moves(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector = stack
    await ask(gateway, message(GROUP, ADMIN, "/model", command="model"))
    shown = await picker(connector)
    assert shown.text == "Model in this chat: Main Model (default)\nAvailable: Main Model, Backup Model, Big Model"
    assert [b.label for b in shown.buttons] == ["✓ Main Model", "Backup Model", "Big Model"]
    big = shown.buttons[2].data
    assert await press(gateway, GROUP, USER, shown.id, big) == [("You can't use Big Model.", True)]
    backup = shown.buttons[1].data
    assert await press(gateway, GROUP, USER, shown.id, backup) == [("Only admins can switch the model.", True)]
    assert await press(gateway, GROUP, ADMIN, shown.id, big) == [("Model for this chat set to Big Model.", False)]
    edited = connector.outbox.messages[shown.id]
    assert edited.text == "Model in this chat: Big Model\nAvailable: Main Model, Backup Model, Big Model"
    assert [b.label for b in edited.buttons] == ["Main Model", "Backup Model", "✓ Big Model"]
    fake_llm.script(Reply.text("Big answer."))
    await ask(gateway, message(GROUP, USER, "hi"))
    assert fake_llm.requests[-1].model == "other-model"


async def test_model_by_display_name_and_refusals(stack: Any) -> None:
    gateway, connector = stack
    await ask(gateway, message(PRIVATE, USER, "/model backup model", command="model", args="backup model"))
    assert connector.texts()[-1] == "Model for this chat set to Backup Model."
    await ask(gateway, message(PRIVATE, USER, "/model big", command="model", args="big"))
    assert connector.texts()[-1] == "Unknown model 'big'. Available: Main Model, Backup Model"
    await ask(gateway, message(PRIVATE, USER, "/model default", command="model", args="default"))
    assert connector.texts()[-1] == "Model reset to the default, Main Model."


async def test_a_stale_button_for_a_removed_model_says_so(stack: Any) -> None:
    gateway, _ = stack
    answers = await press(gateway, PRIVATE, USER, "999", f"mp:{model_token('retired-model')}")
    assert answers == [("That model is no longer available.", False)]


async def test_a_reply_another_model_gave_says_which(stack: Any, fake_llm: FakeLLM, backup_llm: FakeLLM) -> None:
    gateway, connector = stack
    fake_llm.outage = 503
    backup_llm.script(Reply.text("The backup answers."))
    await ask(gateway, message(PRIVATE, USER, "hi"))
    assert connector.texts()[-1] == (
        "The backup answers.\n\n↪️ Answered by Backup Model: Main Model is unavailable right now."
    )
    from datetime import UTC, datetime, timedelta

    rows = await gateway.store.usage(since=datetime.now(UTC) - timedelta(hours=1), user_key=f"memory:{USER}")
    assert [row.model for row in rows] == ["backup-model"]  # booked to the model that answered
