"""Which replica works on which conversation, and how its messages reach it.

A replica *owns* a conversation while its worker runs the conversation's job
(`bots.cluster.queue`; procrastinate's lock guarantees one owner at a time). The owner
does everything for that conversation exactly as a single process does -- routing,
commands, coalescing, the lane with its busy policy, turns, recovery -- so every rule of
the single-process gateway holds per conversation in the cluster too.

Messages arrive at any replica (a webhook behind a load balancer, the Telegram poller).
The receiving replica stores them (the inbox's unique key makes a redelivery to another
replica a no-op), then:

- it owns the conversation: the message goes straight to its lanes;
- otherwise: it queues the conversation's job (a no-op when one waits already) and
  announces the message on a PostgreSQL NOTIFY channel. The owner, if any, fetches the
  conversation's messages it has not seen and routes them at once -- so `/stop` and the
  `interrupt` policy reach a turn running on another replica within milliseconds, and a
  queued message is acknowledged by the replica that will answer it. With no owner, the
  job starts the conversation on whichever replica's worker fetches it.

The owner ends the job when the conversation is idle: no turn, nothing queued or routed,
and no unseen unfinished message in the store (checked after it stopped taking new
ones, so a message arriving meanwhile is either seen here or has its own job queued).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from bots.cluster.pg import PgTarget, connect
from bots.cluster.queue import ConversationQueue
from bots.inbound import ButtonPress, Inbound
from bots.inbound import from_json as inbound_from_json
from bots.outbox import ChatRef

if TYPE_CHECKING:
    from bots.gateway import Gateway

log = logging.getLogger(__name__)

RECONNECT_AFTER = 2.0
"""Seconds between attempts to re-open the NOTIFY listener after it lost its connection."""
PRESS_WAIT = 1.5
"""Seconds a replica waits for the one working on a conversation to answer a button
press passed to it (Discord wants a press acknowledged within 3 s)."""


@dataclass(eq=False)
class _Owned:
    """A conversation this replica works on."""

    chat_key: str
    seen: set[int] = field(default_factory=set)  # inbox ids routed here while it is owned
    ready: bool = False  # what the store held when the job began has been routed
    closing: bool = False  # ending its job: new messages go to the next job
    abandoned: bool = False  # let go of as if this replica had died (fenced)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one fetch of unseen messages at a time


class Conversations:
    """The conversations this replica owns, and the traffic between replicas about them."""

    def __init__(self, gateway: "Gateway", queue: ConversationQueue, target: PgTarget, *, replica_id: str) -> None:
        self.gateway = gateway
        self.queue = queue
        self.target = target
        self.replica_id = replica_id
        self._owned: dict[str, _Owned] = {}
        self._listener: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None
        self._pulls: set[asyncio.Task[None]] = set()
        self._asked: dict[str, asyncio.Future[dict[str, Any]]] = {}  # presses passed on, by request id
        self._closed = False

    @property
    def owned(self) -> int:
        """Conversations this replica works on now."""
        return len(self._owned)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for other replicas' announcements, then let the worker hand us conversations."""
        await self._listen()
        self._listening = asyncio.create_task(self._keep_listening(), name="cluster-listener")
        self.queue.start(self.own, on_fence=self._let_go)

    def _let_go(self, reason: str) -> None:
        """Fenced (`ConversationQueue._watch_heartbeat`): drop every conversation as a crash would."""
        cut = 0
        for owned in list(self._owned.values()):
            owned.closing = True
            owned.abandoned = True
            cut += self.gateway.abandon(owned.chat_key)
        if cut:
            log.warning("cluster: %d turns left for another replica to continue (%s)", cut, reason)

    async def close(self) -> None:
        self._closed = True
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        for task in list(self._pulls):
            task.cancel()
        await asyncio.gather(*self._pulls, return_exceptions=True)
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), timeout=2)
            except Exception:
                listener.terminate()

    async def _listen(self) -> None:
        conn = await connect(self.target, self.replica_id)
        await conn.add_listener(self.target.inbox_channel, self._on_notify)
        await conn.add_listener(self.target.press_channel, self._on_press_notify)
        self._listener = conn

    async def _keep_listening(self) -> None:
        """Re-open the listener when its connection drops; what was announced meanwhile is fetched."""
        while not self._closed:
            await asyncio.sleep(RECONNECT_AFTER)
            if self._listener is not None and not self._listener.is_closed():
                continue
            try:
                await self._listen()
            except Exception as exc:
                log.warning("cluster: cannot listen for other replicas' messages (%s); retrying", type(exc).__name__)
                continue
            log.info("cluster: listening for other replicas' messages again")
            for owned in list(self._owned.values()):
                self._pull_later(owned)

    # ---- messages arriving here ----------------------------------------------------------

    async def arrived(self, inbounds: list[Inbound]) -> None:
        """Stored messages this replica received: route them here, or hand them to their conversation's job."""
        elsewhere: dict[str, int] = {}
        for inbound in inbounds:
            owned = self._owned.get(inbound.chat.key)
            if owned is not None and not owned.closing and self.gateway.accepting:
                # Through the store, in inbox order: a message another replica stored a
                # moment earlier (its announcement still on the way) goes first.
                self._pull_later(owned)
            else:
                elsewhere[inbound.chat.key] = max(inbound.inbox_ids)
        for chat_key, inbox_id in elsewhere.items():
            try:
                await self.queue.defer(chat_key)
                await self._notify(self.target.inbox_channel, {"chat": chat_key, "id": inbox_id})
            except Exception as exc:
                # Stored: the sweep queues its conversation (`bots.cluster.queue.UNQUEUED_AFTER`).
                log.warning("chat %s: could not queue the conversation (%s); the sweep will", chat_key, exc)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            chat_key = str(json.loads(payload)["chat"])
        except (ValueError, KeyError, TypeError):
            return
        owned = self._owned.get(chat_key)
        if owned is not None and not owned.closing:
            self._pull_later(owned)

    # ---- button presses for another replica's turn ---------------------------------------

    async def forward_press(self, press: ButtonPress) -> bool:
        """A press nothing here waits for (an approval asked by a turn on another replica):
        pass it to the replica working on its conversation and answer it as that one says.
        False: nobody took it (the caller answers "no longer waiting")."""
        if press.chat.key in self._owned:
            return False  # it is ours, and nothing waits for it
        request = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asked[request] = answer
        chat = press.chat
        try:
            await self._notify(self.target.press_channel, {
                "ask": request,
                "chat": {"platform": chat.platform, "chat_id": chat.chat_id, "thread_id": chat.thread_id,
                         "is_private": chat.is_private},
                "user_id": press.user_id, "message_id": press.message_id, "data": press.data,
                "username": press.username, "display_name": press.display_name,
            })
            reply = await asyncio.wait_for(answer, PRESS_WAIT)
        except Exception as exc:
            log.info("chat %s: a button press found no replica waiting for it (%s)", chat.key, type(exc).__name__)
            return False
        finally:
            self._asked.pop(request, None)
        if not reply.get("handled"):
            return False
        await press.answer(reply.get("text"), bool(reply.get("alert")))
        return True

    def _on_press_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if "reply" in message:
            answer = self._asked.get(str(message["reply"]))
            if answer is not None and not answer.done():
                answer.set_result(message)
            return
        try:
            chat = ChatRef(**message["chat"])
        except (KeyError, TypeError):
            return
        if chat.key in self._owned and "ask" in message:
            task = asyncio.create_task(self._answer_press(chat, message), name=f"cluster-press:{chat.key}")
            self._pulls.add(task)
            task.add_done_callback(self._pulls.discard)

    async def _answer_press(self, chat: ChatRef, message: dict[str, Any]) -> None:
        """Handle a press passed on by another replica; tell it what to answer."""
        said: dict[str, Any] = {}

        async def answer(text: str | None, alert: bool) -> None:
            said.update(text=text, alert=alert)

        press = ButtonPress(
            chat=chat, user_id=str(message.get("user_id")), message_id=str(message.get("message_id")),
            data=str(message.get("data")), answer=answer, username=message.get("username"),
            display_name=message.get("display_name"),
        )
        try:
            handled = await self.gateway.buttons.press(press)
        except Exception:
            log.exception("chat %s: a button press passed on by another replica failed", chat.key)
            handled, said = True, {"text": "Something went wrong; please try again.", "alert": True}
        if handled:
            try:
                await self._notify(self.target.press_channel, {"reply": message["ask"], "handled": True, **said})
            except Exception as exc:
                log.warning("chat %s: could not answer a press passed on by another replica (%s)", chat.key, exc)

    async def _notify(self, channel: str, payload: dict[str, Any]) -> None:
        await self.queue.app.connector.execute_query_async(
            "SELECT pg_notify(%(channel)s, %(payload)s)", channel=channel, payload=json.dumps(payload)
        )

    def _pull_later(self, owned: _Owned) -> None:
        task = asyncio.create_task(self._pull(owned), name=f"cluster-pull:{owned.chat_key}")
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    async def _pull(self, owned: _Owned) -> None:
        """Route the conversation's unfinished messages this replica has not seen yet."""
        async with owned.lock:
            if owned.closing or not owned.ready or not self.gateway.accepting:
                return
            try:
                rows = await self.gateway.store.unfinished_messages(chat_key=owned.chat_key)
            except Exception as exc:
                log.warning("chat %s: could not fetch new messages (%s); they wait for the next job", owned.chat_key, exc)
                return
            self._route_unseen(owned, rows)

    def _route_unseen(self, owned: _Owned, rows: list[Any]) -> int:
        """Route the rows (in inbox order) not routed here yet; returns how many."""
        count = 0
        for row in rows:
            if row.id not in owned.seen:
                owned.seen.add(row.id)
                self.gateway.dispatch(inbound_from_json(row.inbound, (row.id,)))
                count += 1
        return count

    # ---- a conversation's job ------------------------------------------------------------

    async def own(self, chat_key: str) -> None:
        """The job of a conversation: work on it here until it is idle."""
        if not self.gateway.accepting or chat_key in self._owned or self.queue.fenced:
            await self.queue.defer(chat_key)  # shutting down (or a duplicate job): for another replica
            return
        owned = self._owned[chat_key] = _Owned(chat_key)
        leftover = False
        try:
            async with owned.lock:
                rows = await self.gateway.store.unfinished_messages(chat_key=chat_key)
                owned.seen.update(r.id for r in rows)
                await self.gateway.take_over(chat_key, rows)
                owned.ready = True
            while True:
                await self.gateway.wait_chat_idle(chat_key)
                if owned.abandoned:
                    return  # the store may be unreachable; the next owner recovers everything
                async with owned.lock:
                    owned.closing = True
                    rows = await self.gateway.store.unfinished_messages(chat_key=chat_key)
                    if self.gateway.accepting and any(r.id not in owned.seen for r in rows):
                        owned.closing = False
                        self._route_unseen(owned, rows)
                        continue
                    leftover = bool(rows)
                    break
        finally:
            if self._owned.get(chat_key) is owned:
                del self._owned[chat_key]
        if leftover:
            if self.gateway.accepting:
                log.warning("chat %s: idle with %d unfinished messages; leaving them to the sweep", chat_key, len(rows))
            else:
                await self.queue.defer(chat_key)  # this replica is stopping: another one answers them
