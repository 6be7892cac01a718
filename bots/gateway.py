"""The Gateway: from a platform-neutral chat message to a delivered reply.

Connectors hand every incoming message to `Gateway.handle`. It drops redelivered
updates, checks access (deny by default), runs commands (which bypass the chat's lane),
and submits everything else to the chat's lane, where `_run_turn` loads the
conversation, runs the agent with a `LiveReply` as its events, finishes the reply and
persists the turn. Provider failures end as one short, friendly line -- rate-limited in
groups -- never as a stack trace or a raw exception; the log gets the line an operator
acts on (the root cause, HTTP status, provider host and model). `turn_listeners` hear how
each turn ended (`parley chat` turns a failure into its exit status).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from agent import Agent, TurnResult, UsageMeter
from agent import Usage as TurnUsage
from agent.errors import (
    AgentError,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderBadResponse,
    ProviderError,
    ProviderNoVision,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
    TranscriptionFailed,
)
from bots import history as hist
from bots.access import Access, Role, denial_text
from bots.clock import REAL_CLOCK, Clock
from bots.coalesce import Coalescer, regroup
from bots.coalesce import merge as merge_parts
from bots.commands import CommandContext, CommandRegistry, builtin_commands
from bots.errors import OutboxError, RateLimited, Transient, Undeliverable
from bots.health import PlatformHealth
from agent.tools.mcp import McpServerStatus
from bots.approvals import PREFIX as APPROVAL_PREFIX
from bots.approvals import Approvals
from bots.buttons import ButtonRouter
from bots.model_choice import PREFIX as MODEL_PREFIX
from bots.model_choice import ModelChoice
from bots.inbound import ButtonPress, Inbound
from bots.inbound import from_json as inbound_from_json
from bots.inbound import to_json as inbound_json
from bots.inbound_rate import InboundRate, Verdict
from bots.lanes import Lanes, Submitted
from bots.media import Attachment, attachment_from_json
from bots.media_input import MediaOptions, MediaRefused, PreparedInput, image_url, prepare, stored_images, text_input
from bots.live_reply import LiveReply, ReplyOptions, leftover_sends, shown_messages
from bots.orphans import remove_leftovers
from bots.logs import redact, turn_context
from bots.metrics import Metrics, ReplyMetrics
from bots.outbox import Button, MessageRef, Outbox
from bots.pacing import Pacing, Priority
from bots.render import Layout
from bots.tool_policy import ToolPolicy
from bots.store import (
    INBOX_RUNNING,
    BudgetHold,
    BudgetRefused,
    InboxRow,
    NewMessage,
    Store,
    StoreError,
    TurnStateError,
    Usage,
)

log = logging.getLogger(__name__)

QUEUED_TEXT = "⏳ I'll answer this right after the current reply."
QUEUE_FULL_TEXT = (
    "⏳ Your queue in this chat is full, so I skipped this message, and I'll skip your next ones too "
    "until I've answered those waiting. Please resend it after my replies."
)
RATE_LIMITED_TEXT = (
    "⏳ You're sending messages faster than I can answer (my limit is {rate}), so I skipped this one and "
    "I'll skip more until you slow down. Wait a moment, then send it again."
)
RESTARTING_TEXT = "⏳ parley is restarting; I'll answer this as soon as it's back."
STORE_DOWN_TEXT = "⚠️ I couldn't save your message (my database is unavailable). Please resend it in a few minutes."
CONTINUING_TEXT = "↻ continuing after a restart…"
EDITED_TEXT = "✏️ answering your edited message…"
"""What the live reply shows when its question was edited mid-answer, until the new answer begins."""
BUDGET_HELD_TEXT = "⏳ Your replies still running may use up your daily budget; send this again when they finish."
INTERRUPTED_MARKER = "⚠️ interrupted by a restart"
LOST_TEXT = "⚠️ I restarted and lost track of this message. Please resend it."
CRASH_LOOP_TEXT = (
    "⚠️ I couldn't finish this reply: parley restarted while writing it, more than once. "
    "Please send your message again."
)
PRUNE_EVERY = 3600.0
"""How often (seconds) finished inbox messages are pruned."""
KEEP_UPDATE_IDS = timedelta(days=3)
"""Longer than any platform redelivers (Telegram keeps undelivered updates 24 hours)."""
STORE_BACKOFF_START = 0.5
STORE_BACKOFF_MAX = 15.0
"""Back-off (seconds) between retries of a store call that failed: a database outage
delays messages, it never loses them."""
SPILL_MAX = 1000
"""Messages from platforms that do not redeliver (Discord) held in memory while the store is down."""
HISTORY_STATUSES = ("ok", "interrupted", "error")
"""Finished turns the model sees again (failed ones with a note); superseded ones are gone."""


class ConversationsHook(Protocol):
    """Where stored messages go in cluster mode (`bots.cluster.conversations.Conversations`)."""

    async def arrived(self, inbounds: list[Inbound]) -> None: ...

    async def forward_press(self, press: ButtonPress) -> bool: ...


class Connector(Protocol):
    """A platform connection: receives messages for the gateway and offers its Outbox."""

    platform: str
    outbox: Outbox
    pacing: Pacing
    drafts: bool
    health: PlatformHealth  # failing / fatal reports, for readiness and the exit status

    @property
    def connected(self) -> bool: ...

    async def start(self, gateway: "Gateway") -> None: ...

    async def stop_receiving(self) -> None: ...

    async def stop(self) -> None: ...

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        """The bytes of an attachment this connector reported (`bots.media.MediaSource`)."""
        ...


@dataclass(frozen=True, slots=True)
class ChatDefaults:
    """Settings every chat starts with (config `provider`, `agent`, `chat`)."""

    model: str
    system_prompt: str = "You are a helpful assistant."
    models: tuple[str, ...] = ()
    busy_policy: str = "queue"
    queue_max: int = 5
    streaming: bool = True
    pre_tool_text: str = "hide"
    show_reasoning: bool = False
    sessions_per_user_in_groups: bool = False
    error_cooldown: float = 60.0
    history_max_messages: int = 40
    history_max_tokens: int = 12000
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> ($/1M prompt, $/1M completion)
    max_redelivery_age: float = 600.0  # seconds: older unfinished messages are not answered after a restart
    max_attempts: int = 2  # a turn cut off by restarts this often ends with the failure line
    group_control: str = "admins"  # who stops others' replies / resets a group's conversation
    reserve_completion_tokens: int = 1024  # a budgeted turn's answer allowance, unless extra_params caps it
    budget_hold_ttl: float = 3600.0  # seconds a budget hold counts at most (a process died mid-turn)
    still_working_after: float = 15.0  # seconds of nothing new before a reply says "still working…" (0: never)
    # Seconds to wait for the rest of a message the platform may have split, per platform
    # (bots.coalesce); a platform not named: 0 (only albums wait).
    coalesce_window: dict[str, float] = field(default_factory=lambda: {"telegram": 1.0})
    model_choice: str = "auto"  # who picks the model: auto | per_user | per_chat | admins_only
    show_fallback_model: bool = True  # a reply another model gave (a failover) says which
    model_roles: dict[str, str] = field(default_factory=dict)  # model -> least role that may pick it (default user)

    def allowed_models(self) -> list[str]:
        return list(dict.fromkeys([self.model, *self.models]))


NO_VISION_TEXT = "⚠️ This model can't see images; an admin can pick another with /model."


def friendly_error(exc: BaseException) -> str:
    """One short line for the chat: what happened and what to do. Never the raw error."""
    if isinstance(exc, ProviderNoVision):
        return NO_VISION_TEXT
    if isinstance(exc, TranscriptionFailed):
        return "⚠️ I couldn't transcribe that voice note. Please try again, or type your message."
    if isinstance(exc, ProviderAuthError):
        return "⚠️ The model provider rejected parley's credentials. An admin needs to check the API key."
    if isinstance(exc, ProviderRateLimited):
        return "⚠️ The model provider is rate-limiting requests right now. Please try again in a minute."
    if isinstance(exc, ProviderTimeout):
        return "⚠️ The model took too long to answer. Please try again."
    if isinstance(exc, ProviderServerError):  # it answered: the network and base_url are fine
        return "⚠️ The model provider had an internal error. Please try again."
    if isinstance(exc, ProviderUnavailable):
        return "⚠️ The model provider isn't reachable right now. Please try again shortly."
    if isinstance(exc, ProviderBadResponse):
        return "⚠️ The model provider sent a broken answer. Please try again."
    if isinstance(exc, ProviderBadRequest):
        text = str(exc).lower()
        if "context" in text or "too long" in text or ("maximum" in text and "token" in text):
            return "⚠️ This conversation is too long for the model. Send /new to start a fresh one."
        if "image" in text:  # the model sees, but not this picture (too large, a format it refuses)
            return "⚠️ The model couldn't read this image. Please try a smaller JPEG or PNG."
        return "⚠️ The model provider refused the request. An admin may need to check the model settings."
    return "⚠️ Something went wrong while generating the reply. Please try again."


def _log_failed_turn(exc: BaseException) -> None:
    """One WARNING line an operator can act on: what failed, why, where.

    `turn failed: ProviderUnavailable: couldn't connect to the provider: connection
    refused (ConnectionRefusedError: ...) provider=api.example.com model=gpt-x` -- the root
    cause, the HTTP status, the provider's host and the model, as text and (JSON logs) as
    fields. The traceback of the library error underneath follows at DEBUG. A failure
    that is not the provider's is a bug: logged at ERROR with its traceback.
    """
    if isinstance(exc, ProviderError):
        log.warning("turn failed: %s", exc.describe(), extra=exc.log_fields())
        log.debug("the failed turn's provider error, with the library errors under it", exc_info=exc)
    elif isinstance(exc, AgentError):
        log.warning("turn failed: %s: %s", type(exc).__name__, exc)
    else:
        log.error("turn failed unexpectedly", exc_info=exc)


TurnListener = Callable[[Inbound, str], None]
"""Told how each turn ended: (the message, "ok" | "fell_back" | "interrupted" | "error")."""


@dataclass(eq=False)
class _Replacement:
    """A running turn whose question was edited: what the turn answering the new text takes over.

    Filled in by the old turn as it stops (`Gateway._hand_over`); taken by the new one.
    """

    turn_id: int | None = None  # the old turn: superseded when the new one begins
    adopt: list[MessageRef] = field(default_factory=list)  # the messages it showed: the new answer goes there
    unsure: list[dict[str, Any]] = field(default_factory=list)  # its sends of unknown outcome


class Gateway:
    """Routes messages, owns the lanes, and runs turns."""

    def __init__(
        self,
        *,
        store: Store,
        agent: Agent,
        access: Access,
        defaults: ChatDefaults,
        commands: CommandRegistry | None = None,
        metrics: Metrics | None = None,
        clock: Clock = REAL_CLOCK,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        spill_max: int = SPILL_MAX,
        inbound_rate: InboundRate | None = None,
        media: MediaOptions | None = None,
        tool_policy: ToolPolicy | None = None,
        approval_timeout: float = 120.0,
    ) -> None:
        self.store = store
        self.agent = agent
        self.access = access
        self.defaults = defaults
        self.commands = commands or builtin_commands()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._wall = wall
        self.spill_max = spill_max
        self.store_backoff = (STORE_BACKOFF_START, STORE_BACKOFF_MAX)  # (first, longest) wait; tests shorten it
        self.buttons = ButtonRouter()
        self.tool_policy = tool_policy or ToolPolicy()  # config tools.policy
        self.approvals = Approvals(access, store, timeout=approval_timeout)
        # MCP servers' states for /status (`agent.tools.mcp.McpServers.status`), once started.
        self.mcp_status: Callable[[], list[McpServerStatus]] | None = None
        self.buttons.register(APPROVAL_PREFIX, self.approvals.press)
        self.model_choice = ModelChoice(self)
        self.buttons.register(MODEL_PREFIX, self.model_choice.press)
        self.lanes = Lanes(self._run_turn, queue_max=defaults.queue_max, on_dropped=self._dropped)
        self.inbound_rate = inbound_rate  # access.user_rate; None: no limit
        self.media = media or MediaOptions()  # config media.*
        self.connectors: dict[str, Connector] = {}
        # Who wants to know how turns end (`parley chat` off a terminal: its exit status).
        self.turn_listeners: list[TurnListener] = []
        self.started_at = time.monotonic()
        self._chat_locks: dict[str, asyncio.Lock] = {}  # routing, per chat
        self._accept_locks: dict[str, asyncio.Lock] = {}  # storing (connectors that deliver concurrently)
        self._last_error_line: dict[str, float] = {}
        self._tasks: set[asyncio.Future[None]] = set()  # replies in flight and messages being routed
        # The same, by chat: a conversation is idle (cluster mode hands it on) only once
        # none of its messages is being routed, held, answered or given its status.
        self._chat_tasks: dict[str, set[asyncio.Future[None]]] = {}
        # Cluster mode (`bots.cluster.conversations`): stored messages go to the replica
        # working on their conversation instead of straight to this process's lanes.
        self.conversations: ConversationsHook | None = None
        self.cluster_status: Callable[[], Awaitable[dict[str, Any]]] | None = None  # for /status
        # Conversations this replica let go of as if it had died (`abandon`): nothing of
        # theirs is started, finalized or written here until this replica owns them again.
        self._abandoned: set[str] = set()
        self._accepting = True
        self._seen_users: dict[str, tuple[str | None, str | None]] = {}  # skip rewriting unchanged names
        self._next_prune: float | None = None  # first message: prune at once
        self._spill: deque[Inbound] = deque()  # messages the store could not take yet (Discord)
        self._spill_task: asyncio.Task[None] | None = None
        self._in_lanes: set[int] = set()  # inbox ids handed to a lane (running or queued)
        self._recovered: dict[int, InboxRow] = {}  # unfinished rows of an earlier process, by inbox id
        self.coalescer = Coalescer(lambda platform: self.defaults.coalesce_window.get(platform, 0.0))
        self._holds: dict[str, asyncio.Task[None]] = {}  # coalescer group key -> the task waiting out its window
        # The single messages (parts) behind what is held, queued or running, by inbox id, and
        # their inbox id by (chat, platform message id): an edit finds what it edits here.
        self._parts: dict[int, Inbound] = {}
        self._part_ids: dict[tuple[str, str], int] = {}
        self._replacements: dict[int, _Replacement] = {}  # first inbox id of a restarted message -> hand-over
        self._routing_open = asyncio.Event()  # closed while recovery queues what was left
        self._routing_open.set()
        self._routing_abandoned = False
        self._closing_store = False  # shutdown gave up waiting for the store
        self.metrics.track(lambda: self.lanes.active, lambda: sum(self.lanes.queue_depths().values()))

    def attach(self, connector: Connector) -> None:
        self.connectors[connector.platform] = connector

    @property
    def accepting(self) -> bool:
        """False once `shutdown` began: new turns wait in the inbox for the next start (their senders are told)."""
        return self._accepting

    # ---- incoming ----------------------------------------------------------------------

    async def receive(self, inbounds: list[Inbound]) -> None:
        """Store messages durably, then handle them; raises `StoreError` when they could not be stored.

        For platforms that redeliver (Telegram): the connector acknowledges the messages
        (moves its getUpdates offset past them, answers the webhook with 200) only after
        this returned, and on `StoreError` leaves them unacknowledged and retries later.
        Messages already stored (a redelivery) are ignored. Returns once they are stored:
        routing and turns run in tasks, one chat's messages in arrival order.
        """
        for inbound in inbounds:
            self.metrics.messages_received.labels(inbound.platform).inc()
        addressed = [i for i in inbounds if i.addressed]
        for inbound in inbounds:
            if not inbound.addressed:
                self._note_user_later(inbound)  # group chatter: remember who people are, nothing more
        if not addressed:
            return
        now = self._wall().timestamp()
        addressed = [replace(i, received_at=now) for i in addressed]
        ids = await self.store.accept(
            [NewMessage(i.platform, i.update_id, i.chat.key, i.user_key, inbound_json(i)) for i in addressed]
        )
        stored: list[Inbound] = []
        for inbound, inbox_id in zip(addressed, ids):
            if inbox_id is None:
                self.metrics.duplicates_ignored.labels(inbound.platform).inc()
                log.info("chat %s: update %s already handled; ignored", inbound.chat.key, inbound.update_id)
                continue
            stored.append(replace(inbound, inbox_ids=(inbox_id,)))
        if self.conversations is not None:
            await self.conversations.arrived(stored)  # to the replica working on each conversation
            return
        for inbound in stored:
            self._dispatch(inbound)

    def dispatch(self, inbound: Inbound) -> None:
        """Route a stored message here (cluster mode: this replica works on its conversation)."""
        self._dispatch(inbound)

    async def on_button(self, press: ButtonPress) -> None:
        """Someone pressed a button under one of parley's messages (an approval, a choice).

        Answers the press exactly once (`ButtonPress.answer`), whatever happens: a press
        nobody waits for any more (the turn ended, parley restarted) gets "no longer
        waiting". Never stored: a press is a reaction to something on screen now, not a
        message to answer after a restart.
        """
        try:
            handled = await self.buttons.press(press)
            if not handled and self.conversations is not None:
                handled = await self.conversations.forward_press(press)  # a turn on another replica asked
        except Exception:
            log.exception("chat %s: a button press failed", press.chat.key)
            handled = False
            await press.answer("Something went wrong; please try again.", True)
            return
        if not handled:
            await press.answer("This is no longer waiting for an answer.", False)

    async def handle(self, inbound: Inbound) -> None:
        """Take one message from a platform that does not redeliver (Discord, the console).

        It is stored like every other; while the store cannot take it, it waits in a
        bounded in-memory spill queue that is written as soon as the store is back (a
        log line and the `parley_inbox_spilled` gauge say so). When even that queue is
        full, the sender is asked to resend: nothing disappears silently.
        """
        # Connectors deliver concurrently (a task per event), but a chat's messages must be
        # stored -- and so routed -- in arrival order: the chat's lock is taken before the
        # first pause of this call, and asyncio's locks are fair.
        key = inbound.chat.key
        lock = self._accept_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                await self._accept_or_spill(inbound)
        finally:
            if not lock._waiters:  # type: ignore[attr-defined]
                self._accept_locks.pop(key, None)

    async def _accept_or_spill(self, inbound: Inbound) -> None:
        if not self._spill:
            try:
                await self.receive([inbound])
                return
            except StoreError as exc:
                log.error(
                    "store unavailable (%s): holding messages in memory until it is back (up to %d)",
                    exc, self.spill_max,
                )
        if len(self._spill) >= self.spill_max:
            self.metrics.spill_overflows.labels(inbound.platform).inc()
            log.error("chat %s: message %s could not be stored nor held; asked to resend", inbound.chat.key, inbound.update_id)
            if inbound.addressed:
                self._spawn(self.reply(inbound, STORE_DOWN_TEXT))
            return
        self._spill.append(inbound)
        self.metrics.spilled.set(len(self._spill))
        if self._spill_task is None or self._spill_task.done():
            self._spill_task = asyncio.create_task(self._drain_spill(), name="inbox-spill")

    async def _drain_spill(self) -> None:
        """Write the spilled messages, in order, once the store takes them again."""
        delay = self.store_backoff[0]
        while self._spill:
            batch = list(self._spill)
            try:
                await self.receive(batch)
            except StoreError as exc:
                self.metrics.store_retries.labels("accept").inc()
                log.warning("still holding %d messages: store unavailable (%s); retrying in %.0fs", len(batch), exc, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, self.store_backoff[1])
                continue
            for _ in batch:
                self._spill.popleft()
            self.metrics.spilled.set(len(self._spill))
            log.info("store is back: %d held messages stored", len(batch))
            delay = self.store_backoff[0]

    def _dispatch(self, inbound: Inbound) -> None:
        """Route a stored message in a task; one chat's messages are routed in order."""
        routed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._track(routed, inbound.chat.key)  # counted until routed, so `settle_all` waits for it too

        async def route() -> None:
            try:
                await self._routing_open.wait()  # what an earlier process left goes first
                if self._routing_abandoned:
                    return  # parley could not start: the message stays in the inbox
                # The chat's lock is taken before the first pause of this task, and tasks
                # start in creation order: a chat's messages are routed in arrival order.
                lock = self._chat_locks.setdefault(inbound.chat.key, asyncio.Lock())
                try:
                    async with lock:
                        await self._route_durably(inbound)
                finally:
                    if not lock._waiters:  # type: ignore[attr-defined]
                        self._chat_locks.pop(inbound.chat.key, None)
            finally:
                routed.set_result(None)

        self._spawn(route(), inbound.chat.key)

    async def _route_durably(self, inbound: Inbound) -> None:
        """Route a stored message; while the store is down, wait for it (the message is safe)."""
        if inbound.chat.key in self._abandoned:
            return  # another replica answers it
        await self._while_store_down(self._route, inbound)

    async def _while_store_down(self, step: Callable[[Inbound], Awaitable[None]], inbound: Inbound) -> None:
        """Run `step(inbound)`, retrying with back-off while the store is down: the message is
        stored, so it waits safely; at shutdown it stays for the next start."""
        delay = self.store_backoff[0]
        while True:
            try:
                await step(inbound)
                return
            except StoreError as exc:
                self.metrics.store_retries.labels("route").inc()
                if not self._accepting:
                    log.warning("chat %s: store unavailable while shutting down; message %s stays for the next start",
                                inbound.chat.key, inbound.update_id)
                    return
                log.warning("chat %s: store unavailable (%s); message %s waits, retrying in %.0fs",
                            inbound.chat.key, exc, inbound.update_id, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, self.store_backoff[1])

    def _note_user_later(self, inbound: Inbound) -> None:
        if self._seen_users.get(inbound.user_key) != (inbound.username, inbound.display_name):
            self._spawn(self._note_user(inbound, quiet=True))

    async def _note_user(self, inbound: Inbound, *, quiet: bool = False) -> None:
        """Remember who people are (so an admin can /allow @them), skipping unchanged names."""
        if self._seen_users.get(inbound.user_key) == (inbound.username, inbound.display_name):
            return
        try:
            await self.store.remember_user(inbound.user_key, inbound.username, inbound.display_name)
        except StoreError as exc:
            if not quiet:
                raise
            log.info("could not remember user %s: %s", inbound.user_key, exc)
            return
        if len(self._seen_users) > 50_000:
            self._seen_users.clear()
        self._seen_users[inbound.user_key] = (inbound.username, inbound.display_name)

    async def _route(self, inbound: Inbound) -> None:
        await self._note_user(inbound)
        self._maybe_prune()
        if inbound.edit_of is not None:
            # Before the access check: an edit can only change a message that was let in
            # (it finds it among those held, queued or running), and a stranger's edit
            # deserves no second denial.
            await self._edit(inbound)
            return
        role = await self.access.role(inbound)
        if role == Role.BLOCKED:
            if inbound.expects_answer:  # a slash command: Discord shows an error unless answered
                await self._answer(inbound, "⛔ You can't use this bot.", private=True)
            self._settle(inbound, "answered" if inbound.expects_answer else "ignored")
            return
        if role == Role.NOBODY:
            tell = inbound.chat.is_private or inbound.expects_answer
            told = tell and (inbound.expects_answer or self.access.should_tell_denied(inbound.user_key))
            if told:
                await self._answer(inbound, denial_text(inbound), private=True)
            log.info("chat %s: message from %s without access", inbound.chat.key, inbound.user_key)
            self._settle(inbound, "answered" if told else "ignored")
            return
        if inbound.command is not None:
            # A command never joins a split message; what the chat holds goes first.
            await self._flush_held(inbound.chat.key)
            await self._run_command(inbound, role)
            return
        if not inbound.text.strip() and not inbound.attachments:
            self._settle(inbound, "ignored")
            return
        if not await self._within_rate(inbound, role):
            return
        await self._coalesce([inbound])

    # ---- split messages and edits -----------------------------------------------------

    async def _coalesce(self, parts: list[Inbound]) -> None:
        """Hand a message to its lane -- at once, or after the coalescing window when it may
        be the first part of a split paste or an album (`bots.coalesce`).

        Called under the chat's routing lock. A message that cannot be split costs one
        length check here: no timer, no task, no wait.
        """
        for part in parts:
            self._remember_part(part)
        if any(i in self._recovered for p in parts for i in p.inbox_ids):
            # Left by an earlier process: grouped as it was when it came (`_regroup`).
            for part in parts:
                await self._submit_durably(part)
            return
        offered = self.coalescer.offer(parts, self.clock.now())
        if offered.started is not None:
            self._holds[offered.started] = self._hold(offered.started)
        if offered.ready:
            self._drop_idle_holds()
        for ready in offered.ready:
            await self._submit_durably(ready)

    async def _flush_held(self, chat_key: str) -> None:
        """Hand everything the chat holds to its lane now (a command comes next)."""
        held = self.coalescer.take_chat(chat_key)
        if held:
            self._drop_idle_holds()
        for ready in held:
            await self._submit_durably(ready)

    def _drop_idle_holds(self) -> None:
        """Cancel the waits of groups flushed early; such a task only sleeps (no side effects)."""
        for key, task in list(self._holds.items()):
            if self.coalescer.deadline(key) is None:
                del self._holds[key]
                task.cancel()

    def _hold(self, key: str) -> asyncio.Task[None]:
        """The task that waits out a held group's window (on the injected clock), then hands
        it to the lane under the chat's routing lock. Counted in `_tasks`, so `settle`
        waits for held messages too."""
        chat_key = key.split("\x00", 1)[0]

        async def hold() -> None:
            try:
                while True:
                    deadline = self.coalescer.deadline(key)
                    if deadline is None:
                        return  # flushed meanwhile (a command, a later message, shutdown)
                    wait = deadline - self.clock.now()
                    if wait <= 0:
                        break
                    await self.clock.sleep(wait)
            finally:
                if self._holds.get(key) is task:
                    del self._holds[key]
            lock = self._chat_locks.setdefault(chat_key, asyncio.Lock())
            try:
                async with lock:
                    ready = self.coalescer.take_if_due(key, self.clock.now())
                    if ready is not None:
                        await self._submit_durably(ready)
            finally:
                if not lock._waiters:  # type: ignore[attr-defined]
                    self._chat_locks.pop(chat_key, None)

        task = asyncio.create_task(hold(), name=f"coalesce:{chat_key}")
        self._track(task, chat_key)
        return task

    async def _submit_durably(self, inbound: Inbound) -> None:
        """`_submit`, waiting while the store is down (the message is stored: it waits safely)."""
        await self._while_store_down(self._submit, inbound)

    def _remember_part(self, part: Inbound) -> None:
        """Keep a single message while it is held, queued or running, for edits to find."""
        if len(part.inbox_ids) == 1 and part.edit_of is None and part.command is None:
            self._parts[part.inbox_ids[0]] = part
            self._part_ids[(part.chat.key, part.message_id)] = part.inbox_ids[0]

    def _forget_parts(self, inbound: Inbound) -> None:
        """The message will not run (again) in this process: its edits are ignored from now on."""
        for inbox_id in inbound.inbox_ids:
            part = self._parts.pop(inbox_id, None)
            if part is not None and self._part_ids.get((part.chat.key, part.message_id)) == inbox_id:
                del self._part_ids[(part.chat.key, part.message_id)]

    def _rebuild(self, inbound: Inbound) -> Inbound:
        """A (merged) message again from its parts as they are now -- one of them was edited."""
        parts = [self._parts.get(i) for i in inbound.inbox_ids]
        if any(p is None for p in parts):  # not made of remembered parts (/retry): nothing to rebuild
            return inbound
        return merge_parts([p for p in parts if p is not None])

    async def _edit(self, edit: Inbound) -> None:
        """A person edited a message (`Inbound.edit_of`).

        Held in the coalescing window or waiting in the lane: the edited text replaces
        the old one where it waits. Being answered right now: the turn restarts with the
        new text -- the running turn stops, and the answer to the edit continues in the
        very message that showed the old answer (`EDITED_TEXT` until it begins). Anything
        else (an older message, answered already): ignored, silently. The new text is
        written over the stored one first, so a crash from here on answers the edit.
        """
        key = edit.chat.key
        inbox_id = self._part_ids.get((key, edit.edit_of or ""))
        part = self._parts.get(inbox_id) if inbox_id is not None else None
        if (
            inbox_id is None
            or part is None
            or part.user_key != edit.user_key
            or edit.command is not None
            or not (edit.text.strip() or edit.attachments or part.attachments)
        ):
            log.info("chat %s: edit of message %s ignored (not waiting or being answered)", key, edit.edit_of)
            self._settle(edit, "ignored")
            return
        revised = replace(part, text=edit.text, attachments=edit.attachments or part.attachments)
        if not await self.store.revise_message(inbox_id, inbound_json(revised)):
            log.info("chat %s: edit of message %s came after its answer; ignored", key, edit.edit_of)
            self._settle(edit, "ignored")
            return
        self._parts[inbox_id] = revised
        running = self.lanes.running(key)
        if self.coalescer.revise(revised):
            where = "held"
        elif running is not None and inbox_id in running.inbox_ids:
            restarted = self._rebuild(running)
            self._replacements.setdefault(restarted.inbox_ids[0], _Replacement())
            self.lanes.restart(key, restarted)
            where = "running: restarting its turn"
        elif self.lanes.revise(key, inbox_id, self._rebuild):
            where = "queued"
        else:
            log.info("chat %s: edit of message %s ignored (not waiting or being answered)", key, edit.edit_of)
            self._settle(edit, "ignored")
            return
        log.info("chat %s: message %s edited (%s)", key, edit.edit_of, where)
        self._settle(edit, "answered")

    async def _within_rate(self, inbound: Inbound, role: Role) -> bool:
        """`access.user_rate`: False when the message was dropped (its sender told once per burst).

        Checked before the message enters a lane, so a flood costs no queue slot and no
        turn. Owners are exempt; commands never get here (/stop works for a flooder); a
        message recovered after a restart was let in before and is not counted again.
        """
        if self.inbound_rate is None or role >= Role.OWNER:
            return True
        if any(i in self._recovered for i in inbound.inbox_ids):
            return True
        verdict = await self.inbound_rate.hit(inbound.user_key)
        if verdict is Verdict.ALLOWED:
            return True
        self.metrics.inbound_rate_limited.labels(inbound.platform).inc()
        if verdict is Verdict.LIMITED:
            await self._answer(inbound, RATE_LIMITED_TEXT.format(rate=self.inbound_rate.description))
        self._settle(inbound, "failed")
        return False

    def _maybe_prune(self) -> None:
        """Forget old finished inbox rows now and then, so the inbox stays small."""
        now = self.clock.now()
        if self._next_prune is not None and now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        self._spawn(self._prune())

    async def _prune(self) -> None:
        try:
            pruned = await self.store.prune_inbox(KEEP_UPDATE_IDS)
        except Exception as exc:  # housekeeping: never worth failing a message over
            log.warning("could not prune the inbox: %s", exc)
            return
        if pruned:
            log.info("pruned %d finished inbox messages", pruned)

    async def _run_command(self, inbound: Inbound, role: Role) -> None:
        """Run a command now (commands bypass the lane); its answer is sent in a task."""
        assert inbound.command is not None
        command = self.commands.get(inbound.command)
        if command is None:
            told = inbound.chat.is_private or inbound.mentions_bot or inbound.expects_answer
            if told:
                await self._answer(inbound, f"Unknown command /{inbound.command[:32]}. Send /help for the list.",
                                   private=True)
            self._settle(inbound, "answered" if told else "ignored")
            return
        ctx = CommandContext(inbound=inbound, role=role, gateway=self, command=command)
        text = await self.commands.run(ctx)
        if text:
            await self._answer(inbound, text, private=ctx.private, buttons=ctx.buttons)
        if not set(inbound.inbox_ids) & self._in_lanes:  # /retry hands its message to a turn
            self._settle(inbound, "answered")

    async def _submit(self, inbound: Inbound) -> None:
        if inbound.chat.key in self._abandoned:
            return  # another replica answers it
        settings = await self.store.chat_settings(inbound.chat.key)
        policy = settings.busy_policy or self.defaults.busy_policy
        if policy == "interrupt" and self.session_key(inbound) != inbound.chat.key:
            running = self.lanes.running(inbound.chat.key)
            if running is not None and running.user_key != inbound.user_key:
                policy = "queue"  # a conversation of its own: nobody else may cut it off
        outcome = self.lanes.submit(inbound, policy=policy)
        if outcome in (Submitted.STARTED, Submitted.QUEUED, Submitted.QUEUED_QUIETLY, Submitted.INTERRUPTING):
            self._in_lanes.update(inbound.inbox_ids)
        recovered = any(i in self._recovered for i in inbound.inbox_ids)
        if outcome is Submitted.QUEUED and not recovered:  # acknowledged before the restart already
            await self._answer(inbound, QUEUED_TEXT)
        elif outcome in (Submitted.FULL, Submitted.FULL_QUIETLY):
            # One notice per burst: until this sender's queue drains, further ones are
            # refused silently (a notice per refused message would be the flood, echoed).
            self.metrics.queue_full.labels(inbound.platform).inc()
            if outcome is Submitted.FULL:
                await self._answer(inbound, QUEUE_FULL_TEXT)
            self._settle(inbound, "failed")
        elif outcome is Submitted.CLOSED:
            # Stays in the inbox: the next start answers it.
            self._forget_parts(inbound)
            await self._answer(inbound, RESTARTING_TEXT)

    def _settle(self, inbound: Inbound, status: str) -> None:
        """Give a message that needs no turn its final status (in a task: the chat has its answer)."""
        self._forget_parts(inbound)
        if inbound.inbox_ids:
            self._spawn(self._finish_messages(list(inbound.inbox_ids), status), inbound.chat.key)

    async def _finish_messages(self, inbox_ids: list[int], status: str, reply: dict[str, Any] | None = None) -> None:
        try:
            await self._durably("finish_messages", self.store.finish_messages, inbox_ids, status, reply=reply)
        except StoreError:
            pass  # shutting down with the database gone: the next start finds them unfinished (logged)

    async def _durably(self, what: str, call, *args, **kwargs):  # noqa: ANN001, ANN202
        """Retry a store write while the database is down (capped back-off), until it is
        written or parley shuts down; then the next start finds the message unfinished."""
        delay = self.store_backoff[0]
        while True:
            try:
                return await call(*args, **kwargs)
            except TurnStateError:
                raise  # not the database failing: retrying cannot help
            except StoreError as exc:
                self.metrics.store_retries.labels(what).inc()
                if not self._accepting and self._closing_store:
                    log.error("%s not written (%s); the next start will pick the message up", what, exc)
                    raise
                log.warning("%s failed (%s); retrying in %.0fs", what, exc, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, self.store_backoff[1])

    async def _answer(
        self, inbound: Inbound, text: str, *, private: bool = False, buttons: Sequence[Button] = ()
    ) -> None:
        """Reply in a task, so routing never waits on the platform -- except while
        shutting down, when the reply must be out before the connector closes."""
        if self._accepting:
            self._spawn(self.reply(inbound, text, private=private, buttons=buttons), inbound.chat.key)
        else:
            await self.reply(inbound, text, private=private, buttons=buttons)

    async def retry(self, inbound: Inbound) -> str:
        """/retry: run the session's last user message again as a fresh turn.

        The earlier attempt is marked superseded, so the model never sees the question
        twice. A turn still being answered cannot be retried (stop it first).
        """
        session = await self.store.current_session(self.session_key(inbound))
        last = await self.store.history(session, limit_turns=1)
        if not last or not last[0].messages:
            return "There is no earlier message in this conversation to retry."
        turn = last[0]
        if turn.status == "running":
            return "That message is still being answered. Send /stop first if you want a fresh answer."
        first = turn.messages[0]
        content = first.get("content")
        # Files are fetched (and transcribed, read) again from their references.
        attachments = tuple(attachment_from_json(a) for a in first.get(hist.ATTACHMENTS) or () if isinstance(a, dict))
        if not isinstance(content, str) or not (content.strip() or attachments):
            return "The last message cannot be retried."
        await self.store.mark_turn_superseded(turn.id)
        await self._submit(replace(inbound, command=None, args="", text=content, attachments=attachments))
        return ""

    # ---- replies outside a turn --------------------------------------------------------

    async def reply(
        self, inbound: Inbound, text: str, *, private: bool = False, buttons: Sequence[Button] = ()
    ) -> None:
        """A reply outside a turn (command output, notices), paced like everything else.

        Plain text; one that does not fit one message (a long system prompt shown by
        /system) goes out as several, never truncated; `buttons` go under the last. A
        `private` reply concerns the caller alone (`Outbox.send`); to a slash command every
        piece of it answers the command, so none of it lands in the channel for everyone.
        """
        connector = self.connectors.get(inbound.platform)
        if connector is None:
            return
        # The last line of defence: whatever a command or notice quotes (a URL from the
        # configuration, an error text), no configured secret or credential-shaped string
        # reaches a chat.
        text = redact(text)
        limits, measure = connector.outbox.limits, lambda t: connector.outbox.measure(t, markdown=False)
        pieces = [p.text for p in Layout(limits.max_message_len, measure, measure).pieces(text, final=True)]
        answering = private and inbound.expects_answer
        for i, piece in enumerate(pieces):
            reply_to = inbound.message_id if i == 0 or answering else None
            under = buttons if i == len(pieces) - 1 else ()
            if not await self._send_one(connector, inbound, piece, reply_to=reply_to, private=private, buttons=under):
                return

    async def _send_one(
        self,
        connector: Connector,
        inbound: Inbound,
        text: str,
        *,
        reply_to: str | None,
        private: bool = False,
        buttons: Sequence[Button] = (),
    ) -> bool:
        """Send one message, waiting out rate limits; False when it could not be delivered."""
        pacer = connector.pacing.for_chat(inbound.chat)
        deadline = time.monotonic() + 120
        while True:
            await pacer.acquire(Priority.FINAL)
            try:
                extra = {"buttons": buttons} if buttons else {}
                await connector.outbox.send(inbound.chat, text, reply_to=reply_to, private=private, **extra)
                self.metrics.platform_calls.labels(inbound.platform, "send").inc()
                return True
            except RateLimited as exc:
                self.metrics.record_rate_limited(inbound.platform)
                pacer.pause(exc.retry_after, scope=exc.scope)
            except Transient as exc:
                if time.monotonic() > deadline:
                    log.warning("chat %s: reply not delivered: %s", inbound.chat.key, exc)
                    return False
                await self.clock.sleep(1.0)
            except Undeliverable as exc:
                log.info("chat %s: cannot reply: %s", inbound.chat.key, exc)
                return False
            except OutboxError as exc:
                log.warning("chat %s: reply failed: %s", inbound.chat.key, exc)
                return False

    # ---- turns -------------------------------------------------------------------------

    def session_key(self, inbound: Inbound) -> str:
        if self.defaults.sessions_per_user_in_groups and not inbound.chat.is_private:
            return f"{inbound.chat.key}#{inbound.user_key}"
        return inbound.chat.key

    async def _run_turn(self, inbound: Inbound, interrupt: asyncio.Event) -> None:
        try:
            await self._answer_message(inbound, interrupt)
        finally:
            self._in_lanes.difference_update(inbound.inbox_ids)
            for inbox_id in inbound.inbox_ids:
                self._recovered.pop(inbox_id, None)
            if not inbound.inbox_ids or inbound.inbox_ids[0] not in self._replacements:
                self._forget_parts(inbound)
            else:
                self._in_lanes.update(inbound.inbox_ids)  # edited: it runs again next

    async def _answer_message(self, inbound: Inbound, interrupt: asyncio.Event) -> None:
        connector = self.connectors[inbound.platform]
        started = time.monotonic()
        earlier = [self._recovered[i] for i in inbound.inbox_ids if i in self._recovered]
        # The rows of one turn (a merged message) share one reply: each message once.
        adopt = list(dict.fromkeys(MessageRef(inbound.chat, mid) for mid, _ in _shown_by(earlier)))
        unsure = _leftovers_of(earlier)  # copies to look for
        placeholder = CONTINUING_TEXT if adopt else None
        supersede = [r.turn_id for r in earlier if r.turn_id]
        # The question was edited while an earlier turn answered it: continue in its messages.
        edited = self._replacements.pop(inbound.inbox_ids[0], None) if inbound.inbox_ids else None
        if edited is not None:
            adopt += [ref for ref in edited.adopt if ref not in adopt]
            unsure += edited.unsure
            supersede += [edited.turn_id] if edited.turn_id is not None else []
            placeholder = EDITED_TEXT if edited.adopt else placeholder
            earlier = []  # the earlier attempt's outcome no longer decides anything
        if earlier and await self._end_recovered(inbound, earlier, connector):
            return
        prepared = await self._prepare_input(inbound, connector, interrupt)
        if prepared is None:
            return
        plan = await self._durably("plan_turn", self._plan_turn, inbound, supersede, prepared)
        if plan is None:
            return
        if inbound.received_at and not earlier:
            self.metrics.queue_wait.observe(max(0.0, self._wall().timestamp() - inbound.received_at))
        model, system_prompt, streaming, history, turn_id = plan
        reply = LiveReply(
            connector.outbox,
            inbound.chat,
            connector.pacing.for_chat(inbound.chat),
            reply_to=inbound.message_id,
            options=ReplyOptions(
                pre_tool_text="keep" if self.defaults.pre_tool_text == "keep" else "hide",
                show_reasoning=self.defaults.show_reasoning,
                drafts=connector.drafts,
                placeholder=placeholder,
                still_working_after=self.defaults.still_working_after or None,
                header=prepared.header,
            ),
            clock=self.clock,
            observer=ReplyMetrics(self.metrics, inbound.platform, started),
            stream=streaming,
            journal=_InboxJournal(self.store, inbound.inbox_ids),
            adopt=adopt,
            unsure=unsure,
        )
        if adopt:
            log.info("chat %s: continuing a reply cut off by a restart", inbound.chat.key)
        # Counts every model call as it ends, so a turn that fails or is cancelled still
        # books what the provider generated (and billed) before.
        meter = UsageMeter(model)
        with turn_context(platform=inbound.platform, chat=inbound.chat.key, turn=turn_id):
            reply.start()
            try:
                offered = self.tool_policy.offered(self.agent.tools, await self._caller_role(inbound))
                approver = self.approvals.approver(
                    chat_key=inbound.chat.key, requester=inbound.user_key, policy=self.tool_policy, view=reply
                )
                result = await self.agent.run_turn(
                    history, prepared.content, reply, model=model, system_prompt=system_prompt, interrupt=interrupt,
                    meter=meter, tools=offered, approver=approver,
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._abandon(inbound, reply, turn_id, meter))
                raise
            except Exception as exc:
                if await self._hand_over(inbound, reply, turn_id, None):
                    return
                _log_failed_turn(exc)
                delivery = await reply.finish(notice=self._error_line(inbound, exc))
                await self._finish_turn(
                    turn_id, [], status="error", usage=self._usage(inbound, meter.model, meter.usage),
                    inbox_ids=inbound.inbox_ids, inbox_status="failed", reply=reply.state(),
                )
                self._count_usage(meter.model, meter.usage)
                self.metrics.turns.labels(inbound.platform, "error").inc()
                self._turn_ended(inbound, "error")
                if not delivery.complete:
                    self.metrics.deliveries_failed.labels(inbound.platform).inc()
                return
            if await self._hand_over(inbound, reply, turn_id, result):
                return
            delivery = await reply.finish(
                final_text=result.text, interrupted=result.interrupted, notice=self._fallback_note(result)
            )
            status = "interrupted" if result.interrupted else "ok"
            await self._finish_turn(
                turn_id, result.messages, status=status,
                usage=self._usage(inbound, result.model, result.usage, always=True), inbox_ids=inbound.inbox_ids,
                inbox_status="stopped" if result.interrupted else "answered", reply=reply.state(),
            )
            self._count_usage(result.model, result.usage)
            outcome = "interrupted" if result.interrupted else "fell_back" if result.fell_back else "ok"
            self.metrics.turns.labels(inbound.platform, outcome).inc()
            self._turn_ended(inbound, outcome)
            for cause in result.fallback_causes:
                self.metrics.fallbacks.labels(cause).inc()
            if result.fallback_model:
                self.metrics.failovers.labels(result.asked, result.fallback_model).inc()
            if result.first_token_latency is not None:
                self.metrics.time_to_first_token.observe(result.first_token_latency)
            if not delivery.complete:
                self.metrics.deliveries_failed.labels(inbound.platform).inc()
            log.info(
                "turn %s: %s, %d steps, %s%d tokens%s",
                turn_id, outcome, result.steps, "~" if result.usage.estimated else "", result.usage.total_tokens,
                f", fell back ({', '.join(result.fallback_causes)})" if result.fell_back else "",
            )

    def _fallback_note(self, result: TurnResult) -> str | None:
        """The small print under a reply another model gave, because the chosen one failed."""
        if not result.fallback_model or not self.defaults.show_fallback_model or result.interrupted:
            return None
        label = self.model_choice.label
        return f"↪️ Answered by {label(result.fallback_model)}: {label(result.asked)} is unavailable right now."

    async def _caller_role(self, inbound: Inbound) -> Role:
        """The role of the person whose message this turn answers: it decides the tools offered.

        If the store cannot say (it is down), the turn goes on with a user's tools: never
        more than the person may have."""
        try:
            return max(await self.access.role(inbound), Role.USER)
        except Exception as exc:
            log.warning("chat %s: could not look up the sender's role (%s); offering a user's tools", inbound.chat.key, exc)
            return Role.USER

    async def _hand_over(self, inbound: Inbound, reply: LiveReply, turn_id: int, result: Any) -> bool:
        """The question was edited while this turn answered it: True when this turn stepped aside.

        Its reply stops where it is, with no marker -- the turn answering the new text
        continues in the same messages -- and the turn ends interrupted (superseded as that
        one begins), its usage booked. The inbox rows stay running: they belong to the
        next turn now, and a crash before it begins finds them, with what the chat shows.
        """
        edited = self._replacements.get(inbound.inbox_ids[0]) if inbound.inbox_ids else None
        if edited is None or edited.turn_id is not None:
            return False
        shown, state = await reply.hand_over()
        edited.turn_id, edited.adopt, edited.unsure = turn_id, shown, leftover_sends(state)
        try:
            await self.store.note_reply(inbound.inbox_ids, state)
        except StoreError as exc:
            log.warning("chat %s: could not record the reply an edit replaces: %s", inbound.chat.key, exc)
        usage = self._usage(inbound, result) if result is not None else None
        await self._finish_turn(turn_id, [], status="interrupted", usage=usage)
        if result is not None:
            self._count_usage(result)
        self.metrics.turns.labels(inbound.platform, "interrupted").inc()
        log.info("turn %s: its message was edited; answering the new text", turn_id)
        return True

    async def _end_recovered(self, inbound: Inbound, earlier: list[InboxRow], connector: Connector) -> bool:
        """A message an earlier process left unfinished: True when it ends here without a turn.

        Too old (`max_redelivery_age`): its cut-off reply is marked, or its sender asked to
        resend. Cut off `max_attempts` times already (a crash loop): the failure line.
        """
        age = self._wall() - min(r.received_at for r in earlier)
        too_old = age.total_seconds() > self.defaults.max_redelivery_age
        looping = max(r.attempts for r in earlier) >= self.defaults.max_attempts
        if not too_old and not looping:
            return False
        shown = _shown_by(earlier)
        status, notice = ("expired", INTERRUPTED_MARKER) if too_old else ("failed", CRASH_LOOP_TEXT)
        self.metrics.recovered.labels(status).inc()
        log.warning(
            "chat %s: message %s %s", inbound.chat.key, inbound.update_id,
            f"is {age.total_seconds():.0f}s old: not answered after the restart" if too_old
            else f"was cut off {max(r.attempts for r in earlier)} times: given up",
        )
        unsure = _leftovers_of(earlier)  # copies to look for
        if not shown:
            await self.reply(inbound, LOST_TEXT if too_old else CRASH_LOOP_TEXT)
            await remove_leftovers(connector.outbox, connector.pacing.for_chat(inbound.chat), inbound.chat, unsure)
            await self._finish_messages(list(inbound.inbox_ids), status)
            return True
        reply = LiveReply(
            connector.outbox,
            inbound.chat,
            connector.pacing.for_chat(inbound.chat),
            reply_to=inbound.message_id,
            clock=self.clock,
            stream=False,
            journal=_InboxJournal(self.store, inbound.inbox_ids),
            adopt=[MessageRef(inbound.chat, mid) for mid, _ in shown],
            unsure=unsure,
        )
        # The placeholder of an attempt cut off before its first words is nothing to keep.
        reply.on_text("\n".join(text for _, text in shown if text.strip() != CONTINUING_TEXT).rstrip())
        await reply.finish(notice=notice)
        await self._finish_messages(list(inbound.inbox_ids), status, reply=reply.state())
        return True

    async def _prepare_input(
        self, inbound: Inbound, connector: Connector, interrupt: asyncio.Event
    ) -> PreparedInput | None:
        """The message as model input: its files fetched and read (`bots.media_input`).

        None: no turn -- a file was refused (its one line is sent, the message ends
        "failed", nothing is stored), or the person stopped it while files were fetched.
        A message without files costs nothing here.
        """
        if not inbound.attachments:
            return text_input(inbound.text)
        work = asyncio.ensure_future(
            prepare(
                inbound.text,
                inbound.attachments,
                source=connector,
                transcribe=self.agent.transcribe,
                options=self.media,
            )
        )
        stopped = asyncio.ensure_future(interrupt.wait())
        typing = asyncio.create_task(self._typing(connector, inbound))
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            typing.cancel()
            stopped.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, typing, stopped, return_exceptions=True)
        if work.cancelled():
            log.info("chat %s: stopped while its files were read", inbound.chat.key)
            await self._finish_messages(list(inbound.inbox_ids), "stopped")
            return None
        try:
            return work.result()
        except MediaRefused as refused:
            log.info("chat %s: message %s not answered: %s", inbound.chat.key, inbound.update_id, refused.reason)
            self.metrics.media_refused.labels(inbound.platform, refused.reason).inc()
            await self.reply(inbound, refused.line)
            await self._finish_messages(list(inbound.inbox_ids), "failed")
            return None
        except Exception as exc:  # a bug reading a file must not leave the message hanging
            log.exception("chat %s: reading the files of message %s failed", inbound.chat.key, inbound.update_id)
            await self.reply(inbound, friendly_error(exc))
            await self._finish_messages(list(inbound.inbox_ids), "failed")
            return None

    async def _typing(self, connector: Connector, inbound: Inbound) -> None:
        """Show "typing" while files are fetched and read (a transcription takes seconds)."""
        pacer = connector.pacing.for_chat(inbound.chat)
        while True:
            async with pacer.try_sending() as allowed:
                if allowed:
                    try:
                        await connector.outbox.typing(inbound.chat)
                    except OutboxError:
                        return
            await self.clock.sleep(connector.outbox.limits.typing_interval)

    async def _replayed_images(self, connector: Connector, turns: list[Any]) -> dict[int, dict[int, dict[int, str]]]:
        """`media.replay_images`: earlier images fetched again, newest first, at most `max_images`.

        turn id -> message index -> attachment index -> `data:` URL. An image that cannot
        be fetched any more (expired, deleted) keeps its placeholder.
        """
        wanted: list[tuple[int, int, int, Attachment]] = []
        for turn in reversed(turns):
            for m, message in enumerate(turn.messages):
                if message.get("role") == "user":
                    wanted.extend((turn.id, m, i, a) for i, a in stored_images(message))
        wanted = wanted[: self.media.max_images]
        if not wanted or not callable(getattr(connector, "download", None)):
            return {}
        urls = await asyncio.gather(*(image_url(connector, a, self.media) for *_, a in wanted))
        found: dict[int, dict[int, dict[int, str]]] = {}
        for (turn_id, m, i, _), url in zip(wanted, urls):
            if url is not None:
                found.setdefault(turn_id, {}).setdefault(m, {})[i] = url
        return found

    async def _plan_turn(
        self, inbound: Inbound, supersede: list[int], prepared: PreparedInput | None = None
    ) -> tuple[str, str, bool, list[dict], int] | None:
        """Settings, history, budget; records the user message. None: refused (already said why).

        History keeps `prepared.stored` (file references, no bytes); the model and the
        budget hold see `prepared.content` (images as parts, counted per image).
        """
        prepared = prepared or text_input(inbound.text)
        settings = await self.store.chat_settings(inbound.chat.key)
        # The person's own choice, the chat's, or the default (a model chosen earlier may
        # have left the configured list since: then the default).
        model = (await self.model_choice.current(inbound.chat, inbound.user_key, settings.model)).name
        system_prompt = settings.system_prompt or self.defaults.system_prompt
        streaming = self.defaults.streaming if settings.streaming is None else settings.streaming
        session = await self.store.current_session(self.session_key(inbound))
        earlier = await self.store.history(session, limit_turns=self.defaults.history_max_messages)
        kept = [t for t in earlier if t.status in HISTORY_STATUSES and t.id not in supersede]
        replayed: dict[int, dict[int, dict[int, str]]] = {}
        if self.media.replay_images:
            replayed = await self._replayed_images(self.connectors[inbound.platform], kept)
        usable = [hist.turn_for_model(t.messages, t.status, replayed.get(t.id)) for t in kept]
        user_message = prepared.stored
        trimmed = hist.trim_history(
            system_prompt,
            usable,
            [{"role": "user", "content": prepared.content}],
            max_messages=self.defaults.history_max_messages,
            max_tokens=self.defaults.history_max_tokens,
            model=model,
        )
        history = [m for m in trimmed[:-1] if m.get("role") != "system"]
        try:
            turn_id = await self.store.begin_turn(
                session,
                user_message=user_message,
                user_key=inbound.user_key,
                update_id=inbound.update_id,
                inbox_ids=inbound.inbox_ids,
                supersede=supersede,
                hold=self._budget_hold(trimmed, model),
            )
        except BudgetRefused as refused:
            await self._refuse_for_budget(inbound, refused)
            return None
        return model, system_prompt, streaming, history, turn_id

    async def _abandon(self, inbound: Inbound, reply: LiveReply, turn_id: int, meter: UsageMeter) -> None:
        """The process is going down mid-turn: finalize what is visible, marked stopped,
        and book what the turn's model calls used up to the cut (the provider billed it).

        A conversation this replica abandoned (`abandon`) is left exactly as a crash
        leaves it: the replica taking it over continues the reply in the same message."""
        if inbound.chat.key in self._abandoned:
            await reply.aclose()
            return
        try:
            await asyncio.wait_for(reply.finish(interrupted=True), timeout=10)
        except (asyncio.TimeoutError, Exception):
            await reply.aclose()
        try:
            await self.store.finish_turn(
                turn_id, [], status="interrupted", usage=self._usage(inbound, meter.model, meter.usage),
                inbox_ids=inbound.inbox_ids, inbox_status="stopped", reply=reply.state(),
            )
        except Exception:
            log.exception("could not record the interrupted turn")
        self._count_usage(meter.model, meter.usage)

    def _budget_hold(self, sent: list[dict], model: str) -> BudgetHold:
        """What a turn reserves against its user's daily budget before the model is called.

        Usage is known only after the turn; the reservation is what keeps turns started at
        once in several chats from each seeing the whole budget free. It is the prompt
        as estimated for history trimming (`sent`: system prompt, kept history, the new
        message; plus the tool definitions) and the most the answer may take: the
        provider's own cap from `extra_params` when set, else `reserve_completion_tokens`.
        Counted for `model`, the one that will answer, as the agent counts an estimate it
        books for that model (`agent.tokens`), so the two agree.
        """
        prompt = sum(hist.estimate_tokens(m, model) for m in sent)
        if len(self.agent.tools):
            schemas = json.dumps(self.agent.tools.schemas(self.agent.cfg.api))
            prompt += hist.estimate_tokens({"role": "system", "content": schemas}, model)
        today = self._wall().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return BudgetHold(
            tokens=prompt + self._completion_allowance(),
            since=today,
            ttl=timedelta(seconds=self.defaults.budget_hold_ttl),
        )

    def _completion_allowance(self) -> int:
        """The most one answer may take: the provider's cap in `extra_params`, else the configured default."""
        params = self.agent.cfg.extra_params
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = params.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return self.defaults.reserve_completion_tokens

    async def _refuse_for_budget(self, inbound: Inbound, refused: BudgetRefused) -> None:
        """Say why no turn starts: the day's budget is spent, or running replies may spend it."""
        if refused.spent:
            text = f"⏳ You've used your daily budget of {refused.budget:,} tokens. It resets at 00:00 UTC."
        else:
            text = BUDGET_HELD_TEXT
        log.info("chat %s: turn refused for %s (%s)", inbound.chat.key, inbound.user_key, refused)
        await self.reply(inbound, text)
        self._settle(inbound, "failed")

    def _usage(self, inbound: Inbound, model: str, usage: TurnUsage, *, always: bool = False) -> Usage | None:
        """The usage row a finished turn books, priced when the model has a price.

        A turn that failed or was abandoned books a row only when it used something (a
        failure before the model generated anything is not billed, and is no turn of
        usage); one that finished or was stopped always does (`always`).
        """
        if not always and not (usage.prompt_tokens or usage.completion_tokens):
            return None
        price = self.defaults.prices.get(model)
        cost = None
        if price is not None:
            cost = usage.prompt_tokens * price[0] / 1e6 + usage.completion_tokens * price[1] / 1e6
        return Usage(
            user_key=inbound.user_key,
            chat_key=inbound.chat.key,
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost=cost,
            estimated_tokens=min(usage.estimated_tokens, usage.prompt_tokens + usage.completion_tokens),
        )

    def _count_usage(self, model: str, usage: TurnUsage) -> None:
        for kind, value in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
            if value:
                self.metrics.tokens.labels(model, kind).inc(value)

    def _turn_ended(self, inbound: Inbound, outcome: str) -> None:
        for listener in self.turn_listeners:
            try:
                listener(inbound, outcome)
            except Exception:
                log.exception("a turn listener raised; ignored")

    def _error_line(self, inbound: Inbound, exc: BaseException) -> str | None:
        """The friendly error line, at most once per cooldown in groups."""
        if inbound.chat.is_private:
            return friendly_error(exc)
        now = time.monotonic()
        last = self._last_error_line.get(inbound.chat.key)
        if last is not None and now - last < self.defaults.error_cooldown:
            return None
        self._last_error_line[inbound.chat.key] = now
        return friendly_error(exc)

    # ---- lifecycle ---------------------------------------------------------------------

    def _spawn(self, coro, chat_key: str | None = None) -> None:  # noqa: ANN001
        self._track(asyncio.create_task(coro), chat_key)

    def _track(self, task: asyncio.Future[None], chat_key: str | None) -> None:
        """Count a task until it is done: in `_tasks`, and in its chat's when it has one."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if chat_key is not None:
            tasks = self._chat_tasks.setdefault(chat_key, set())
            tasks.add(task)

            def done(t: asyncio.Future[None]) -> None:
                tasks.discard(t)
                if not tasks and self._chat_tasks.get(chat_key) is tasks:
                    del self._chat_tasks[chat_key]

            task.add_done_callback(done)

    def chat_idle(self, chat_key: str) -> bool:
        """Nothing of this chat is routed, held, queued, running or being finished here."""
        return not self.lanes.is_busy(chat_key) and not self._chat_tasks.get(chat_key)

    async def wait_chat_idle(self, chat_key: str) -> None:
        """Wait until `chat_idle(chat_key)`: its turns done, its replies and statuses written."""
        while True:
            await self.lanes.wait_idle(chat_key)
            pending = [t for t in self._chat_tasks.get(chat_key, ()) if not t.done()]
            if not pending and not self.lanes.is_busy(chat_key):
                return
            if pending:
                await asyncio.wait(pending)

    async def settle(self, chat_key: str) -> None:
        """Wait until a chat has no running turn, nothing queued and no pending reply."""
        while True:
            await self.lanes.wait_idle(chat_key)
            pending = [t for t in self._tasks if not t.done()]
            if not pending and not self.lanes.is_busy(chat_key):
                return
            if pending:
                await asyncio.wait(pending)

    async def settle_all(self) -> None:
        """Wait until no chat has a running turn or queued message and no reply is pending."""
        while True:
            for key in self.lanes.busy_keys():
                await self.lanes.wait_idle(key)
            pending = [t for t in self._tasks if not t.done()]
            if not pending and not self.lanes.busy_keys():
                return
            if pending:
                await asyncio.wait(pending)

    def interrupt_all(self) -> int:
        """Stop every running turn now; their live messages are finalized as stopped."""
        return self.lanes.interrupt_all()

    async def _finish_turn(self, turn_id: int, messages: list[dict], **kwargs: Any) -> None:
        """`Store.finish_turn`, retried while the database is down (the chat has its answer already)."""
        try:
            await self._durably("finish_turn", self.store.finish_turn, turn_id, messages, **kwargs)
        except TurnStateError as exc:
            log.warning("turn %s: %s", turn_id, exc)

    def _dropped(self, inbounds: list[Inbound]) -> None:
        """Queued messages dropped by /stop or /new: stopped by someone."""
        for inbound in inbounds:
            self._in_lanes.difference_update(inbound.inbox_ids)
            if inbound.inbox_ids:
                # An edited message due to restart its turn, stopped: the running turn ends
                # as any stopped turn does (marked stopped), nothing hands over.
                self._replacements.pop(inbound.inbox_ids[0], None)
            self._settle(inbound, "stopped")

    async def load_unfinished(self, platforms: list[str]) -> int:
        """Find what an earlier process left unfinished, and hold routing until `resume_unfinished`.

        Call before the connectors start receiving (so these messages keep their place
        before new ones), and `resume_unfinished` once they are connected.
        """
        rows = await self.store.unfinished_messages(platforms)
        self._routing_open.clear()
        rows = await self._recover(rows)
        if rows:
            running = sum(1 for r in rows if r.status == INBOX_RUNNING)
            log.info(
                "recovering %d messages an earlier process left unfinished (%d cut off mid-reply, %d waiting)",
                len(rows), running, len(rows) - running,
            )
            self.metrics.recovered.labels("resumed").inc(len(rows))
        return len(rows)

    async def _recover(self, rows: list[InboxRow]) -> list[InboxRow]:
        """Route messages a process that is gone left unfinished, as they were when it went."""
        rows = await self._apply_left_edits(rows)
        for row in rows:
            self._recovered[row.id] = row
        for inbound in self._regroup(rows):
            self._dispatch(inbound)
        return rows

    def abandon(self, chat_key: str) -> int:
        """Cluster mode: let go of a conversation as if this process had died; returns the
        turns cut off.

        For a replica that lost the database (or its heartbeat) long enough that another
        may be taking the conversation over: its turn is cancelled mid-stream with nothing
        finalized or written, its queued messages are left in the inbox, and nothing of it
        starts here again until this replica owns it anew (`take_over`). The next owner
        finds what a crash would have left, and completes the reply once.
        """
        self._abandoned.add(chat_key)
        running = self.lanes.is_busy(chat_key)
        for inbound in self.lanes.abandon(chat_key):
            self._in_lanes.difference_update(inbound.inbox_ids)
            self._forget_parts(inbound)
        return int(running)

    async def take_over(self, chat_key: str, rows: list[InboxRow]) -> None:
        """Cluster mode: this replica begins working on a conversation; `rows` are its unfinished messages.

        When a replica was cut off while working on it (a turn had begun: it died, or lost
        the database), they are recovered as after a restart -- the cut-off reply
        continues in the message the chat already shows, the crash-loop and age limits
        apply. Otherwise they are new messages, routed as they came.
        """
        self._abandoned.discard(chat_key)
        if any(r.status == INBOX_RUNNING or r.attempts or r.reply for r in rows):
            stale = await self.store.mark_stale_turns(status="error", chat_key=chat_key)
            log.info(
                "chat %s: taking over %d unfinished messages (%d turns were cut off)", chat_key, len(rows), stale
            )
            self.metrics.recovered.labels("resumed").inc(len(rows))
            await self._recover(rows)
            return
        for row in rows:
            self._dispatch(inbound_from_json(row.inbound, (row.id,)))

    async def _apply_left_edits(self, rows: list[InboxRow]) -> list[InboxRow]:
        """Edits an earlier process stored but did not settle, applied to their unfinished messages.

        The message is answered once, with the edited text, rather than started with the old
        text only to be restarted by its edit a moment later. An edit whose message is
        finished already stays, to be routed (and ignored) like any other.
        """
        kept: list[InboxRow] = []
        where: dict[tuple[str, str], int] = {}  # (chat, platform message id) -> index in `kept`
        for row in rows:
            edit_of = row.inbound.get("edit_of")
            if edit_of is None:
                where[(row.chat_key, str(row.inbound.get("message_id")))] = len(kept)
                kept.append(row)
                continue
            at = where.get((row.chat_key, str(edit_of)))
            if at is None or kept[at].user_key != row.user_key or row.inbound.get("command"):
                kept.append(row)
                continue
            revised = {**kept[at].inbound, "text": row.inbound.get("text", "")}
            if row.inbound.get("attachments"):
                revised["attachments"] = row.inbound["attachments"]
            await self.store.revise_message(kept[at].id, revised)
            await self.store.finish_messages([row.id], "answered")
            kept[at] = replace(kept[at], inbound=revised, attempts=0)
        return kept

    def _regroup(self, rows: list[InboxRow]) -> list[Inbound]:
        """Unfinished rows as the messages to answer, in their original order.

        Rows one turn answered (a split paste, an album, messages merged while a turn was
        interrupted) are one message again: answered once, continuing the reply they
        share. Rows not started yet are grouped as the coalescing window grouped them when
        they came (`bots.coalesce.regroup`), so a process killed inside the window answers
        the merged message once after the restart.
        """
        started: dict[int, list[Inbound]] = {}
        waiting: list[tuple[Inbound, float]] = []
        for row in rows:
            inbound = inbound_from_json(row.inbound, (row.id,))
            self._remember_part(inbound)
            if row.status == INBOX_RUNNING and row.turn_id is not None:
                started.setdefault(row.turn_id, []).append(inbound)
            else:
                waiting.append((inbound, row.received_at.timestamp()))
        window = self.coalescer.window_for
        groups = [merge_parts(parts) for parts in started.values()] + regroup(waiting, window)
        return sorted(groups, key=lambda m: min(m.inbox_ids))

    def resume_unfinished(self, *, started: bool = True) -> None:
        """Let routing go: recovered messages first, in their original order, then new ones.

        `started=False` (the platforms could not be connected): leave them in the inbox.
        """
        self._routing_abandoned = not started
        self._routing_open.set()

    async def shutdown(self, timeout: float) -> None:
        """Stop taking messages, let turns finish up to `timeout`, then stop them visibly.

        Messages still queued stay in the inbox: the next start answers them.
        """
        self._accepting = False
        self.lanes.refuse()
        # Messages held for a possible next part stay in the inbox too: no wait for their
        # windows; their senders hear parley is restarting (`Submitted.CLOSED`).
        held = self.coalescer.take_all()
        self._drop_idle_holds()
        for inbound in held:
            await self._submit_durably(inbound)
        leftovers = await self.lanes.close(timeout)
        if leftovers:
            log.info("%d queued messages stay in the inbox for the next start", len(leftovers))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        self._closing_store = True
        if self._spill_task is not None and not self._spill_task.done():
            log.error("%d messages could not be stored before shutdown; their senders are asked to resend", len(self._spill))
            self._spill_task.cancel()
            for inbound in list(self._spill):
                if inbound.addressed:
                    await self.reply(inbound, STORE_DOWN_TEXT)
            self._spill.clear()


def _shown_by(rows: list[InboxRow]) -> list[tuple[str, str]]:
    """(message id, text) the replies of these rows show, each message once (the rows
    one turn answered all record the same reply)."""
    shown: dict[str, str] = {}
    for row in rows:
        for mid, text in shown_messages(row.reply):
            shown.setdefault(mid, text)
    return list(shown.items())


def _leftovers_of(rows: list[InboxRow]) -> list[dict[str, Any]]:
    """The sends of unknown outcome these rows' replies recorded -- each reply once (the rows
    one turn answered record the same one), each of its entries kept: two lost sends of the
    same text are two copies to look for."""
    replies = {json.dumps(row.reply, sort_keys=True, default=str): row.reply for row in rows if row.reply}
    return [entry for reply in replies.values() for entry in leftover_sends(reply)]


class _InboxJournal:
    """The `ReplyJournal` of a turn: what the chat shows goes into its inbox rows."""

    def __init__(self, store: Store, inbox_ids: Iterable[int]) -> None:
        self._store = store
        self._ids = list(inbox_ids)

    async def record(self, state: dict[str, Any]) -> None:
        await self._store.note_reply(self._ids, state)
