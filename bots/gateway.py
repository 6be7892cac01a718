"""The Gateway: from a platform-neutral chat message to a delivered reply.

Connectors hand every incoming message to `Gateway.handle`. It drops redelivered
updates, checks access (deny by default), runs commands (which bypass the chat's lane),
and submits everything else to the chat's lane, where `_run_turn` loads the
conversation, runs the agent with a `LiveReply` as its events, finishes the reply and
persists the turn. Provider failures end as one short, friendly line -- rate-limited in
groups -- never as a stack trace or a raw exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from agent import Agent
from agent.errors import (
    AgentError,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from bots import history as hist
from bots.access import Access, Role, denial_text
from bots.clock import REAL_CLOCK, Clock
from bots.commands import CommandContext, CommandRegistry, builtin_commands
from bots.errors import OutboxError, RateLimited, Transient, Undeliverable
from bots.inbound import Inbound
from bots.lanes import Lanes, Submitted
from bots.live_reply import LiveReply, ReplyOptions
from bots.logs import turn_context
from bots.metrics import Metrics, ReplyMetrics
from bots.outbox import Outbox
from bots.pacing import Pacing, Priority
from bots.render import Layout
from bots.store import Store, StoreError

log = logging.getLogger(__name__)

QUEUED_TEXT = "⏳ I'll answer this right after the current reply."
QUEUE_FULL_TEXT = "⏳ I'm still busy and my queue for this chat is full. Please resend this in a moment."
RESTARTING_TEXT = "parley is restarting. Please resend your message in a minute."
PRUNE_EVERY = 3600.0
"""How often (seconds) the ids of processed updates are pruned."""
KEEP_UPDATE_IDS = timedelta(days=3)
"""Longer than any platform redelivers (Telegram keeps undelivered updates 24 hours)."""
HISTORY_STATUSES = ("ok", "interrupted", "error")
"""Finished turns the model sees again (failed ones with a note); superseded ones are gone."""


class Connector(Protocol):
    """A platform connection: receives messages for the gateway and offers its Outbox."""

    platform: str
    outbox: Outbox
    pacing: Pacing
    drafts: bool

    @property
    def connected(self) -> bool: ...

    async def start(self, gateway: "Gateway") -> None: ...

    async def stop_receiving(self) -> None: ...

    async def stop(self) -> None: ...


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

    def allowed_models(self) -> list[str]:
        return list(dict.fromkeys([self.model, *self.models]))


def friendly_error(exc: BaseException) -> str:
    """One short line for the chat: what happened and what to do. Never the raw error."""
    if isinstance(exc, ProviderAuthError):
        return "⚠️ The model provider rejected parley's credentials. An admin needs to check the API key."
    if isinstance(exc, ProviderRateLimited):
        return "⚠️ The model provider is rate-limiting requests right now. Please try again in a minute."
    if isinstance(exc, ProviderTimeout):
        return "⚠️ The model took too long to answer. Please try again."
    if isinstance(exc, ProviderUnavailable):
        return "⚠️ The model provider isn't reachable right now. Please try again shortly."
    if isinstance(exc, ProviderBadResponse):
        return "⚠️ The model provider sent a broken answer. Please try again."
    if isinstance(exc, ProviderBadRequest):
        text = str(exc).lower()
        if "context" in text or "too long" in text or ("maximum" in text and "token" in text):
            return "⚠️ This conversation is too long for the model. Send /new to start a fresh one."
        return "⚠️ The model provider refused the request. An admin may need to check the model settings."
    return "⚠️ Something went wrong while generating the reply. Please try again."


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
    ) -> None:
        self.store = store
        self.agent = agent
        self.access = access
        self.defaults = defaults
        self.commands = commands or builtin_commands()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.lanes = Lanes(self._run_turn, queue_max=defaults.queue_max)
        self.connectors: dict[str, Connector] = {}
        self.started_at = time.monotonic()
        self._chat_locks: dict[str, asyncio.Lock] = {}
        self._last_error_line: dict[str, float] = {}
        self._tasks: set[asyncio.Future[None]] = set()  # replies in flight and messages being routed
        self._accepting = True
        self._seen_users: dict[str, tuple[str | None, str | None]] = {}  # skip rewriting unchanged names
        self._next_prune: float | None = None  # first message: prune at once
        self.metrics.track(lambda: self.lanes.active, lambda: sum(self.lanes.queue_depths().values()))

    def attach(self, connector: Connector) -> None:
        self.connectors[connector.platform] = connector

    @property
    def accepting(self) -> bool:
        """False once `shutdown` began: new turns are refused (and their senders told)."""
        return self._accepting

    # ---- incoming ----------------------------------------------------------------------

    async def handle(self, inbound: Inbound) -> None:
        """Take one incoming message. Returns quickly: turns run in lanes, replies in tasks.

        Commands run here, before the next message of the chat is routed, so "/new"
        followed at once by a question puts the question in the new conversation.
        While parley shuts down, messages are still answered (a turn gets "parley is
        restarting, resend it"): the platform already considers them delivered, so
        dropping them would lose them silently.
        """
        # Counted among the pending work until routed, so `settle_all` also waits for
        # messages still being routed (connectors deliver concurrently).
        routed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.add(routed)
        self.metrics.messages_received.labels(inbound.platform).inc()
        # One chat's messages are routed in arrival order even when a connector delivers
        # them concurrently (discord.py and python-telegram-bot run each in its own task,
        # started in arrival order): the chat's lock is taken before the first pause.
        lock = self._chat_locks.setdefault(inbound.chat.key, asyncio.Lock())
        try:
            async with lock:
                try:
                    await self._route(inbound)
                except StoreError as exc:
                    # Without the store parley cannot tell who may ask, nor whether it answered
                    # this update already: stay silent rather than risk a wrong or double reply.
                    log.error("chat %s: message %s not handled: %s", inbound.chat.key, inbound.update_id, exc)
                finally:
                    if not lock._waiters:  # type: ignore[attr-defined]
                        self._chat_locks.pop(inbound.chat.key, None)
        finally:
            routed.set_result(None)
            self._tasks.discard(routed)

    STORE_RETRIES = (0.1, 0.5, 2.0)
    """Back-off (seconds) before retrying a store call that failed: a busy database is not a lost message."""

    async def _with_retries(self, what: str, call, *args):  # noqa: ANN001, ANN202
        for delay in (*self.STORE_RETRIES, None):
            try:
                return await call(*args)
            except StoreError as exc:
                if delay is None:
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                await self.clock.sleep(delay)

    def _remember_seen(self, inbound: Inbound) -> None:
        if len(self._seen_users) > 50_000:
            self._seen_users.clear()
        self._seen_users[inbound.user_key] = (inbound.username, inbound.display_name)

    async def _route(self, inbound: Inbound) -> None:
        # Remember who people are (so an admin can /allow @them) even from group chatter.
        if self._seen_users.get(inbound.user_key) != (inbound.username, inbound.display_name):
            await self._with_retries(
                "remember_user", self.store.remember_user, inbound.user_key, inbound.username, inbound.display_name
            )
            self._remember_seen(inbound)
        if not inbound.addressed:
            return  # group chatter not meant for the bot: nothing to answer, nothing to de-duplicate
        if not await self._with_retries("claim_update", self.store.claim_update, inbound.platform, inbound.update_id):
            self.metrics.duplicates_ignored.labels(inbound.platform).inc()
            log.info("chat %s: update %s already handled; ignored", inbound.chat.key, inbound.update_id)
            return
        self._maybe_prune()
        role = await self.access.role(inbound)
        if role == Role.BLOCKED:
            if inbound.expects_answer:
                await self._answer(inbound, "⛔ You can't use this bot.")
            return
        if role == Role.NOBODY:
            tell = inbound.chat.is_private or inbound.expects_answer
            if tell and (inbound.expects_answer or self.access.should_tell_denied(inbound.user_key)):
                await self._answer(inbound, denial_text(inbound))
            log.info("chat %s: message from %s without access", inbound.chat.key, inbound.user_key)
            return
        if inbound.command is not None:
            await self._run_command(inbound, role)
            return
        if not inbound.text.strip():
            return
        await self._submit(inbound)

    def _maybe_prune(self) -> None:
        """Forget old update ids now and then, so the de-duplication table stays small."""
        now = self.clock.now()
        if self._next_prune is not None and now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        self._spawn(self._prune())

    async def _prune(self) -> None:
        try:
            pruned = await self.store.prune_updates(KEEP_UPDATE_IDS)
        except Exception as exc:  # housekeeping: never worth failing a message over
            log.warning("could not prune processed update ids: %s", exc)
            return
        if pruned:
            log.info("pruned %d processed update ids", pruned)

    async def _run_command(self, inbound: Inbound, role: Role) -> None:
        """Run a command now (commands bypass the lane); its answer is sent in a task."""
        assert inbound.command is not None
        command = self.commands.get(inbound.command)
        if command is None:
            if inbound.chat.is_private or inbound.mentions_bot or inbound.expects_answer:
                await self._answer(inbound, f"Unknown command /{inbound.command}. Send /help for the list.")
            return
        ctx = CommandContext(inbound=inbound, role=role, gateway=self, command=command)
        text = await self.commands.run(ctx)
        if text:
            await self._answer(inbound, text)

    async def _submit(self, inbound: Inbound) -> None:
        settings = await self.store.chat_settings(inbound.chat.key)
        policy = settings.busy_policy or self.defaults.busy_policy
        if policy == "interrupt" and self.session_key(inbound) != inbound.chat.key:
            running = self.lanes.running(inbound.chat.key)
            if running is not None and running.user_key != inbound.user_key:
                policy = "queue"  # a conversation of its own: nobody else may cut it off
        outcome = self.lanes.submit(inbound, policy=policy)
        if outcome is Submitted.QUEUED:
            await self._answer(inbound, QUEUED_TEXT)
        elif outcome is Submitted.FULL:
            await self._answer(inbound, QUEUE_FULL_TEXT)
        elif outcome is Submitted.CLOSED:
            await self._answer(inbound, RESTARTING_TEXT)

    async def _answer(self, inbound: Inbound, text: str) -> None:
        """Reply in a task, so routing never waits on the platform -- except while
        shutting down, when the reply must be out before the connector closes."""
        if self._accepting:
            self._spawn(self.reply(inbound, text))
        else:
            await self.reply(inbound, text)

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
        content = turn.messages[0].get("content")
        if not isinstance(content, str) or not content.strip():
            return "The last message cannot be retried."
        await self.store.mark_turn_superseded(turn.id)
        await self._submit(replace(inbound, command=None, args="", text=content))
        return ""

    # ---- replies outside a turn --------------------------------------------------------

    async def reply(self, inbound: Inbound, text: str) -> None:
        """A reply outside a turn (command output, notices), paced like everything else.

        Plain text; one that does not fit one message (a long system prompt shown by
        /system) goes out as several, never truncated.
        """
        connector = self.connectors.get(inbound.platform)
        if connector is None:
            return
        limits, measure = connector.outbox.limits, lambda t: connector.outbox.measure(t, markdown=False)
        pieces = [p.text for p in Layout(limits.max_message_len, measure, measure).pieces(text, final=True)]
        for i, piece in enumerate(pieces):
            if not await self._send_one(connector, inbound, piece, reply_to=inbound.message_id if i == 0 else None):
                return

    async def _send_one(self, connector: Connector, inbound: Inbound, text: str, *, reply_to: str | None) -> bool:
        """Send one message, waiting out rate limits; False when it could not be delivered."""
        pacer = connector.pacing.for_chat(inbound.chat)
        deadline = time.monotonic() + 120
        while True:
            await pacer.acquire(Priority.FINAL)
            try:
                await connector.outbox.send(inbound.chat, text, reply_to=reply_to)
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
        connector = self.connectors[inbound.platform]
        started = time.monotonic()
        try:
            plan = await self._plan_turn(inbound)
        except Exception as exc:  # the store failed before anything was shown
            log.exception("chat %s: could not start a turn", inbound.chat.key)
            line = self._error_line(inbound, exc)
            if line:
                await self.reply(inbound, line)
            return
        if plan is None:
            return
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
            ),
            clock=self.clock,
            observer=ReplyMetrics(self.metrics, inbound.platform, started),
            stream=streaming,
        )
        with turn_context(platform=inbound.platform, chat=inbound.chat.key, turn=turn_id):
            reply.start()
            try:
                result = await self.agent.run_turn(
                    history, inbound.text, reply, model=model, system_prompt=system_prompt, interrupt=interrupt
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._abandon(reply, turn_id))
                raise
            except Exception as exc:
                if not isinstance(exc, (ProviderError, AgentError)):
                    log.exception("turn failed unexpectedly")
                else:
                    log.warning("turn failed: %s", type(exc).__name__)
                delivery = await reply.finish(notice=self._error_line(inbound, exc))
                await self.store.finish_turn(turn_id, [], status="error")
                self.metrics.turns.labels(inbound.platform, "error").inc()
                if not delivery.complete:
                    self.metrics.deliveries_failed.labels(inbound.platform).inc()
                return
            delivery = await reply.finish(final_text=result.text, interrupted=result.interrupted)
            status = "interrupted" if result.interrupted else "ok"
            await self.store.finish_turn(turn_id, result.messages, status=status)
            await self._record_usage(inbound, result)
            outcome = "interrupted" if result.interrupted else "fell_back" if result.fell_back else "ok"
            self.metrics.turns.labels(inbound.platform, outcome).inc()
            for cause in result.fallback_causes:
                self.metrics.fallbacks.labels(cause).inc()
            if result.first_token_latency is not None:
                self.metrics.time_to_first_token.observe(result.first_token_latency)
            if not delivery.complete:
                self.metrics.deliveries_failed.labels(inbound.platform).inc()
            log.info(
                "turn %s: %s, %d steps, %d tokens%s",
                turn_id, outcome, result.steps, result.usage.total_tokens,
                f", fell back ({', '.join(result.fallback_causes)})" if result.fell_back else "",
            )

    async def _plan_turn(self, inbound: Inbound) -> tuple[str, str, bool, list[dict], int] | None:
        """Settings, budget, history; records the user message. None: refused (already said why)."""
        settings = await self.store.chat_settings(inbound.chat.key)
        allowed = self.defaults.allowed_models()
        # A model chosen earlier may have left the configured list since.
        model = settings.model if settings.model in allowed else self.defaults.model
        system_prompt = settings.system_prompt or self.defaults.system_prompt
        streaming = self.defaults.streaming if settings.streaming is None else settings.streaming
        if not await self._within_budget(inbound):
            return None
        session = await self.store.current_session(self.session_key(inbound))
        earlier = await self.store.history(session, limit_turns=self.defaults.history_max_messages)
        usable = [hist.turn_for_model(t.messages, t.status) for t in earlier if t.status in HISTORY_STATUSES]
        user_message = {"role": "user", "content": inbound.text}
        trimmed = hist.trim_history(
            system_prompt,
            usable,
            [user_message],
            max_messages=self.defaults.history_max_messages,
            max_tokens=self.defaults.history_max_tokens,
        )
        history = [m for m in trimmed[:-1] if m.get("role") != "system"]
        turn_id = await self.store.begin_turn(
            session, user_message=user_message, user_key=inbound.user_key, update_id=inbound.update_id
        )
        return model, system_prompt, streaming, history, turn_id

    async def _abandon(self, reply: LiveReply, turn_id: int) -> None:
        """The process is going down mid-turn: finalize what is visible, marked stopped."""
        try:
            await asyncio.wait_for(reply.finish(interrupted=True), timeout=10)
        except (asyncio.TimeoutError, Exception):
            await reply.aclose()
        try:
            await self.store.finish_turn(turn_id, [], status="interrupted")
        except Exception:
            log.exception("could not record the interrupted turn")

    async def _within_budget(self, inbound: Inbound) -> bool:
        budget = await self.store.budget(inbound.user_key)
        if budget is None:
            return True
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        used = await self.store.tokens_used(inbound.user_key, today)
        if used < budget:
            return True
        await self.reply(
            inbound,
            f"⏳ You've used your daily budget of {budget:,} tokens. It resets at 00:00 UTC.",
        )
        return False

    async def _record_usage(self, inbound: Inbound, result) -> None:  # noqa: ANN001 - agent.TurnResult
        usage = result.usage
        price = self.defaults.prices.get(result.model)
        cost = None
        if price is not None:
            cost = usage.prompt_tokens * price[0] / 1e6 + usage.completion_tokens * price[1] / 1e6
        await self.store.add_usage(
            user_key=inbound.user_key,
            chat_key=inbound.chat.key,
            model=result.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost=cost,
        )
        for kind, value in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
            if value:
                self.metrics.tokens.labels(result.model, kind).inc(value)

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

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def shutdown(self, timeout: float) -> None:
        """Stop taking messages, let turns finish up to `timeout`, then stop them visibly."""
        self._accepting = False
        leftovers = await self.lanes.close(timeout)
        for inbound in leftovers:
            self._spawn(self.reply(inbound, "parley is restarting and did not get to this message. Please resend it in a minute."))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
