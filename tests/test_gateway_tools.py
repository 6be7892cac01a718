"""Tools in a chat: what each role is offered, approval buttons, progress lines.

A real Gateway, Store (SQLite) and Agent against the fake provider; the platform is the
in-memory Outbox (which keeps each message's buttons), so a test sees every question,
presses its buttons as a given person, and reads what the model was told.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent import Agent, ToolRegistry, tool
from agent.tools import current_time
from bots.access import Access, AccessPolicy
from bots.approvals import NOT_YOURS
from bots.gateway import ChatDefaults, Gateway
from bots.inbound import ButtonPress, Inbound
from bots.outbox import ChatRef
from bots.store import Store
from bots.tool_policy import ToolPolicy, ToolRuleSpec
from tests.fakes.llm import FakeLLM, Reply
from tests.support.crash import wait_until
from tests.test_gateway import MemoryConnector

GROUP = ChatRef("memory", "-100", is_private=False)
OWNER, ADMIN, USER, OTHER = "1", "2", "3", "4"
_ids = itertools.count(1)
ran: list[dict[str, Any]] = []


@tool
async def deploy(service: str, force: bool = False) -> str:
    """Deploys a service."""
    ran.append({"service": service, "force": force})
    return f"deployed {service}"


@tool
async def broken() -> str:
    """Always fails."""
    raise RuntimeError("disk quota exceeded on /srv\nTraceback: lots of lines")


def message(user: str, text: str, *, command: str | None = None) -> Inbound:
    n = next(_ids)
    return Inbound(GROUP, user, text, message_id=str(n), update_id=f"t{n}", command=command, mentions_bot=True)


class Presses:
    """Presses buttons as someone and records how each press was answered."""

    def __init__(self, gateway: Gateway, connector: MemoryConnector) -> None:
        self.gateway = gateway
        self.outbox = connector.outbox
        self.answers: list[tuple[str | None, bool]] = []

    def question(self) -> Any:
        asked = [m for m in self.outbox.visible() if m.buttons]
        return asked[-1] if asked else None

    async def wait_question(self) -> Any:
        return await wait_until(self.question, timeout=10, what="a message with buttons")

    async def press(self, user: str, label_start: str) -> None:
        msg = self.question()
        assert msg is not None, "no question to answer"
        button = next(b for b in msg.buttons if b.label.startswith(label_start))

        async def answer(text: str | None, alert: bool) -> None:
            self.answers.append((text, alert))

        await self.gateway.on_button(ButtonPress(GROUP, user, msg.id, button.data, answer))


@pytest.fixture(autouse=True)
def _clear() -> None:
    ran.clear()


async def make_stack(sqlite_url: str, fake_llm: FakeLLM, rules: dict[str, ToolRuleSpec], timeout: float = 30.0):
    store = await Store.open(sqlite_url)
    await store.set_role(f"memory:{ADMIN}", "admin")
    await store.set_role(f"memory:{USER}", "user")
    await store.set_role(f"memory:{OTHER}", "user")
    agent = Agent(fake_llm.config(), tools=ToolRegistry([current_time, deploy, broken]))
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({f"memory:{OWNER}"}))),
        defaults=ChatDefaults(model="fake-model"),
        tool_policy=ToolPolicy(rules),
        approval_timeout=timeout,
    )
    connector = MemoryConnector()
    gateway.attach(connector)
    return gateway, connector, store, agent


@pytest.fixture
async def stack(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[Any]:
    made: list[Any] = []

    async def build(rules: dict[str, ToolRuleSpec] | None = None, timeout: float = 30.0) -> Any:
        gateway, connector, store, agent = await make_stack(sqlite_url, fake_llm, rules or {}, timeout)
        made.append((gateway, store, agent))
        return gateway, connector, Presses(gateway, connector)

    yield build
    for gateway, store, agent in made:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


def offered(request: Any) -> list[str]:
    return [t["function"]["name"] for t in request.body.get("tools") or ()]


async def test_each_role_is_offered_only_what_it_may_use(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, _, _ = await stack({"deploy": ToolRuleSpec(allow="owner"), "broken": ToolRuleSpec(allow="off")})
    for user in (USER, ADMIN, OWNER):
        fake_llm.script(Reply.text("ok"))
        await gateway.handle(message(user, "hi"))
        await gateway.settle(GROUP.key)
    user_req, admin_req, owner_req = fake_llm.requests
    assert offered(user_req) == ["current_time"]
    assert offered(admin_req) == ["current_time"]
    assert offered(owner_req) == ["current_time", "deploy"]  # "off" is off for owners too


async def test_by_default_module_tools_are_for_admins(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, _, _ = await stack()
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]), Reply.text("I can't."))
    await gateway.handle(message(USER, "deploy web"))  # the model names a tool it was not offered
    await gateway.settle(GROUP.key)
    assert ran == []
    assert offered(fake_llm.requests[0]) == ["current_time"]
    assert "unknown tool 'deploy'" in fake_llm.requests[1].messages[-1]["content"]


async def test_approve_by_the_asker_runs_the_tool_and_removes_the_buttons(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, presses = await stack({"deploy": ToolRuleSpec(allow="user", approval="always")})
    fake_llm.script(
        Reply.tool_calls([("deploy", {"service": "web\nrm -rf /", "force": True})], text_before="Deploying now."),
        Reply.text("Deployed web."),
    )
    await gateway.handle(message(USER, "deploy web"))
    question = await presses.wait_question()
    assert question.text == "🔐 Run deploy?\nservice: web rm -rf /\nforce: true"  # flattened, pre-tool text hidden
    assert [b.label for b in question.buttons] == ["✅ Approve", "❌ Deny"]
    assert all(len(b.data.encode()) <= 64 for b in question.buttons)
    await presses.press(OTHER, "✅")  # someone else in the group
    assert presses.answers == [(NOT_YOURS, True)]
    assert ran == [] and presses.question() is not None  # still waiting
    await presses.press(USER, "✅")
    await gateway.settle(GROUP.key)
    assert presses.answers[-1] == ("Approved.", False)
    assert ran == [{"service": "web\nrm -rf /", "force": True}]
    assert connector.texts() == ["Deployed web."]
    assert presses.question() is None  # no buttons left anywhere
    assert fake_llm.requests[1].messages[-1]["content"] == "deployed web\nrm -rf /"


async def test_an_admin_may_answer_for_someone_else(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, _, presses = await stack({"deploy": ToolRuleSpec(allow="user", approval="always")})
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]), Reply.text("Not deployed."))
    await gateway.handle(message(USER, "deploy web"))
    await presses.wait_question()
    await presses.press(ADMIN, "❌")
    await gateway.settle(GROUP.key)
    assert ran == []
    assert fake_llm.requests[1].messages[-1]["content"] == "Not run: an admin denied it."


async def test_deny_tells_the_model_and_shows_a_lock_line(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, presses = await stack({"deploy": ToolRuleSpec(allow="user", approval="always")})
    release = asyncio.Event()
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]), Reply.text("OK, I won't.", hold=release, hold_at=0))
    await gateway.handle(message(USER, "deploy web"))
    await presses.wait_question()
    await presses.press(USER, "❌")
    msg = await wait_until(
        lambda: next((m for m in connector.outbox.visible() if m.text == "🔒 deploy: denied"), None),
        timeout=10, what="the lock line",
    )
    assert not msg.buttons
    release.set()
    await gateway.settle(GROUP.key)
    assert ran == [] and connector.texts() == ["OK, I won't."]
    assert fake_llm.requests[1].messages[-1]["content"] == "Not run: the user denied it."
    assert presses.answers == [("Denied.", False)]


async def test_no_answer_in_time_counts_as_deny(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, presses = await stack({"deploy": ToolRuleSpec(allow="user", approval="always")}, timeout=0.3)
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]), Reply.text("Nobody said yes."))
    await gateway.handle(message(USER, "deploy web"))
    await gateway.settle(GROUP.key)
    assert ran == []
    assert fake_llm.requests[1].messages[-1]["content"] == "Not run: nobody approved it within 0.3 seconds."
    (msg,) = connector.outbox.visible()
    assert any(text == "🔒 deploy: no answer in time" for _, text, _ in msg.history)
    assert not msg.buttons


async def test_a_press_after_the_question_closed_is_told_so(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, presses = await stack({"deploy": ToolRuleSpec(allow="user", approval="always")})
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]), Reply.text("Done."))
    await gateway.handle(message(USER, "deploy web"))
    question = await presses.wait_question()
    stale = question.buttons
    await presses.press(USER, "✅")
    await gateway.settle(GROUP.key)
    answers: list[tuple[str | None, bool]] = []

    async def answer(text: str | None, alert: bool) -> None:
        answers.append((text, alert))

    await gateway.on_button(ButtonPress(GROUP, USER, question.id, stale[1].data, answer))
    assert answers == [("This is no longer waiting for an answer.", False)]
    assert len(ran) == 1


async def test_stop_while_waiting_stops_the_turn_and_clears_the_question(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, presses = await stack({"deploy": ToolRuleSpec(allow="user", approval="always")})
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]))
    await gateway.handle(message(USER, "deploy web"))
    await presses.wait_question()
    await gateway.handle(message(USER, "/stop", command="stop"))
    await gateway.settle(GROUP.key)
    assert ran == [] and presses.question() is None
    assert gateway.approvals.waiting == 0
    assert len(fake_llm.requests) == 1
    assert any("stopped" in text for text in connector.texts())


async def test_ask_once_per_chat_asks_once(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, _, presses = await stack({"dep*": ToolRuleSpec(allow="user", approval="ask_once_per_chat")})
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "web"})]), Reply.text("One."))
    await gateway.handle(message(USER, "deploy web"))
    await presses.wait_question()
    await presses.press(USER, "✅")
    await gateway.settle(GROUP.key)
    fake_llm.script(Reply.tool_calls([("deploy", {"service": "db"})]), Reply.text("Two."))
    await gateway.handle(message(OTHER, "deploy db"))
    await gateway.settle(GROUP.key)
    assert [r["service"] for r in ran] == ["web", "db"]  # the second was not asked about
    assert await gateway.store.tool_approved(GROUP.key, "deploy") == f"memory:{USER}"


async def test_a_failing_tool_shows_one_short_line_never_its_output(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await stack({"broken": ToolRuleSpec(allow="user")})
    release = asyncio.Event()
    fake_llm.script(Reply.tool_calls([("broken", {})]), Reply.text("It failed.", hold=release, hold_at=0))
    await gateway.handle(message(USER, "try"))
    await wait_until(
        lambda: any(m.text == "❌ broken: RuntimeError: disk quota exceeded on /srv" for m in connector.outbox.visible()),
        timeout=10, what="the failure line",
    )
    release.set()
    await gateway.settle(GROUP.key)
    assert connector.texts() == ["It failed."]
    assert "Traceback" in fake_llm.requests[1].messages[-1]["content"]  # the model gets it all
