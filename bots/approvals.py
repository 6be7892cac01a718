"""Approval of tool calls in the chat: Approve / Deny buttons under the live reply.

When `tools.policy` says a tool needs approval, the turn's `ChatApprover` (the agent's
`Approver`) shows what will run -- the tool's name and a short, flattened summary of
its arguments -- in the reply's message with two buttons, and waits. Only the person
whose message started the turn, or an admin (or owner), may answer; anyone else's press
gets a private "not yours". No answer within `tools.approval_timeout` counts as deny.
The decision goes back to the model as the tool's result; the buttons disappear; /stop
while waiting stops the turn (the wait is cancelled with it). `ask_once_per_chat`
remembers an approval in the store, so that tool is not asked about again in that chat.

Presses arrive through the gateway's `ButtonRouter` under the prefix "ap"; the button
data is `ap:<token>:y|n`, the token naming one pending question (never guessable from
the chat, so a press cannot answer some other chat's question).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agent.events import Approval, ToolCall
from bots.access import Access, Role
from bots.ids import one_line
from bots.inbound import ButtonPress
from bots.outbox import Button
from bots.store import Store
from bots.tool_policy import ToolPolicy

__all__ = ["ApprovalView", "Approvals", "ChatApprover", "describe_call"]

log = logging.getLogger(__name__)

PREFIX = "ap"
NOT_YOURS = "Not yours to answer: only the person who asked, or an admin, can."
Outcome = Literal["approved", "denied", "timed out", "stopped"]


class ApprovalView(Protocol):
    """Where a question is shown (the turn's `LiveReply`)."""

    def ask_approval(self, call: ToolCall, summary: str, buttons: list[Button]) -> None: ...

    def end_approval(self, call: ToolCall, outcome: Outcome) -> None: ...


def describe_call(arguments: dict[str, Any], *, limit: int = 300, value_limit: int = 80) -> str:
    """A short, one-line-per-argument summary of a call's arguments for a person to judge.

    Flattened (no line breaks, no control characters, no backticks: it is shown inside
    inline code), each value cut to `value_limit` characters and the whole to `limit`,
    so a model cannot fill the chat -- or shape its formatting -- through its arguments.
    """
    lines: list[str] = []
    used = 0
    for key, value in arguments.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        line = f"{_flat(str(key), 30)}: {_flat(text, value_limit)}"
        if used + len(line) > limit:
            lines.append(f"… {len(arguments) - len(lines)} more")
            break
        lines.append(line)
        used += len(line)
    return "\n".join(lines) if lines else "(no arguments)"


def _flat(text: str, limit: int) -> str:
    return one_line(text.replace("`", "'"), limit)


@dataclass(slots=True)
class _Pending:
    chat_key: str
    requester: str  # user key of the person whose message started the turn
    future: asyncio.Future[tuple[bool, str]] = field(repr=False)  # (granted, by whom)


class Approvals:
    """Every question waiting for a press, across chats; the "ap" button handler."""

    def __init__(self, access: Access, store: Store, *, timeout: float = 120.0) -> None:
        self.access = access
        self.store = store
        self.timeout = timeout
        self._pending: dict[str, _Pending] = {}

    def approver(
        self, *, chat_key: str, requester: str, policy: ToolPolicy, view: ApprovalView
    ) -> ChatApprover:
        return ChatApprover(self, chat_key=chat_key, requester=requester, policy=policy, view=view)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def _open(self, chat_key: str, requester: str) -> tuple[str, _Pending]:
        token = secrets.token_urlsafe(9)  # 12 characters; "ap:<token>:y" stays far below 64 bytes
        pending = _Pending(chat_key, requester, asyncio.get_running_loop().create_future())
        self._pending[token] = pending
        return token, pending

    def _close(self, token: str) -> None:
        self._pending.pop(token, None)

    async def press(self, press: ButtonPress, rest: str) -> bool:
        """A press on an Approve / Deny button; False when nothing waits for it any more."""
        token, _, choice = rest.rpartition(":")
        pending = self._pending.get(token)
        if pending is None or pending.future.done() or pending.chat_key != press.chat.key or choice not in ("y", "n"):
            return False
        if press.user_key != pending.requester:
            role = await self.access.role_of(press.user_key, chat_key=press.chat.key if not press.chat.is_private else None)
            if role < Role.ADMIN:
                await press.answer(NOT_YOURS, True)
                return True
        if pending.future.done():  # answered by someone else while the role was looked up
            return False
        pending.future.set_result((choice == "y", press.user_key))
        await press.answer("Approved." if choice == "y" else "Denied.", False)
        return True


class ChatApprover:
    """The `Approver` of one turn: asks in its chat, by the policy, for its requester."""

    def __init__(
        self, approvals: Approvals, *, chat_key: str, requester: str, policy: ToolPolicy, view: ApprovalView
    ) -> None:
        self._approvals = approvals
        self.chat_key = chat_key
        self.requester = requester
        self.policy = policy
        self.view = view

    async def _approved_before(self, tool: str) -> bool:
        try:
            return await self._approvals.store.tool_approved(self.chat_key, tool) is not None
        except Exception as exc:  # the store is down: ask rather than fail the turn
            log.warning("chat %s: could not look up earlier approvals of %s: %s", self.chat_key, tool, exc)
            return False

    async def approve(self, call: ToolCall, arguments: dict[str, Any]) -> Approval:
        mode = self.policy.approval(call.name)
        if mode == "never":
            return Approval(True)
        store = self._approvals.store
        if mode == "ask_once_per_chat" and await self._approved_before(call.name):
            return Approval(True)
        token, pending = self._approvals._open(self.chat_key, self.requester)
        buttons = [
            Button("✅ Approve", f"{PREFIX}:{token}:y", "success"),
            Button("❌ Deny", f"{PREFIX}:{token}:n", "danger"),
        ]
        outcome: Outcome = "stopped"  # unless the wait ends otherwise: /stop cancelled it
        by: str | None = None
        self.view.ask_approval(call, describe_call(arguments), buttons)
        try:
            try:
                granted, by = await asyncio.wait_for(asyncio.shield(pending.future), self._approvals.timeout)
                outcome = "approved" if granted else "denied"
            except TimeoutError:
                outcome = "timed out"
        finally:
            self._approvals._close(token)
            if not pending.future.done():
                pending.future.cancel()
            self.view.end_approval(call, outcome)
        log.info("chat %s: tool call %s (%s) %s%s", self.chat_key, call.id, call.name, outcome, f" by {by}" if by else "")
        if outcome == "approved":
            if mode == "ask_once_per_chat" and by is not None:
                try:
                    await store.remember_tool_approval(self.chat_key, call.name, by=by)
                except Exception as exc:  # the store is down: this call still runs; the next one asks again
                    log.warning("chat %s: could not remember the approval of %s: %s", self.chat_key, call.name, exc)
            return Approval(True)
        if outcome == "timed out":
            return Approval(False, f"nobody approved it within {self._approvals.timeout:g} seconds")
        if by is not None and by != self.requester:
            return Approval(False, "an admin denied it")
        return Approval(False, "the user denied it")
