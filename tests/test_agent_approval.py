"""The approver and per-turn tool sets, through the real openai SDK against the fake provider."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent import Agent, ToolRegistry, tool
from agent.events import Approval, ToolCall
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents

ran: list[str] = []


@tool
async def delete_file(path: str) -> str:
    """Deletes a file."""
    ran.append(path)
    return f"deleted {path}"


@tool
async def get_time() -> str:
    """The time."""
    return "noon"


class ScriptedApprover:
    """Grants what `grant` says, records what it was asked, optionally waits for a release."""

    def __init__(self, grant: dict[str, bool], *, hold: asyncio.Event | None = None) -> None:
        self.grant = grant
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.hold = hold
        self.waiting = asyncio.Event()
        self.cancelled = False

    async def approve(self, call: ToolCall, arguments: dict[str, Any]) -> Approval:
        self.asked.append((call.name, arguments))
        if self.hold is not None:
            self.waiting.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if self.grant.get(call.name, True):
            return Approval(True)
        return Approval(False, "the user denied it")


@pytest.fixture(autouse=True)
def _clear() -> None:
    ran.clear()


def agent_for(fake: FakeLLM, api: str = "chat_completions") -> Agent:
    return Agent(fake.config(api=api), tools=ToolRegistry([delete_file, get_time]))


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_denied_call_never_runs_and_the_model_is_told(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(
        Reply.tool_calls([("delete_file", {"path": "/etc/passwd"}), ("get_time", {})]),
        Reply.text("I was not allowed to delete it; it is noon."),
    )
    approver = ScriptedApprover({"delete_file": False})
    events = RecordingEvents()
    async with agent_for(fake_llm, api) as agent:
        result = await agent.run_turn([], "delete it", events, approver=approver)
    assert ran == []
    assert approver.asked == [("delete_file", {"path": "/etc/passwd"}), ("get_time", {})]
    assert [c.name for c in events.started] == ["get_time"]  # a denied call never starts
    finished = {c.name: r for c, r in events.finished}
    assert finished["delete_file"].denied and finished["delete_file"].is_error
    assert not finished["get_time"].denied
    tool_messages = [m for m in result.messages if m["role"] == "tool"]
    assert tool_messages[0]["content"] == "Not run: the user denied it."
    assert tool_messages[1]["content"] == "noon"
    # the second request carries the denial to the model, in order
    assert "Not run: the user denied it." in str(fake_llm.requests[1].body)
    assert result.text == "I was not allowed to delete it; it is noon."


async def test_granted_call_runs(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.tool_calls([("delete_file", {"path": "a.txt"})]), Reply.text("done"))
    async with agent_for(fake_llm) as agent:
        result = await agent.run_turn([], "go", RecordingEvents(), approver=ScriptedApprover({}))
    assert ran == ["a.txt"] and result.text == "done"


async def test_invalid_calls_are_not_put_to_the_approver(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Reply.tool_calls([("delete_file", {}), ("no_such_tool", {})]),
        Reply.text("sorry"),
    )
    approver = ScriptedApprover({})
    events = RecordingEvents()
    async with agent_for(fake_llm) as agent:
        await agent.run_turn([], "go", events, approver=approver)
    assert approver.asked == []
    assert [c.name for c, r in events.finished if r.is_error and not r.denied] == ["delete_file", "no_such_tool"]


async def test_interrupt_while_waiting_for_approval_cancels_the_wait(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.tool_calls([("delete_file", {"path": "x"})], text_before="Let me. "))
    approver = ScriptedApprover({}, hold=asyncio.Event())
    interrupt = asyncio.Event()
    async with agent_for(fake_llm) as agent:
        task = asyncio.create_task(agent.run_turn([], "go", RecordingEvents(), approver=approver, interrupt=interrupt))
        await asyncio.wait_for(approver.waiting.wait(), 5)
        interrupt.set()
        result = await asyncio.wait_for(task, 5)
    assert approver.cancelled and ran == []
    assert result.interrupted
    assert [m["role"] for m in result.messages] == ["assistant", "tool"]  # the history stays valid
    assert "interrupted" in result.messages[1]["content"]
    assert len(fake_llm.requests) == 1


async def test_a_turn_offers_only_its_subset_and_refuses_the_rest(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.tool_calls([("delete_file", {"path": "x"})]), Reply.text("ok"))
    async with agent_for(fake_llm) as agent:
        offered = agent.tools.subset(lambda t: t.name == "get_time")
        result = await agent.run_turn([], "go", RecordingEvents(), tools=offered)
    names = [t["function"]["name"] for t in fake_llm.requests[0].body["tools"]]
    assert names == ["get_time"]
    assert ran == []  # the model named a tool it was not offered: unknown, never run
    assert "unknown tool" in result.messages[1]["content"]
