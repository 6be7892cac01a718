"""LiveReply: a turn's events become one chat reply, progressively edited.

The agent calls the `TurnEvents` methods from its read loop; they only update the
reply's state and wake the flusher, so the provider is never slowed by the platform.
The flusher is a small reconciler: it computes what the chat *should* show (the reply
document laid out over messages), compares it with what the chat *does* show, and
performs the single most urgent platform call to close the gap -- after taking a token
from the chat's `Pacer`, and recomputing once the token is granted, so an interim edit
always carries the newest text and everything that arrived while waiting collapses into
it. Because every decision derives from "desired vs shown", the same loop handles
streaming, overflow into continuation messages, hiding pre-tool text, replacing a
preview after a fallback, the final formatted edit, a deleted live message and 429
pauses, and a reply is delivered complete and exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from agent.events import ToolCall, ToolResult
from bots.clock import REAL_CLOCK, Clock, TimerHandle
from bots.ids import one_line
from bots.errors import (
    BadFormatting,
    NotModified,
    OutboxError,
    RateLimited,
    TargetGone,
    TooLong,
    Transient,
    Undeliverable,
)
from bots.orphans import Fragment, SendLedger, as_id, remove_fragments, sending_as
from bots.outbox import Button, ChatRef, MessageRef, Outbox
from bots.pacing import Pacer, Priority
from bots.render import Layout, Piece, text_length

log = logging.getLogger(__name__)

STOPPED_MARKER = "⏹️ stopped"
EMPTY_REPLY = "(The model returned an empty reply.)"
STILL_WORKING_TEXT = "⏳ still working…"
"""The note a live message carries while nothing new has come for `still_working_after`
seconds; the next text replaces it, and the final message never has it."""


class ReplyJournal(Protocol):
    """Where a reply writes down what the chat shows, so a restart can find it again.

    `record` gets a JSON-able state (see `LiveReply.state`): before every new message
    is sent (with the text being sent under "sending", so a send cut off by a crash
    leaves its text to look for), and after every call that changed what is shown --
    but the last: the caller of `finish()` records `state()` with the turn's outcome,
    in the same transaction (one write less per reply). Sends whose outcome was unknown stay under "unsure" until they were looked for
    (`bots.orphans`). It may raise: the reply carries on regardless (the chat matters
    more than the note).
    """

    async def record(self, state: dict[str, Any]) -> None: ...


def leftover_sends(state: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The sends of a recorded reply state whose outcome is unknown: its "unsure" entries,
    and the "sending" one a crash cut off. Hand them to the next reply (`unsure=`)."""
    if not state:
        return []
    entries = [e for e in state.get("unsure") or () if isinstance(e, Mapping)]
    sending = state.get("sending")
    if isinstance(sending, Mapping):
        entries.append(sending)
    return [dict(e) for e in entries]


def shown_messages(state: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(message id, text) of every message a recorded reply state shows, in order --
    without a "still working…" note, which is never part of what a reply says."""
    if not state:
        return []
    return [
        (str(p["id"]), _without_note(str(p.get("text") or "")))
        for p in state.get("pieces") or ()
        if isinstance(p, Mapping) and p.get("id")
    ]


def _without_note(text: str) -> str:
    if text == STILL_WORKING_TEXT:
        return ""
    return text.removesuffix("\n\n" + STILL_WORKING_TEXT)


class ReplyObserver(Protocol):
    """Where a reply reports what it did (metrics)."""

    def on_call(self, kind: str) -> None: ...

    def on_rate_limited(self, retry_after: float) -> None: ...

    def on_lateness(self, seconds: float) -> None: ...

    def on_first_visible(self) -> None: ...


class NullObserver:
    def on_call(self, kind: str) -> None:
        pass

    def on_rate_limited(self, retry_after: float) -> None:
        pass

    def on_lateness(self, seconds: float) -> None:
        pass

    def on_first_visible(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """How a chat wants its replies to look (config `chat.*`, `telegram.drafts`)."""

    pre_tool_text: Literal["hide", "keep"] = "hide"
    show_reasoning: bool = False
    drafts: bool = False  # stream with ephemeral drafts, persist with one send (Telegram DMs)
    reasoning_chars: int = 600  # how much of the reasoning tail to show
    give_up_after: float = 180.0  # seconds of consecutive transient failures before giving up
    draft_refresh: float = 20.0  # drafts expire after 30 s without an update
    placeholder: str | None = None  # shown while there is nothing else to show (e.g. after a restart)
    still_working_after: float | None = None  # seconds of nothing new before the "still working…" note
    header: str | None = None  # Markdown the reply opens with once it shows anything (a voice note's transcript)
    # Seconds of nothing visible before the first "typing…". A reply whose first words come
    # sooner never needed it, and the call would cost the chat's budget a token that the
    # reply needs more: with a burst of 2 (Telegram), typing + the first send + the final
    # edit's reserve do not fit, so the first interim edit would come a whole interval
    # later, or a short reply's final edit would wait for a token.
    typing_after: float = 1.0


@dataclass(slots=True)
class Delivery:
    """How the reply ended: `complete` means the final state reached the chat."""

    complete: bool
    message_ids: list[str]
    text: str
    failure: str | None = None


@dataclass(slots=True)
class _Shown:
    ref: MessageRef | None
    text: str
    markdown: bool
    buttons: tuple[Button, ...] = ()


@dataclass(slots=True)
class _ToolLine:
    """One line of tool progress: running, ok, error (with a short reason), denied, or
    waiting for an approval (with the summary of what would run)."""

    call: ToolCall
    status: Literal["running", "ok", "error", "denied", "waiting"]
    note: str = ""


JOURNAL_TIMEOUT = 3.0
"""Seconds a reply waits for its `ReplyJournal` (a database that hangs must not stall the chat)."""

_UNKNOWN_TEXT = "\x00unknown"
"""The text of an adopted message: unknown, so never equal to what should be shown."""


@dataclass(slots=True)
class _Op:
    kind: Literal["send", "edit", "delete", "draft"]
    index: int
    text: str = ""
    markdown: bool = False
    buttons: tuple[Button, ...] = ()
    buttons_change: bool = False  # a question appears or goes: the stream waits on it

    @property
    def priority(self) -> Priority:
        if self.kind == "draft":
            return Priority.INTERIM
        if self.kind == "edit" and not self.markdown and not self.buttons_change:
            return Priority.INTERIM
        return Priority.FINAL


@dataclass(slots=True)
class _Step:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)


_ICONS = {"running": "⚙️", "ok": "✅", "error": "❌", "denied": "🔒", "waiting": "🔐"}


def _progress_line(line: _ToolLine) -> str:
    icon = _ICONS[line.status]
    name = line.call.name[:64]
    if line.status == "running":
        return f"{icon} {name}…"
    if line.status == "waiting":
        return f"{icon} Run {name}?\n{line.note}"
    if line.note:
        return f"{icon} {name}: {line.note}"
    return f"{icon} {name}"


def _short_reason(content: str, limit: int = 80) -> str:
    """A failed tool's result, cut to one short line for the chat (the model gets it all)."""
    text = content.strip().removeprefix("Error:").strip()
    return one_line(text.splitlines()[0] if text else "", limit) or "failed"


class LiveReply:
    """The `TurnEvents` of one turn in one chat. Use `start()`, feed events, `await finish()`."""

    wants_deltas = True

    def __init__(
        self,
        outbox: Outbox,
        chat: ChatRef,
        pacer: Pacer,
        *,
        reply_to: str | None = None,
        options: ReplyOptions = ReplyOptions(),
        clock: Clock = REAL_CLOCK,
        observer: ReplyObserver | None = None,
        stream: bool = True,
        journal: ReplyJournal | None = None,
        adopt: list[MessageRef] | None = None,
        unsure: list[Mapping[str, Any]] | None = None,
    ) -> None:
        """`adopt`: messages an earlier attempt left in the chat (after a restart); the
        reply continues in them -- edited, or deleted when the new reply needs fewer.
        `unsure`: sends of an earlier attempt whose outcome is unknown (`leftover_sends`);
        once this reply has sent a message, a copy they left is looked for and removed."""
        self.wants_deltas = stream  # with streaming off the agent answers in one piece
        self._outbox = outbox
        self._chat = chat
        self._pacer = pacer
        self._reply_to = reply_to
        self._opts = options
        self._clock = clock
        self._obs: ReplyObserver = observer or NullObserver()
        limits = outbox.limits
        utf16 = limits.utf16
        self._layout = Layout(
            limits.max_message_len,
            lambda t: text_length(t, utf16=utf16),
            lambda t: outbox.measure(t, markdown=True),
        )
        self._steps: list[_Step] = [_Step()]
        self._after_tools = False
        self._tools: list[_ToolLine] = []
        self._buttons: tuple[Button, ...] = ()  # under the last message while a question waits
        self._outcomes: dict[str, str] = {}  # call id -> how its approval ended
        self._final = False
        self._halted = False  # handed over: the chat stays as it is (`hand_over`)
        self._answered = False  # finish() was given the turn's answer
        self._interrupted = False
        self._notice: str | None = None
        self._shown: list[_Shown] = []
        self._plain_only: set[int] = set()
        self._drafts = options.drafts and chat.is_private
        self._draft: str | None = None  # text of the live draft on screen
        self._draft_at = 0.0
        self._draft_timer: TimerHandle | None = None
        self._dirty = asyncio.Event()
        self._done = asyncio.Event()
        self._failure: str | None = None
        self._visible = False
        self._reported_visible = False  # on_first_visible: a note alone is not the reply
        self._quiet_since = 0.0  # when the reply last got something new to show
        self._still_working = False  # the note is part of the document
        self._quiet_timer: TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Done once finish() was called: an interim edit still waiting for its slot then
        # waits as the final edit (`Pacer.sending(promote=)`), which may take the chat's
        # reserved token -- the stream has ended, so the final text should go now.
        self._ending: asyncio.Future[None] | None = None
        self._typing: asyncio.Task[None] | None = None
        self._journal = journal
        self._journal_failed = False
        self._journal_next: dict[str, Any] | None = None  # the newest state not written yet
        self._journal_task: asyncio.Task[None] | None = None
        self._journal_lock = asyncio.Lock()
        for ref in adopt or ():
            self._shown.append(_Shown(ref, _UNKNOWN_TEXT, False))
        # Sends whose outcome is unknown (bots.orphans): the one under way, and lost ones.
        self._ledger: SendLedger | None = getattr(outbox, "ledger", None)
        self._sending: Fragment | None = None
        self._fragments: list[Fragment] = []
        self._cleaner: asyncio.Task[None] | None = None
        self._watching = False
        self._keys: dict[int, str] = {}  # piece -> idempotency key, kept while its send may have happened
        if self._ledger is not None and adopt:
            self._ledger.know(chat, [ref.message_id for ref in adopt])
        for entry in unsure or ():
            fragment = Fragment.from_json(entry)
            if fragment is None:
                continue
            if self._ledger is not None and self._ledger.active(chat):
                fragment.clean = False  # this process wrote here already: a successor could not tell
            if fragment.key is not None:
                self._keys[fragment.index] = fragment.key  # sending that piece again reuses it
            self._fragments.append(fragment)
        self._update_watch()

    # ---- TurnEvents ------------------------------------------------------------------

    def on_text(self, delta: str) -> None:
        self._step_for_output().text.append(delta)
        self._moved()
        self._dirty.set()

    def on_reasoning(self, delta: str) -> None:
        self._step_for_output().reasoning.append(delta)
        if self._opts.show_reasoning:
            self._moved()
            self._dirty.set()

    def on_first_delta(self) -> None:
        self._step_for_output()

    def on_tool_started(self, call: ToolCall) -> None:
        self._after_tools = True
        self._tools.append(_ToolLine(call, "running"))
        self._moved()
        self._dirty.set()

    def on_tool_finished(self, call: ToolCall, result: ToolResult) -> None:
        if result.denied:
            line = _ToolLine(call, "denied", "no answer in time" if self._outcomes.get(call.id) == "timed out" else "denied")
        elif result.is_error:
            line = _ToolLine(call, "error", _short_reason(result.content))
        else:
            line = _ToolLine(call, "ok")
        for i, known in enumerate(self._tools):
            if known.call is call or known.call.id == call.id:
                self._tools[i] = line
                break
        else:  # a call that never ran: invalid, or not approved
            self._after_tools = True
            self._tools.append(line)
        self._moved()
        self._dirty.set()

    # ---- approvals (bots.approvals.ApprovalView) -------------------------------------------

    def ask_approval(self, call: ToolCall, summary: str, buttons: list[Button]) -> None:
        """Show what would run, with the buttons to answer, until `end_approval`."""
        self._after_tools = True  # the model called a tool: its text so far is pre-tool text
        self._tools.append(_ToolLine(call, "waiting", summary))
        self._buttons = tuple(buttons)
        self._moved()
        self._dirty.set()

    def end_approval(self, call: ToolCall, outcome: str) -> None:
        """The question was answered (or timed out, or the turn stopped): it and its buttons go."""
        self._outcomes[call.id] = outcome
        self._tools = [t for t in self._tools if not (t.status == "waiting" and t.call.id == call.id)]
        if not any(t.status == "waiting" for t in self._tools):
            self._buttons = ()
        self._moved()
        self._dirty.set()

    def on_fallback(self, final_text: str) -> None:
        step = self._step_for_output()
        step.text[:] = [final_text]
        self._moved()
        self._dirty.set()

    # ---- "still working…" ------------------------------------------------------------

    def _moved(self) -> None:
        """Something new to show: the quiet clock restarts, and a note gives way to it.

        Per delta this is one clock read; the timer is re-armed lazily when it fires
        (`_check_quiet`), or here only when a note was showing (no timer runs then)."""
        if self._opts.still_working_after:
            self._quiet_since = self._clock.now()
            if self._still_working:
                self._still_working = False
                self._arm_quiet()

    def _arm_quiet(self) -> None:
        after = self._opts.still_working_after
        if after and not self._final:
            self._quiet_timer = self._clock.call_at(self._quiet_since + after, self._check_quiet)

    def _check_quiet(self) -> None:
        self._quiet_timer = None
        after = self._opts.still_working_after
        if self._final or self._still_working or not after:
            return
        if self._clock.now() >= self._quiet_since + after:
            self._still_working = True
            self._dirty.set()
        else:
            self._arm_quiet()

    def _stop_quiet(self) -> None:
        self._still_working = False
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Begin flushing, and show "typing" from `typing_after` seconds on until something is visible."""
        if self._flusher is None:
            self._ending = asyncio.get_running_loop().create_future()
            self._flusher = asyncio.create_task(self._flush_loop(), name=f"live-reply:{self._chat.key}")
            self._typing = asyncio.create_task(self._typing_loop(), name=f"typing:{self._chat.key}")
            if self._opts.still_working_after and not self._final:
                self._quiet_since = self._clock.now()
                self._arm_quiet()

    async def finish(
        self,
        final_text: str | None = None,
        *,
        interrupted: bool = False,
        notice: str | None = None,
    ) -> Delivery:
        """Make the last edits and wait until the chat shows the complete reply.

        `final_text` is the turn's authoritative answer: if the stream missed something,
        it wins. `interrupted` adds the stopped marker; `notice` (an error line) is
        appended below whatever is visible.
        """
        if final_text is not None and not interrupted:
            # The turn's answer is authoritative: if the stream missed anything, it wins.
            current = None if self._after_tools else self._steps[-1]
            if current is None or "".join(current.text) != final_text:
                self._step_for_output().text[:] = [final_text]
        self._answered = final_text is not None and not interrupted
        self._interrupted = interrupted
        self._buttons = ()  # a finished reply asks nothing
        self._tools = [t for t in self._tools if t.status != "waiting"]
        self._notice = notice
        self._final = True
        self._stop_quiet()
        self._dirty.set()
        self.start()
        assert self._flusher is not None and self._ending is not None
        if not self._ending.done():
            self._ending.set_result(None)
        await asyncio.shield(self._flusher)
        await self._finish_cleaning()
        await self._stop_typing()
        if self._journal_task is not None:
            self._journal_task.cancel()  # the caller records the final state itself
        return Delivery(
            complete=self._failure is None,
            message_ids=[s.ref.message_id for s in self._shown if s.ref is not None],
            text=self.document(final=True),
            failure=self._failure,
        )

    async def hand_over(self) -> tuple[list[MessageRef], dict[str, Any]]:
        """Stop without a last edit, leaving the chat as it shows now, for the reply that
        continues in these messages (its question was edited mid-answer: the new answer
        replaces this one in place, rather than a second reply below a stopped one).

        The call in flight completes first. Returns the messages shown, for the next
        reply's `adopt`, and the state to record (its sends of unknown outcome included).
        """
        self._halted = True
        self._final = True
        self._stop_quiet()
        self._dirty.set()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._finish_cleaning()
        await self._stop_typing()
        if self._journal_task is not None:
            self._journal_task.cancel()  # the caller records the state itself
        return [s.ref for s in self._shown if s.ref is not None], self.state()

    async def aclose(self) -> None:
        """Abandon the reply without finishing it (used only when the process dies)."""
        self._unwatch()
        self._stop_quiet()
        for task in (self._flusher, self._typing, self._cleaner):
            if task is not None:
                task.cancel()
        for task in (self._flusher, self._typing, self._cleaner):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    @property
    def visible(self) -> bool:
        """Whether anything of this reply has reached the chat."""
        return self._visible

    def state(self) -> dict[str, Any]:
        """What the chat shows of this reply, as JSON (for the `ReplyJournal`): the pieces,
        the send under way ("sending") and sends whose outcome is unknown ("unsure"), each
        with what it takes to look for its message (`bots.orphans.Fragment`)."""
        pieces = [
            {"id": s.ref.message_id, "text": s.text, "markdown": s.markdown}
            for s in self._shown
            if s.ref is not None and s.text != _UNKNOWN_TEXT
        ]
        state: dict[str, Any] = {"pieces": pieces}
        if self._sending is not None:
            state["sending"] = self._sending.to_json()
        if self._fragments:
            state["unsure"] = [self._fragment_json(f) for f in self._fragments]
        return state

    def _fragment_json(self, fragment: Fragment) -> dict[str, Any]:
        """A fragment for the journal, with the bound this process knows for it (a copy an
        earlier process left lies below the first message this one sent in the chat), so
        the next process can still look for it if this one dies first."""
        data = fragment.to_json()
        if "before" not in data and self._ledger is not None:
            bound = fragment.bound(self._ledger, self._chat)
            if bound is not None:
                data["before"] = bound
        return data

    async def _record(self) -> None:
        """Write the reply's state down; while the journal is failing, without waiting for it.

        Normally awaited (before a send, the text must be on record first). Once a write
        failed (the database is down), later ones run in the background, one at a time,
        so the chat keeps its pace; the first that succeeds makes writes awaited again.
        """
        if self._journal is None:
            return
        state = self.state()
        if self._journal_failed:
            self._journal_next = state
            if self._journal_task is None or self._journal_task.done():
                self._journal_task = asyncio.create_task(self._record_behind())
            return
        await self._write_state(state)

    async def _record_behind(self) -> None:
        while self._journal_next is not None and self._journal_failed:
            state, self._journal_next = self._journal_next, None
            await self._write_state(state)

    async def _write_state(self, state: dict[str, Any]) -> None:
        assert self._journal is not None
        try:
            async with self._journal_lock:  # one write at a time, each of the newest state:
                state = self.state()  # an older write never lands after a newer one
                await asyncio.wait_for(self._journal.record(state), JOURNAL_TIMEOUT)
        except Exception as exc:  # the chat matters more than the note about it
            if not self._journal_failed:
                log.warning("chat %s: could not record the reply's state: %s", self._chat.key, exc)
            self._journal_failed = True
            return
        if self._journal_failed:
            log.info("chat %s: recording the reply's state again", self._chat.key)
        self._journal_failed = False

    # ---- the document ----------------------------------------------------------------

    def _step_for_output(self) -> _Step:
        if self._after_tools:
            self._after_tools = False
            self._steps.append(_Step())
        return self._steps[-1]

    def document(self, *, final: bool) -> str:
        """What the reply should show right now, as one Markdown text."""
        # Right after a tool call starts, the last step's text is pre-tool text.
        current = None if self._after_tools else self._steps[-1]
        answer = "".join(current.text) if current is not None else ""
        parts: list[str] = []
        if self._opts.show_reasoning and current is not None and current.reasoning:
            parts.append(self._quote("".join(current.reasoning)))
        if self._opts.pre_tool_text == "keep":
            parts.extend(t for t in ("".join(s.text).strip() for s in self._steps) if t)
        elif answer.strip():
            parts.append(answer.rstrip())
        if self._tools and not answer.strip():
            parts.append(self._progress())
        if not parts and not final and self._opts.placeholder:
            parts.append(self._opts.placeholder)
        if self._still_working and not final:
            parts.append(STILL_WORKING_TEXT)
        if final:
            if not parts and self._answered and not self._notice:
                parts.append(EMPTY_REPLY)
            if self._interrupted:
                parts.append(STOPPED_MARKER)
            if self._notice:
                parts.append(self._notice)
        if self._opts.header and parts:
            # With the reply, never alone: until the answer starts, the chat shows "typing".
            parts.insert(0, self._opts.header)
        return "\n\n".join(parts)

    def _quote(self, reasoning: str) -> str:
        tail = reasoning.strip()
        if len(tail) > self._opts.reasoning_chars:
            tail = "…" + tail[-self._opts.reasoning_chars :]
        return "\n".join("> " + line for line in tail.splitlines() if line.strip())

    def _progress(self) -> str:
        shown = self._tools[-8:]
        lines = [_progress_line(t) for t in shown]
        if len(self._tools) > 8:
            lines.insert(0, f"… {len(self._tools) - 8} earlier tool calls")
        return "\n".join(lines)

    # ---- reconciliation ----------------------------------------------------------------

    def _desired(self) -> list[tuple[Piece, str, bool]]:
        """(piece, text to show, as markdown) for every message the reply should have."""
        out = []
        for i, piece in enumerate(self._layout.pieces(self.document(final=self._final), final=self._final)):
            markdown = self._final or piece.committed
            text = piece.text
            if markdown and i in self._plain_only:
                text, markdown = self._outbox.plain(piece.text), False
            out.append((piece, text, markdown))
        return out

    def _buttons_for(self, index: int, count: int) -> tuple[Button, ...]:
        """Buttons go under the reply's last message (where its question is)."""
        return self._buttons if index == count - 1 and not self._halted else ()

    def _next_op(self) -> _Op | None:
        if self._halted:
            return None
        desired = self._desired()
        for i, (piece, text, markdown) in enumerate(desired):
            shown = self._shown[i] if i < len(self._shown) else None
            buttons = self._buttons_for(i, len(desired))
            # A draft cannot carry buttons: a question is always a real message.
            live_draft = self._drafts and not markdown and i == len(desired) - 1 and not buttons
            if live_draft and (shown is None or shown.ref is None):
                if self._draft != text or self._clock.now() - self._draft_at >= self._opts.draft_refresh:
                    return _Op("draft", i, text)
                return None
            if shown is None or shown.ref is None:
                return _Op("send", i, text, markdown, buttons, bool(buttons))
            if shown.text != text or shown.markdown != markdown or shown.buttons != buttons:
                return _Op("edit", i, text, markdown, buttons, shown.buttons != buttons)
        if len(self._shown) > len(desired):
            return _Op("delete", len(self._shown) - 1)
        return None

    async def _flush_loop(self) -> None:
        failing_since: float | None = None
        backoff = 0.5
        while True:
            op = self._next_op()
            if op is None:
                if self._final:
                    return
                self._dirty.clear()
                await self._dirty.wait()
                continue
            error: Exception | None = None
            # Once the turn is over every call is part of the final state (even a plain
            # edit of a piece whose formatting was rejected): none keeps the reserve.
            priority = Priority.FINAL if self._final else op.priority
            async with self._pacer.sending(priority, promote=self._ending) as allowed_at:
                op = self._next_op()  # the newest state wins: coalesce what arrived meanwhile
                if op is None:
                    continue
                self._obs.on_lateness(max(0.0, self._clock.now() - allowed_at))
                if op.kind == "send":
                    await self._begin_send(op)
                try:
                    with sending_as(self, key=self._sending.key if self._sending is not None else None):
                        await self._apply(op)
                except Exception as exc:  # handled below, once the call's place in flight is free
                    error = exc
            if op.kind == "send":
                self._end_send(error)
            if error is None:
                failing_since, backoff = None, 0.5
                if op.kind != "draft" and not (self._final and self._next_op() is None):
                    await self._record()  # (the last call's outcome is recorded by the caller of finish())
                    self._maybe_clean()
            elif isinstance(error, RateLimited):
                self._obs.on_rate_limited(error.retry_after)
                self._pacer.pause(error.retry_after, scope=error.scope)
            elif isinstance(error, Undeliverable):
                self._give_up(str(error))
                return
            else:  # Transient, or a connector bug: back off and retry
                if isinstance(error, Transient):
                    log.info("chat %s: %s failed (%s); retrying in %.1fs", self._chat.key, op.kind, error, backoff)
                else:
                    log.error("chat %s: unexpected error during %s", self._chat.key, op.kind, exc_info=error)
                now = self._clock.now()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self._opts.give_up_after:
                    self._give_up(f"{op.kind} kept failing for {now - failing_since:.0f}s")
                    return
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _apply(self, op: _Op) -> None:
        """One platform call, and what it means for `_shown`. Raises what the loop handles."""
        i = op.index
        try:
            if op.kind == "draft":
                await self._apply_draft(op)
            elif op.kind == "send":
                self._obs.on_call("send")
                extra: dict[str, Any] = {"buttons": op.buttons} if op.buttons else {}
                ref = await self._outbox.send(
                    self._chat, op.text, markdown=op.markdown, reply_to=self._reply_to if i == 0 else None, **extra
                )
                shown = _Shown(ref, op.text, op.markdown, op.buttons)
                if i < len(self._shown):
                    self._shown[i] = shown
                else:
                    self._shown.append(shown)
                if self._drafts and i == len(self._shown) - 1:
                    self._draft = None  # the draft of this piece is now persisted
                self._mark_visible(op.text)
            elif op.kind == "edit":
                self._obs.on_call("edit")
                ref = self._shown[i].ref
                assert ref is not None
                # (an outbox that never shows buttons is never asked about them)
                extra = {"buttons": op.buttons} if op.buttons or self._shown[i].buttons else {}
                try:
                    await self._outbox.edit(ref, op.text, markdown=op.markdown, **extra)
                except NotModified:
                    pass
                self._shown[i] = _Shown(ref, op.text, op.markdown, op.buttons)
                if not self._reported_visible:
                    self._mark_visible(op.text)
            else:  # delete
                self._obs.on_call("delete")
                ref = self._shown[i].ref
                if ref is not None:
                    try:
                        await self._outbox.delete(ref)
                    except TargetGone:
                        pass
                self._shown.pop(i)
                self._plain_only.discard(i)
        except TargetGone:
            if op.kind == "send":  # nothing of ours is gone: the chat (topic, interaction) is
                raise Undeliverable("the chat to send to no longer exists") from None
            # The user deleted the message we were editing: continue in a new one.
            self._shown[i].ref = None
        except BadFormatting:
            if not op.markdown:
                raise Undeliverable("the platform rejected plain text") from None
            log.info("chat %s: formatting rejected; resending as plain text", self._chat.key)
            self._plain_only.add(i)
        except TooLong:
            log.info("chat %s: message %d too long after rendering; cutting smaller", self._chat.key, i)
            self._layout.uncommit(i)
            self._layout.shrink()

    # ---- sends whose outcome is unknown (bots.orphans) -----------------------------------

    async def _begin_send(self, op: _Op) -> None:
        """Write down the send before it leaves: its text, and where its message will be."""
        known = [as_id(s.ref.message_id) for s in self._shown if s.ref is not None]
        known.append(as_id(self._reply_to) if self._reply_to else None)
        if self._ledger is not None:
            known.append(self._ledger.high(self._chat))
        after = max((k for k in known if k is not None), default=None)
        clean = (
            self._ledger is not None
            and after is not None
            and not self._ledger.foreign_since(self._chat, after, self)
        )
        key = self._keys.setdefault(op.index, secrets.token_hex(10))
        self._sending = Fragment(op.index, op.text, op.markdown, after, clean=clean, key=key)
        self._update_watch()
        await self._record()

    def _end_send(self, error: Exception | None) -> None:
        sending, self._sending = self._sending, None
        if sending is None:
            return
        if error is not None and (isinstance(error, Transient) or not isinstance(error, OutboxError)):
            # The request may have reached the platform: the message may exist.
            if self._ledger is not None:
                sending.window = self._ledger.window(self._chat, self)
            self._fragments.append(sending)
            log.info("chat %s: a send's outcome is unknown; a copy will be looked for", self._chat.key)
        elif error is None:
            self._keys.pop(sending.index, None)  # delivered: sending this piece again is a new message
            if self._ledger is None:
                # Without a ledger nothing can be looked for, nor needs to be (Discord): this
                # send carried the lost ones' key, so it returned the message they created.
                self._fragments = [f for f in self._fragments if f.index != sending.index]
        self._update_watch()

    def _maybe_clean(self) -> None:
        """Look for lost sends in the background once a later message bounds where they are."""
        if self._ledger is None or not self._fragments:
            return
        if self._cleaner is not None and not self._cleaner.done():
            return
        if any(f.bound(self._ledger, self._chat) is not None for f in self._fragments):
            self._cleaner = asyncio.create_task(self._clean(), name=f"orphans:{self._chat.key}")

    async def _clean(self) -> None:
        assert self._ledger is not None
        while True:
            ready = [f for f in self._fragments if f.bound(self._ledger, self._chat) is not None]
            if not ready:
                return
            try:
                shown = [as_id(s.ref.message_id) for s in self._shown if s.ref is not None]
                await remove_fragments(
                    self._outbox, self._pacer, self._chat, ready,
                    owner=self, keep=[i for i in shown if i is not None], clock=self._clock,
                )
            except Exception:
                log.exception("chat %s: looking for a lost send failed", self._chat.key)
            self._fragments = [f for f in self._fragments if f not in ready]
            self._ledger.settle(self._chat, [f.window for f in ready if f.window is not None])
            self._update_watch()
            await self._record()

    async def _finish_cleaning(self) -> None:
        self._maybe_clean()
        if self._cleaner is not None:
            try:
                await asyncio.shield(self._cleaner)
            except Exception:
                pass
        self._unwatch()
        for fragment in self._fragments:  # no later message bounds them; unwatched from now on
            fragment.clean = False

    def _update_watch(self) -> None:
        if self._ledger is None:
            return
        wanted = self._sending is not None or bool(self._fragments)
        if wanted and not self._watching:
            self._ledger.watch(self._chat, self, self._someone_else_sends)
            self._watching = True
        elif not wanted:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._watching and self._ledger is not None:
            self._ledger.unwatch(self._chat, self)
        self._watching = False

    async def _someone_else_sends(self) -> None:
        """Another send is about to leave in this chat: a successor could not tell its message
        from a lost one of ours, so write down (before it leaves) that they may not be probed."""
        tainted = False
        for fragment in [self._sending, *self._fragments]:
            if fragment is not None and fragment.clean:
                fragment.clean = False
                tainted = True
        if tainted:
            await self._record()

    async def _apply_draft(self, op: _Op) -> None:
        self._obs.on_call("draft")
        try:
            await self._outbox.draft(self._chat, self._draft_id(op.index), op.text)
        except (RateLimited, Transient):
            raise
        except OutboxError as exc:
            log.info("chat %s: drafts failed (%s); streaming by edits instead", self._chat.key, exc)
            self._drafts = False
            return
        self._draft = op.text
        self._draft_at = self._clock.now()
        self._mark_visible(op.text)
        self._schedule_draft_refresh()

    def _draft_id(self, index: int) -> int:
        return (id(self) % 1_000_000) * 100 + index + 1

    def _schedule_draft_refresh(self) -> None:
        if self._draft_timer is not None:
            self._draft_timer.cancel()
        self._draft_timer = self._clock.call_at(self._draft_at + self._opts.draft_refresh, self._dirty.set)

    def _mark_visible(self, text: str) -> None:
        """Something reached the chat (typing stops); the first time it is more than the
        "still working…" note, the observer hears of it (time to first visible text)."""
        self._visible = True
        if not self._reported_visible and text.strip() != STILL_WORKING_TEXT:
            self._reported_visible = True
            self._obs.on_first_visible()

    def _give_up(self, why: str) -> None:
        self._failure = why
        log.warning("chat %s: reply not delivered completely: %s", self._chat.key, why)

    # ---- typing ----------------------------------------------------------------------

    async def _typing_loop(self) -> None:
        interval = self._outbox.limits.typing_interval
        if self._opts.typing_after > 0:
            await self._clock.sleep(self._opts.typing_after)
        while not self._visible and not self._final:
            async with self._pacer.try_sending() as allowed:
                if allowed:
                    self._obs.on_call("typing")
                    try:
                        await self._outbox.typing(self._chat)
                    except OutboxError as exc:
                        if isinstance(exc, RateLimited):
                            self._pacer.pause(exc.retry_after, scope=exc.scope)
                        elif isinstance(exc, Undeliverable):
                            return
            await self._clock.sleep(interval)

    async def _stop_typing(self) -> None:
        if self._draft_timer is not None:
            self._draft_timer.cancel()
        if self._typing is not None and not self._typing.done():
            self._typing.cancel()
            try:
                await self._typing
            except asyncio.CancelledError:
                pass
