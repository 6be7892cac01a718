"""A faithful fake Telegram Bot API server (aiohttp) for parley's tests and benchmarks.

Why: every connector test, end-to-end test and benchmark of parley talks to this server
through the *real* python-telegram-bot, so its fidelity decides what those tests are worth.
It reproduces the documented and observed behaviour collected in
``../shared/reference/telegram-bot-api.md`` (relative to the repository): URL shapes,
request encodings, the JSON envelope with the real HTTP status, the exact error strings,
long polling with its 409 conflicts, webhook delivery with the secret header, message
state (edits, deletions, drafts, forum topics) and a deterministic flood model that
answers 429 like Telegram.

Pointing PTB at it needs no monkeypatching::

    fake = FakeTelegram()
    await fake.start()                      # 127.0.0.1, free port
    bot = telegram.Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)

The test plays the user (``user_says``, ``user_edits``, ``user_deletes``, ``user_presses``
(``user_clicks``), ``user_presses_inline``,
and for media ``user_sends_photo``, ``user_sends_document``, ``user_sends_voice``,
``user_sends_audio``, ``user_sends_video_note``, ``user_sends_video``,
``user_sends_animation``, ``user_sends_sticker``, ``user_sends_album``) and inspects the
chat as a person sees it (``messages``, ``bot_texts``, ``current_draft``, ``buttons``) and
every API call (``calls``, ``count_429``, ``callback_answers``). ``wait_for`` re-checks a predicate on every state
change, so tests never sleep and hope.

Files people send are kept as ``FakeFile``s: ``getFile`` answers with ``file_path`` and
``file_size`` and the bytes are served at ``/file/bot<token>/<file_path>``, streamed.
Limits follow the Bot API documentation ("bots can download files of up to 20MB in
size"; the file_path link is valid "for at least 1 hour"; [doc getFile]): ``getFile`` on
a larger file answers 400 ``Bad Request: file is too big``; a file_id the fake never
issued answers 400 ``Bad Request: invalid file_id`` when it is not even shaped like one,
else ``Bad Request: wrong file_id or the file is temporarily unavailable`` -- the
wording bots meet for expired or foreign ids ([3p]: many bot libraries' tests and logs
quote these three strings; the reference server's own list is not in the shared notes).
``expire_file`` makes a file unavailable (getFile as above, downloads 404).

Inline keyboards and button presses. A message keeps the ``reply_markup`` it was sent or
edited with (``SeenMessage.reply_markup``, ``buttons``); ``editMessageText`` replaces it
and, like Telegram, *drops* it when no ``reply_markup`` is given ("if you edit a message
and want the inline keyboard to stay, you'll need to pass it again", PTB maintainers in
python-telegram-bot#1949; go-telegram-bot-api#158); ``editMessageReplyMarkup`` changes only
the keyboard (none given: removed). "message is not modified" only when text, entities and
keyboard are all unchanged [ref ``Client.cpp:108-111``]. Buttons are validated as the Bot
API does: ``text`` a string, one action field; ``callback_data`` 1-64 bytes, else
``Bad Request: BUTTON_DATA_INVALID``; an empty or missing action ``Bad Request: can't parse
inline keyboard button: Text buttons are unallowed in the inline keyboard`` [3p: observed
against the live API by several client libraries' tests]. ``user_presses`` queues a
``callback_query`` update (polling and webhook alike) for a button the message shows and
returns the query id; ``answerCallbackQuery`` records the answer in ``callback_answers``
and refuses an unknown id, a second answer or one later than ``callback_answer_deadline``
seconds with ``Bad Request: query is too old and response timeout expired or query ID is
invalid`` [ref ``Client.cpp:146-148``], and a text over 200 characters with ``Bad Request:
MESSAGE_TOO_LONG`` [3p].

Decisions where Telegram's behaviour is not documented (all overridable):

* Flood model (``TelegramLimits``): per chat a token bucket of 1/s with a burst of 3;
  per group or supergroup at most 20 calls in any 60 s; 30/s overall with a burst of 30.
  Sends, edits and deletes count; drafts count by default (``count_drafts``); chat
  actions count toward the global bucket only unless ``count_chat_actions``. A refused
  call consumes nothing. Validation that TDLib does locally (parse errors, length,
  unknown message) happens before the flood check; "message is not modified" is
  decided after it, as the Telegram server decides it.
* ``latency`` is added to every Bot API call before it is processed.
* ``drop`` closes the connection without answering and does *not* apply the call;
  ``drop_after_apply`` and ``timeout_after_apply`` apply it first (the ambiguous case
  a bot must reconcile).
* Webhook delivery is sequential (one connection), in update order, retried with
  exponential back-off on any non-2xx answer or connection error.
* ``setWebhook`` accepts ``http://`` URLs unless ``require_https`` (tests listen on
  plain HTTP); the webhook is not verified by connecting before answering.
* The getUpdates anti-busy-loop rule (same offset within 3 s forces ``timeout=3``) is
  off by default (``busy_loop_guard``) because it only slows PTB's shutdown.
* A draft disappears when it expires (30 s after its last update) or when the bot
  sends a message into the same chat and thread.
* Buttons: a button with several action fields is refused (the Bot API docs say "exactly
  one"; the reference server would take the first it knows) -- the wording is
  [unverified]. Empty rows are dropped and an empty keyboard is no keyboard.
  ``callback_answer_deadline`` (15 s) stands for Telegram's undocumented answer timeout
  (clients give up on the spinner after about that long [3p]).
* Media: a photo comes in three sizes (each its own file), the given bytes being the
  largest; file ids are shaped like Telegram's (a type prefix plus base64url) and file
  paths like ``photos/file_3.jpg``; captions carry generated ``caption_entities`` as
  text does. A media group is several messages with one ``media_group_id``, the
  caption on the first, queued together (Telegram delivers an album's updates back to
  back). An animation also carries ``document``, as the Bot API does for compatibility.

Run standalone (benchmarks drive it from another process through ``/_fake/``)::

    python -m tests.fakes.telegram --port 8081 --latency 0.05 [--no-limits]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from tests.fakes.telegram_markup import FormattedText, FormattingError, find_entities, format_text, utf16_len

__all__ = [
    "DEFAULT_TOKEN",
    "CallRecord",
    "DraftRecord",
    "Fault",
    "FakeChat",
    "FakeFile",
    "FakeTelegram",
    "FakeUser",
    "FloodControl",
    "SeenMessage",
    "TelegramLimits",
    "WebhookDelivery",
    "main",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TOKEN = "123456:TEST-TOKEN"

CONFLICT_OTHER_POLL = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"
TEXT_BUTTONS_UNALLOWED = "can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"
# The action fields of an InlineKeyboardButton [doc InlineKeyboardButton]: exactly one is used.
BUTTON_ACTIONS = (
    "url", "callback_data", "web_app", "login_url", "switch_inline_query", "switch_inline_query_current_chat",
    "switch_inline_query_chosen_chat", "copy_text", "callback_game", "pay",
)  # fmt: skip
NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup are exactly the same as a current "
    "content and reply markup of the message"
)
CHAT_ACTIONS = frozenset(
    {"typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice", "upload_document",
     "choose_sticker", "find_location", "record_video_note", "upload_video_note"}
)  # fmt: skip
UPDATE_TYPES = (
    "message", "edited_message", "channel_post", "edited_channel_post", "business_connection", "business_message",
    "edited_business_message", "deleted_business_messages", "message_reaction", "message_reaction_count",
    "inline_query", "chosen_inline_result", "callback_query", "shipping_query", "pre_checkout_query",
    "purchased_paid_media", "poll", "poll_answer", "my_chat_member", "chat_member", "chat_join_request",
    "chat_boost", "removed_chat_boost",
)  # fmt: skip
# [] or an omitted first setting = everything except these (doc getUpdates).
_OPT_IN_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
_TOKEN_SHAPE = re.compile(r"\d{1,20}:[A-Za-z0-9_\-]{1,100}")
_SECRET_SHAPE = re.compile(r"[A-Za-z0-9_\-]{1,256}")
_COMMAND_SHAPE = re.compile(r"[a-z0-9_]{1,32}")
# Parameters whose form value is a JSON-serialised object or array (PTB json.dumps them).
_JSON_PARAMS = frozenset(
    {"entities", "caption_entities", "reply_parameters", "reply_markup", "link_preview_options", "commands",
     "scope", "allowed_updates", "media", "results", "options", "permissions", "reaction"}
)  # fmt: skip
_STATUS_TEXT = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
FAULT_KINDS = frozenset({"5xx", "error", "timeout", "timeout_after_apply", "drop", "drop_after_apply", "429"})


# =========================================================================== limits


@dataclass
class TelegramLimits:
    """The fake's flood model and size limits; every number is configurable.

    Defaults follow the Bot FAQ quoted in the reference (§12): "avoid more than one
    message per second" in a chat (short bursts allowed -> a bucket of 1/s with 3
    tokens), "no more than 20 messages per minute" to one group (a sliding 60 s window:
    a bucket with a burst of 20 would let 40 through in the first minute), and about 30
    messages per second overall. Edits share the send limits (tdlib/td#3034). Setting a
    rate or burst to 0 disables that bucket; ``enabled=False`` disables flood control.
    """

    per_chat_rate: float = 1.0
    per_chat_burst: int = 3
    group_per_minute: int = 20
    group_window: float = 60.0
    global_rate: float = 30.0
    global_burst: int = 30
    count_drafts: bool = True
    count_chat_actions: bool = False
    strict_utf16: bool = False
    max_text_length: int = 4096
    max_caption_length: int = 1024  # "0-1024 characters after entities parsing" [doc sendPhoto]
    max_download_size: int = 20 * 1024 * 1024  # "bots can download files of up to 20MB" [doc getFile]
    draft_ttl: float = 30.0
    enabled: bool = True


class _TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def wait(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return 0.0 if self.tokens >= 1.0 - 1e-9 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self.wait(now)
        self.tokens -= 1.0


class _SlidingWindow:
    __slots__ = ("limit", "stamps", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.stamps: deque[float] = deque()

    def wait(self, now: float) -> float:
        while self.stamps and self.stamps[0] <= now - self.window:
            self.stamps.popleft()
        return 0.0 if len(self.stamps) < self.limit else self.stamps[0] + self.window - now

    def take(self, now: float) -> None:
        self.wait(now)
        self.stamps.append(now)


class FloodControl:
    """Deterministic flood control: per-chat buckets, per-group windows, one global bucket.

    ``acquire`` either consumes one unit from every bucket that applies and returns None,
    or consumes nothing and returns ``retry_after``: the whole seconds (>= 1, rounded up)
    until every bucket would admit the call. Drive it with an injected clock to test it
    without sleeping.
    """

    def __init__(self, limits: TelegramLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._chats: dict[int, _TokenBucket] = {}
        self._groups: dict[int, _SlidingWindow] = {}
        self._global: _TokenBucket | None = None

    def reset(self) -> None:
        """Forget all consumption (fresh buckets)."""
        self._chats.clear()
        self._groups.clear()
        self._global = None

    def acquire(self, chat_id: int, *, is_group: bool, kind: str = "message") -> int | None:
        """``kind`` is ``"message"`` (send/edit/delete), ``"draft"`` or ``"chat_action"``."""
        limits = self.limits
        if not limits.enabled:
            return None
        per_chat = kind == "message" or (kind == "draft" and limits.count_drafts) or (
            kind == "chat_action" and limits.count_chat_actions
        )
        overall = per_chat or kind == "chat_action"
        now = self.clock()
        buckets: list[_TokenBucket | _SlidingWindow] = []
        if per_chat and limits.per_chat_rate > 0 and limits.per_chat_burst > 0:
            bucket = self._chats.get(chat_id)
            if bucket is None:
                bucket = self._chats[chat_id] = _TokenBucket(limits.per_chat_rate, limits.per_chat_burst, now)
            buckets.append(bucket)
        if per_chat and is_group and limits.group_per_minute > 0 and limits.group_window > 0:
            window = self._groups.get(chat_id)
            if window is None:
                window = self._groups[chat_id] = _SlidingWindow(limits.group_per_minute, limits.group_window)
            buckets.append(window)
        if overall and limits.global_rate > 0 and limits.global_burst > 0:
            if self._global is None:
                self._global = _TokenBucket(limits.global_rate, limits.global_burst, now)
            buckets.append(self._global)
        wait = max((b.wait(now) for b in buckets), default=0.0)
        if wait > 1e-9:
            return max(1, math.ceil(wait - 1e-9))
        for bucket in buckets:
            bucket.take(now)
        return None


# =========================================================================== state


@dataclass(eq=False)
class FakeUser:
    """A Telegram user the test plays."""

    id: int
    first_name: str
    last_name: str | None = None
    username: str | None = None
    language_code: str | None = None
    is_bot: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        for key in ("last_name", "username", "language_code"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data


@dataclass(eq=False)
class SeenMessage:
    """One message as a person in the chat sees it.

    ``edits`` holds every version, the first included, as ``(t, text, entities)`` with
    ``t`` from the fake's clock (text and entities are None when the fake runs with
    ``keep_history=False``). A deleted message keeps its last text with ``deleted=True``.
    """

    chat_id: int
    message_id: int
    from_bot: bool
    sender: dict[str, Any] | None
    text: str
    entities: list[dict[str, Any]]
    thread_id: int | None
    reply_to: int | None
    created_at: float
    date: int
    reply_markup: dict[str, Any] | None = None
    link_preview_options: dict[str, Any] | None = None
    edits: list[tuple[float, str | None, list[dict[str, Any]] | None]] = field(default_factory=list)
    edit_date: int | None = None
    deleted: bool = False
    deleted_at: float | None = None
    deleted_by: str | None = None
    service: dict[str, Any] | None = None
    media: dict[str, Any] | None = None  # e.g. {"photo": [...]}: ``text``/``entities`` are then the caption
    media_group_id: str | None = None

    @property
    def button_rows(self) -> list[list[tuple[str, str | None]]]:
        """The inline keyboard as a person sees it: rows of ``(label, callback_data)``
        (``callback_data`` is None for other buttons, e.g. a URL)."""
        keyboard = (self.reply_markup or {}).get("inline_keyboard") or []
        return [[(b["text"], b.get("callback_data")) for b in row] for row in keyboard]

    @property
    def buttons(self) -> list[tuple[str, str | None]]:
        """Every button under the message, row after row, as ``(label, callback_data)``."""
        return [button for row in self.button_rows for button in row]

    @property
    def has_buttons(self) -> bool:
        return bool(self.buttons)

    @property
    def edit_count(self) -> int:
        """How many times the text changed after it was first sent."""
        return max(0, len(self.edits) - 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (used by ``GET /_fake/messages``)."""
        data = dataclasses.asdict(self)
        data["edits"] = [list(e) for e in self.edits]
        return data


@dataclass(eq=False)
class FakeFile:
    """A file a person sent, as Telegram keeps it for the bot.

    ``size`` is what Telegram reports (``file_size`` in the message and in getFile);
    ``data`` is what a download serves -- None serves ``size`` filler bytes without
    holding them in memory (a 25 MB file costs nothing). A test may make the two differ
    to play a server that reports less than it sends. ``downloads`` counts the requests
    for the bytes; ``available`` False plays an expired or deleted file.
    """

    file_id: str
    file_unique_id: str
    file_path: str
    size: int
    data: bytes | None = None
    available: bool = True
    downloads: int = 0

    @property
    def length(self) -> int:
        """How many bytes a download serves."""
        return len(self.data) if self.data is not None else self.size


@dataclass(eq=False)
class DraftRecord:
    """One ``sendMessageDraft`` call that reached the chat."""

    t: float
    chat_id: int
    thread_id: int | None
    draft_id: int
    text: str
    entities: list[dict[str, Any]]
    next_message_id: int  # the id the chat's next message gets; later bot messages replace the draft


@dataclass(eq=False)
class FakeChat:
    """A chat the fake knows: private (id = the user's id), group, or supergroup."""

    id: int
    type: str
    title: str | None = None
    username: str | None = None
    user: FakeUser | None = None
    is_forum: bool = False
    bot_is_admin: bool = False
    blocked: bool = False
    next_message_id: int = 1
    messages: dict[int, SeenMessage] = field(default_factory=dict)
    topics: dict[int, str] = field(default_factory=dict)
    drafts: list[DraftRecord] = field(default_factory=list)
    actions: list[tuple[float, str, int | None]] = field(default_factory=list)

    @property
    def is_group(self) -> bool:
        return self.type in ("group", "supergroup")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.type == "private" and self.user is not None:
            data["first_name"] = self.user.first_name
            if self.user.last_name:
                data["last_name"] = self.user.last_name
            if self.user.username:
                data["username"] = self.user.username
        else:
            data["title"] = self.title
            if self.username:
                data["username"] = self.username
            if self.is_forum:
                data["is_forum"] = True
        return data


@dataclass(eq=False)
class CallRecord:
    """One Bot API call, appended to ``FakeTelegram.calls`` when it was answered.

    ``status`` is the HTTP status sent, or None when the connection was dropped without
    an answer; ``params`` are the decoded parameters (form values stay strings, JSON
    parameters such as ``entities`` are decoded).
    """

    method: str
    params: dict[str, Any]
    chat_id: int | str | None
    t_received: float
    t_responded: float | None = None
    status: int | None = None
    ok: bool = False
    description: str | None = None
    retry_after: int | None = None
    result: Any = None
    fault: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(eq=False)
class WebhookDelivery:
    """One attempt to POST an update to the webhook."""

    t: float
    update_id: int
    url: str
    status: int | None
    error: str | None
    headers: dict[str, str]


@dataclass(eq=False)
class Fault:
    """An injected failure; consumed by each matching call until ``times`` runs out.

    ``start``/``end`` are readings of the fake's clock (``fake.clock()``); None means
    "from now" / "until exhausted". ``times=None`` means unlimited inside the window.
    """

    kind: str
    method: str | None = None
    chat_id: int | None = None
    times: int | None = 1
    start: float | None = None
    end: float | None = None
    retry_after: int = 5
    status: int = 500
    hold: float = 30.0
    description: str | None = None  # for kind "error": the exact description to answer with
    when: Callable[[Mapping[str, Any]], bool] | None = None  # only calls whose params satisfy this
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, chat_id: int | str | None, now: float, params: Mapping[str, Any]) -> bool:
        if self.exhausted:
            return False
        if self.when is not None and not self.when(params):
            return False
        if self.method is not None and self.method.lower() != method.lower():
            return False
        if self.chat_id is not None and str(self.chat_id) != str(chat_id):
            return False
        if self.start is not None and now < self.start:
            return False
        return not (self.end is not None and now >= self.end)


@dataclass(eq=False)
class _Queued:
    update_id: int
    update: dict[str, Any]
    forced: bool = False
    returned: bool = False


@dataclass(eq=False)
class _Webhook:
    url: str
    secret: str | None
    max_connections: int
    generation: int
    last_error_date: int | None = None
    last_error_message: str | None = None


class BotApiError(Exception):
    """An error answer: HTTP status = ``error_code``, with the exact description."""

    def __init__(self, status: int, description: str, *, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error_code": self.status, "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def _bad(message: str) -> BotApiError:
    """400 with the Bot API's casing: first letter lower-cased unless UPPER_SNAKE."""
    if message and not re.fullmatch(r"[A-Z0-9_]+", message):
        message = message[0].lower() + message[1:]
    return BotApiError(400, f"Bad Request: {message}")


def _flood(retry_after: int) -> BotApiError:
    return BotApiError(429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after)


class _Dropped(Exception):
    """Close the connection without an answer."""


# =========================================================================== parameters


def _form_value(value: Any) -> Any:
    """How the real server sees a JSON-body scalar: as the string a form would carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Query string, form, multipart or JSON body -> one dict (form values stay strings)."""
    params: dict[str, Any] = {}
    for key, value in request.query.items():
        params.setdefault(key, value)
    if request.body_exists:
        ctype = request.content_type
        if ctype == "application/json":
            raw = await request.read()
            try:
                data = json.loads(raw) if raw.strip() else {}
            except ValueError:
                raise _bad("can't parse JSON encoded request parameters") from None
            if isinstance(data, dict):
                for key, value in data.items():
                    if value is not None:
                        params[key] = _form_value(value)
        elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            for key, value in form.items():
                params[key] = value if isinstance(value, str) else {"filename": getattr(value, "filename", None)}
        else:
            await request.read()
    for key in _JSON_PARAMS.intersection(params):
        value = params[key]
        if isinstance(value, str) and value[:1] in ("{", "["):
            with contextlib.suppress(ValueError):
                params[key] = json.loads(value)
    return params


def _int_param(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _bool_param(params: Mapping[str, Any], name: str) -> bool:
    return str(params.get(name, "")).strip().lower() in ("true", "1", "yes")


def _chat_id_of(params: Mapping[str, Any]) -> int | str | None:
    value = params.get("chat_id")
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


# =========================================================================== the server


class FakeTelegram:
    """The fake Bot API server plus the test-side API that plays the users.

    See the module docstring for the model. Typical test::

        chat = fake.private_chat(fake.user(id=77, first_name="Ann"))
        fake.user_says(chat, chat.user, "hello")
        await fake.wait_for(lambda: fake.bot_texts(chat.id) == ["hello"])
    """

    _METHODS = (
        "getMe", "getUpdates", "setWebhook", "deleteWebhook", "getWebhookInfo", "sendMessage", "editMessageText",
        "editMessageReplyMarkup", "deleteMessage", "sendChatAction", "sendMessageDraft", "setMyCommands",
        "getMyCommands", "deleteMyCommands", "answerCallbackQuery", "getChat", "getFile", "logOut", "close",
    )  # fmt: skip

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        limits: TelegramLimits | None = None,
        latency: float = 0.0,
        bot_username: str = "parley_bot",
        bot_first_name: str = "Parley",
        clock: Callable[[], float] = time.monotonic,
        privacy_mode: bool = False,
        keep_history: bool = True,
        max_calls: int | None = None,
        require_https: bool = False,
        busy_loop_guard: bool = False,
        webhook_retry: tuple[float, float] = (0.05, 2.0),
        webhook_timeout: float = 10.0,
        callback_answer_deadline: float = 15.0,
    ) -> None:
        """Create a stopped server.

        ``privacy_mode`` makes groups deliver only commands, mentions of the bot and
        replies to it (BotFather's default; off here because most LLM bots disable it).
        ``keep_history=False`` (benchmarks) keeps counts, current texts and edit
        timestamps but not every version's text or call parameters. ``max_calls`` bounds
        ``calls`` to roughly the newest N records. ``callback_answer_deadline``: seconds
        (of ``clock``) within which a callback query can be answered; may be changed later.
        """
        self.token = token
        self.clock = clock
        self.latency = float(latency)
        self.privacy_mode = privacy_mode
        self.keep_history = keep_history
        self.max_calls = max_calls
        self.require_https = require_https
        self.busy_loop_guard = busy_loop_guard
        self.webhook_retry = webhook_retry
        self.webhook_timeout = webhook_timeout
        self.callback_answer_deadline = callback_answer_deadline
        self._limits = limits or TelegramLimits()
        self.flood = FloodControl(self._limits, clock)
        bot_id = int(token.split(":", 1)[0]) if _TOKEN_SHAPE.fullmatch(token) else 123456
        self.bot_user: dict[str, Any] = {
            "id": bot_id,
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
        }
        self._canonical = {name.lower(): name for name in self._METHODS}
        self._handlers: dict[str, Callable[[dict[str, Any], CallRecord], Any]] = {
            "getme": self._get_me,
            "getupdates": self._get_updates,
            "setwebhook": self._set_webhook,
            "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info,
            "sendmessage": self._send_message,
            "editmessagetext": self._edit_message_text,
            "editmessagereplymarkup": self._edit_message_reply_markup,
            "deletemessage": self._delete_message,
            "sendchataction": self._send_chat_action,
            "sendmessagedraft": self._send_message_draft,
            "setmycommands": self._set_my_commands,
            "getmycommands": self._get_my_commands,
            "deletemycommands": self._delete_my_commands,
            "answercallbackquery": self._answer_callback_query,
            "getchat": self._get_chat,
            "getfile": self._get_file,
            "logout": self._log_out,
            "close": self._log_out,
        }
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._port = 0
        self._host = "127.0.0.1"
        self._change = asyncio.Event()
        self._updates_event = asyncio.Event()
        self._closing = asyncio.Event()
        self._webhook_task: asyncio.Task[None] | None = None
        self._update_ids = itertools.count(1)  # survives reset(): a polling bot's offset stays valid
        self._file_numbers = itertools.count(1)  # survive reset() too: a file id is never reused
        self._media_group_numbers = itertools.count(13_579_246_801_357_924)
        self._init_state()

    def _init_state(self) -> None:
        """Everything ``reset()`` forgets (configuration survives)."""
        self.calls: list[CallRecord] = []
        self.webhook_deliveries: list[WebhookDelivery] = []
        self.callback_answers: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = getattr(self, "files", {})
        self.media_files: dict[str, FakeFile] = {}  # by file_id: what people sent
        self._media_paths: dict[str, FakeFile] = {}  # the same, by file_path
        self._users: dict[int, FakeUser] = {}
        self._chats: dict[int, FakeChat] = {}
        self._next_group_id = itertools.count(1)
        self._pending: list[_Queued] = []
        self._all_updates: dict[int, dict[str, Any]] = {}
        self._allowed_updates: frozenset[str] = frozenset(UPDATE_TYPES) - _OPT_IN_UPDATES
        self._poll_token: object | None = None
        self._prev_poll: tuple[int, float] | None = None
        self._webhook: _Webhook | None = None
        self._webhook_generation = 0
        self._next_set_webhook = 0.0
        self._commands: dict[tuple[str, str], list[dict[str, str]]] = {}
        self._callbacks: dict[str, dict[str, Any]] = {}
        self._callback_ids = itertools.count(1)
        self._faults: list[Fault] = []
        self._calls_by_method: Counter[str] = Counter()
        self._status_by_method: Counter[tuple[str, int | None]] = Counter()
        self._flood_hits: Counter[tuple[str, int | str | None]] = Counter()
        self._in_flight = 0
        self._waiting_polls = 0
        self.flood.reset()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeTelegram:
        """Listen on ``host:port`` (port 0 = a free port); returns self."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._route)
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host = host
        self._port = self._runner.addresses[0][1]
        self._session = ClientSession(timeout=ClientTimeout(total=self.webhook_timeout))
        log.info("fake Telegram listening on %s", self.url)
        return self

    async def stop(self) -> None:
        """Stop serving: ends long polls and held requests, stops webhook delivery."""
        self._closing.set()
        self._notify(updates=True)
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._webhook_task
            self._webhook_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget chats, messages, updates, calls, faults and flood state; keep config."""
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            self._webhook_task = None
        self._init_state()
        self._notify(updates=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self._port}"

    @property
    def base_url(self) -> str:
        """What PTB's ``base_url`` takes (PTB appends the token)."""
        return f"{self.url}/bot"

    @property
    def base_file_url(self) -> str:
        """What PTB's ``base_file_url`` takes."""
        return f"{self.url}/file/bot"

    @property
    def limits(self) -> TelegramLimits:
        return self._limits

    @limits.setter
    def limits(self, value: TelegramLimits) -> None:
        """Swap the limits (the flood state starts fresh)."""
        self._limits = value
        self.flood = FloodControl(value, self.clock)

    # ------------------------------------------------------------------ waiting

    def _notify(self, *, updates: bool = False) -> None:
        event, self._change = self._change, asyncio.Event()
        event.set()
        if updates:
            event, self._updates_event = self._updates_event, asyncio.Event()
            event.set()

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0, *, what: str | None = None) -> T:
        """Wait until ``predicate()`` is truthy, re-checking on every state change
        (any call answered, update queued or consumed, webhook delivery); return its value.

        Raises TimeoutError naming the condition and summarising the fake's state.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._change
            value = predicate()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                name = what or getattr(predicate, "__name__", repr(predicate))
                raise TimeoutError(f"FakeTelegram.wait_for: {name} not true after {timeout}s; {self.describe()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def describe(self) -> str:
        """A short summary of the state, for failure messages."""
        chats = {cid: len(c.messages) for cid, c in self._chats.items() if c.messages}
        last = [
            f"{c.method}({c.chat_id})->{c.status}{'' if c.ok else ' ' + str(c.description)}" for c in self.calls[-6:]
        ]
        return (
            f"messages per chat={chats}; pending updates={[q.update_id for q in self._pending]}; "
            f"webhook={self._webhook.url if self._webhook else None}; last calls={last}"
        )

    async def _pause(self, seconds: float) -> None:
        """Sleep, but end early when the server stops."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    # ------------------------------------------------------------------ users and chats

    def user(
        self,
        id: int | None = None,  # noqa: A002 - Telegram's field name
        first_name: str = "User",
        *,
        last_name: str | None = None,
        username: str | None = None,
        language_code: str | None = None,
    ) -> FakeUser:
        """Create (or return the existing) user with this id."""
        if id is None:
            id = 1000 + len(self._users) + 1  # noqa: A001
            while id in self._users:
                id += 1  # noqa: A001
        existing = self._users.get(id)
        if existing is not None:
            return existing
        user = FakeUser(id, first_name, last_name, username, language_code)
        self._users[id] = user
        return user

    def private_chat(self, user: FakeUser | int) -> FakeChat:
        """The private chat between ``user`` and the bot (its id is the user's id)."""
        user = self._as_user(user)
        chat = self._chats.get(user.id)
        if chat is None:
            chat = self._chats[user.id] = FakeChat(user.id, "private", user=user)
        return chat

    def group(self, title: str = "Group", *, id: int | None = None) -> FakeChat:  # noqa: A002
        """A basic group (negative id)."""
        chat_id = id if id is not None else -(4000000000 + next(self._next_group_id))
        return self._chats.setdefault(chat_id, FakeChat(chat_id, "group", title=title))

    def supergroup(
        self,
        title: str = "Supergroup",
        *,
        forum: bool = False,
        username: str | None = None,
        id: int | None = None,  # noqa: A002
    ) -> FakeChat:
        """A supergroup (id -100...); ``forum=True`` enables topics (see ``topic``)."""
        chat_id = id if id is not None else -(1000000000000 + next(self._next_group_id))
        return self._chats.setdefault(
            chat_id, FakeChat(chat_id, "supergroup", title=title, username=username, is_forum=forum)
        )

    def topic(self, chat: FakeChat | int, name: str = "Topic", *, creator: FakeUser | int | None = None) -> int:
        """Create a forum topic; returns its ``message_thread_id``.

        Like Telegram, the topic is a service message (``forum_topic_created``) whose id
        is the thread id; messages in the topic reply to it unless they reply to another
        message. The service message is not delivered to the bot.
        """
        chat = self._as_chat(chat)
        if not chat.is_forum:
            raise ValueError(f"chat {chat.id} is not a forum supergroup")
        thread_id = self._next_message_id(chat)
        author = self._as_user(creator) if creator is not None else None
        service = {
            "forum_topic_created": {"name": name, "icon_color": 7322096},
        }
        chat.topics[thread_id] = name
        chat.messages[thread_id] = SeenMessage(
            chat.id, thread_id, False, author.to_dict() if author else None, "", [], thread_id, None,
            self.clock(), int(time.time()), service=service,
        )  # fmt: skip
        return thread_id

    def chat(self, chat_id: int) -> FakeChat:
        """The chat with this id (KeyError if unknown)."""
        return self._chats[chat_id]

    def ensure_chat(self, chat_id: int, *, type: str | None = None, title: str | None = None) -> FakeChat:  # noqa: A002
        """The chat with this id, created if needed (positive id = private chat)."""
        chat = self._chats.get(chat_id)
        if chat is not None:
            return chat
        if chat_id > 0:
            return self.private_chat(self.user(chat_id, f"User{chat_id}"))
        if (type or ("supergroup" if chat_id <= -1000000000000 else "group")) == "supergroup":
            return self.supergroup(title or f"Supergroup {chat_id}", id=chat_id)
        return self.group(title or f"Group {chat_id}", id=chat_id)

    def _as_user(self, user: FakeUser | int | Mapping[str, Any]) -> FakeUser:
        if isinstance(user, FakeUser):
            self._users.setdefault(user.id, user)
            return user
        if isinstance(user, Mapping):
            return self.user(
                int(user["id"]),
                user.get("first_name", f"User{user['id']}"),
                last_name=user.get("last_name"),
                username=user.get("username"),
                language_code=user.get("language_code"),
            )
        return self._users.get(int(user)) or self.user(int(user), f"User{user}")

    def _as_chat(self, chat: FakeChat | int) -> FakeChat:
        if isinstance(chat, FakeChat):
            return self._chats.setdefault(chat.id, chat)
        found = self._chats.get(int(chat))
        if found is None:
            raise KeyError(f"unknown chat {chat}; create it with private_chat(), group() or supergroup()")
        return found

    def _next_message_id(self, chat: FakeChat) -> int:
        message_id = chat.next_message_id
        chat.next_message_id += 1
        return message_id

    def _find_user(self, user_id: int) -> dict[str, Any] | None:
        user = self._users.get(user_id)
        return user.to_dict() if user is not None else None

    # ------------------------------------------------------------------ the user's side

    def user_says(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        text: str,
        *,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person writes ``text``; returns the Message dict (as PTB will see it).

        The Update is queued for getUpdates or posted to the webhook. Entities are
        generated like Telegram does (``bot_command``, ``mention``, ``url``, ``hashtag``,
        ...). ``reply_to`` is the id of any message in the chat; ``thread`` a forum topic.
        """
        return self._user_message(chat, user, text, reply_to=reply_to, thread=thread)

    def _user_message(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        text: str,
        *,
        reply_to: int | None = None,
        thread: int | None = None,
        media: dict[str, Any] | None = None,
        media_group_id: str | None = None,
    ) -> dict[str, Any]:
        """A person's message: text, or media with ``text`` as its caption."""
        chat = self._as_chat(chat)
        sender = self._as_user(user) if user is not None else (chat.user if chat.type == "private" else None)
        if chat.type == "private" and sender is not None and sender.id != chat.id:
            raise ValueError(f"user {sender.id} cannot write in the private chat of {chat.id}")
        if thread is not None and not chat.is_forum:
            raise ValueError(f"chat {chat.id} has no topics; use supergroup(forum=True) and topic()")
        if thread is not None and thread not in chat.topics:
            raise ValueError(f"chat {chat.id} has no topic {thread}")
        if media is not None and len(text) > self._limits.max_caption_length:
            raise ValueError(f"a caption holds at most {self._limits.max_caption_length} characters")
        target = None
        if reply_to is not None:
            target = chat.messages.get(reply_to)
            if target is None or target.deleted:
                raise ValueError(f"chat {chat.id} has no message {reply_to} to reply to")
            if thread is None:
                thread = target.thread_id
        message = SeenMessage(
            chat.id,
            self._next_message_id(chat),
            False,
            sender.to_dict() if sender is not None else None,
            text,
            find_entities(text),
            thread,
            reply_to,
            self.clock(),
            int(time.time()),
            media=media,
            media_group_id=media_group_id,
        )
        message.edits.append((message.created_at, text, message.entities))
        chat.messages[message.message_id] = message
        payload = self._message_json(message)
        if self._delivered_to_bot(chat, message, target):
            self._enqueue("message", payload)
        else:
            self._notify()
        return payload

    # ------------------------------------------------------------------ the user's media

    # Telegram's file ids start with a type marker; these are the ones bots see [obs in the wild].
    _FILE_ID_PREFIX = {
        "photo": "AgACAgIAAxkBAAI", "document": "BQACAgIAAxkBAAI", "voice": "AwACAgIAAxkBAAI",
        "audio": "CQACAgIAAxkBAAI", "video": "BAACAgIAAxkBAAI", "video_note": "DQACAgIAAxkBAAI",
        "sticker": "CAACAgIAAxkBAAI", "animation": "CgACAgIAAxkBAAI",
    }  # fmt: skip
    _FILE_DIR = {
        "photo": "photos", "document": "documents", "voice": "voice", "audio": "music", "video": "videos",
        "video_note": "video_notes", "sticker": "stickers", "animation": "animations",
    }  # fmt: skip
    _FILE_ID_SHAPE = re.compile(r"[A-Za-z0-9_\-]{20,}")

    def add_media_file(
        self, kind: str, data: bytes | None = None, *, size: int | None = None, suffix: str = ""
    ) -> FakeFile:
        """Keep a file as Telegram would for something a person sent; returns it.

        ``kind`` is the message field it belongs to ("photo", "document", ...; it shapes
        the file id and path). ``data`` None serves ``size`` filler bytes; a ``size``
        given with ``data`` is what Telegram *reports* (to play a lying server).
        """
        if data is None and size is None:
            raise ValueError("give the file's data, or its size")
        number = next(self._file_numbers)
        token = base64.urlsafe_b64encode(hashlib.sha256(f"{kind}:{number}".encode()).digest()).decode().rstrip("=")
        file = FakeFile(
            file_id=self._FILE_ID_PREFIX.get(kind, "BQACAgIAAxkBAAI") + token[:32],
            file_unique_id="AQAD" + token[32:44],
            file_path=f"{self._FILE_DIR.get(kind, 'documents')}/file_{number}{suffix}",
            size=size if size is not None else len(data or b""),
            data=data,
        )
        self.media_files[file.file_id] = file
        self._media_paths[file.file_path] = file
        return file

    def file(self, file_id: str) -> FakeFile:
        """The file a ``file_id`` (from a message the fake made) stands for."""
        return self.media_files[file_id]

    def expire_file(self, file_id: str) -> None:
        """The file is gone (deleted, or too old): getFile refuses it, its path answers 404."""
        self.media_files[file_id].available = False

    def new_media_group_id(self) -> str:
        """A fresh ``media_group_id`` (a numeric string, as Telegram's are)."""
        return str(next(self._media_group_numbers))

    @staticmethod
    def _file_json(file: FakeFile) -> dict[str, Any]:
        return {"file_id": file.file_id, "file_unique_id": file.file_unique_id, "file_size": file.size}

    def _send_media(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        field_name: str,
        value: Any,
        caption: str | None,
        *,
        reply_to: int | None,
        thread: int | None,
        media_group_id: str | None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        media = {field_name: value, **(extra or {})}
        return self._user_message(
            chat, user, caption or "", reply_to=reply_to, thread=thread, media=media, media_group_id=media_group_id
        )

    def user_sends_photo(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        size: int | None = None,
        caption: str | None = None,
        width: int = 1280,
        height: int = 960,
        media_group_id: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a photo: ``photo`` lists three sizes, ``data`` being the largest.

        The smaller sizes (90 and 320 px wide, as Telegram's "s" and "m" thumbnails) are
        files of their own with filler bytes. Returns the Message dict.
        """
        sizes = []
        largest = size if size is not None else len(data or b"")
        for scale, ratio in ((90, 40), (320, 8)):
            thumb = self.add_media_file("photo", None, size=max(1, largest // ratio), suffix=".jpg")
            sizes.append({**self._file_json(thumb), "width": scale, "height": max(1, height * scale // width)})
        main = self.add_media_file("photo", data, size=size, suffix=".jpg")
        sizes.append({**self._file_json(main), "width": width, "height": height})
        return self._send_media(chat, user, "photo", sizes, caption, reply_to=reply_to, thread=thread,
                                media_group_id=media_group_id)

    def user_sends_document(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        file_name: str | None = "file.bin",
        mime_type: str | None = None,
        size: int | None = None,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a file (``document``: any type, with its name and MIME type)."""
        suffix = file_name[file_name.rfind(".") :] if file_name and "." in file_name else ""
        file = self.add_media_file("document", data, size=size, suffix=suffix)
        document = self._file_json(file)
        if file_name is not None:
            document["file_name"] = file_name
        if mime_type is not None:
            document["mime_type"] = mime_type
        return self._send_media(chat, user, "document", document, caption, reply_to=reply_to, thread=thread,
                                media_group_id=media_group_id)

    def user_sends_voice(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        duration: int = 3,
        mime_type: str = "audio/ogg",
        size: int | None = None,
        caption: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person records a voice note (``voice``: OGG/Opus, with its duration in seconds)."""
        file = self.add_media_file("voice", data, size=size, suffix=".oga")
        voice = {**self._file_json(file), "duration": duration, "mime_type": mime_type}
        return self._send_media(chat, user, "voice", voice, caption, reply_to=reply_to, thread=thread,
                                media_group_id=None)

    def user_sends_audio(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        duration: int = 180,
        file_name: str | None = "song.mp3",
        mime_type: str | None = "audio/mpeg",
        performer: str | None = None,
        title: str | None = None,
        size: int | None = None,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a music file (``audio``: shown in the player, with its duration)."""
        file = self.add_media_file("audio", data, size=size, suffix=".mp3")
        audio: dict[str, Any] = {**self._file_json(file), "duration": duration}
        for key, value in (("file_name", file_name), ("mime_type", mime_type), ("performer", performer),
                           ("title", title)):
            if value is not None:
                audio[key] = value
        return self._send_media(chat, user, "audio", audio, caption, reply_to=reply_to, thread=thread,
                                media_group_id=media_group_id)

    def user_sends_video_note(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        duration: int = 5,
        length: int = 384,
        size: int | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person records a round video message (``video_note``; it has no caption)."""
        file = self.add_media_file("video_note", data, size=size, suffix=".mp4")
        note = {**self._file_json(file), "length": length, "duration": duration}
        return self._send_media(chat, user, "video_note", note, None, reply_to=reply_to, thread=thread,
                                media_group_id=None)

    def user_sends_video(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        duration: int = 10,
        width: int = 1280,
        height: int = 720,
        file_name: str | None = None,
        mime_type: str = "video/mp4",
        size: int | None = None,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a video (``video``)."""
        file = self.add_media_file("video", data, size=size, suffix=".mp4")
        video: dict[str, Any] = {**self._file_json(file), "width": width, "height": height, "duration": duration,
                                 "mime_type": mime_type}
        if file_name is not None:
            video["file_name"] = file_name
        return self._send_media(chat, user, "video", video, caption, reply_to=reply_to, thread=thread,
                                media_group_id=media_group_id)

    def user_sends_animation(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        duration: int = 2,
        size: int | None = None,
        caption: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a GIF: ``animation``, and -- "for backward compatibility, when
        this field is set, the document field will also be set" [doc Message] -- ``document``."""
        file = self.add_media_file("animation", data, size=size, suffix=".mp4")
        described = {**self._file_json(file), "file_name": "animation.gif.mp4", "mime_type": "video/mp4"}
        animation = {**described, "width": 320, "height": 240, "duration": duration}
        return self._send_media(chat, user, "animation", animation, caption, reply_to=reply_to, thread=thread,
                                media_group_id=None, extra={"document": described})

    def user_sends_sticker(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        data: bytes | None = None,
        *,
        emoji: str | None = "👍",
        set_name: str | None = "FakeStickers",
        sticker_format: str = "static",
        size: int | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a sticker (``sticker``; ``sticker_format`` "static" (WEBP),
        "animated" (TGS) or "video" (WEBM); stickers have no caption)."""
        suffix = {"static": ".webp", "animated": ".tgs", "video": ".webm"}[sticker_format]
        file = self.add_media_file("sticker", data, size=size if size is not None else (None if data else 2048),
                                   suffix=suffix)
        sticker: dict[str, Any] = {
            **self._file_json(file), "type": "regular", "width": 512, "height": 512,
            "is_animated": sticker_format == "animated", "is_video": sticker_format == "video",
        }  # fmt: skip
        if emoji is not None:
            sticker["emoji"] = emoji
        if set_name is not None:
            sticker["set_name"] = set_name
        return self._send_media(chat, user, "sticker", sticker, None, reply_to=reply_to, thread=thread,
                                media_group_id=None)

    def user_sends_album(
        self,
        chat: FakeChat | int,
        user: FakeUser | int | Mapping[str, Any] | None,
        photos: Iterable[bytes],
        *,
        caption: str | None = None,
        reply_to: int | None = None,
        thread: int | None = None,
    ) -> list[dict[str, Any]]:
        """A person sends several photos at once: one message per photo sharing a
        ``media_group_id``, the caption on the first (as Telegram's apps send albums)."""
        group = self.new_media_group_id()
        messages = []
        for i, data in enumerate(photos):
            messages.append(
                self.user_sends_photo(chat, user, data, caption=caption if i == 0 else None, media_group_id=group,
                                      reply_to=reply_to, thread=thread)
            )
        if len(messages) < 2:
            raise ValueError("an album holds 2 to 10 items")
        return messages

    def user_edits(self, chat: FakeChat | int, message_id: int, text: str) -> dict[str, Any]:
        """The author edits their message (or a media message's caption); queues an
        ``edited_message`` update."""
        chat = self._as_chat(chat)
        message = chat.messages.get(message_id)
        if message is None or message.deleted or message.from_bot:
            raise ValueError(f"no user message {message_id} in chat {chat.id}")
        message.text = text
        message.entities = find_entities(text)
        message.edit_date = int(time.time())
        message.edits.append((self.clock(), text, message.entities))
        payload = self._message_json(message)
        self._enqueue("edited_message", payload)
        return payload

    def user_deletes(self, chat: FakeChat | int, message_id: int) -> None:
        """Someone deletes a message (e.g. the bot's live reply mid-stream).

        Telegram sends bots no update for deletions; later edits of the message fail with
        "message to edit not found".
        """
        chat = self._as_chat(chat)
        message = chat.messages.get(message_id)
        if message is None or message.deleted:
            raise ValueError(f"no message {message_id} in chat {chat.id}")
        message.deleted = True
        message.deleted_at = self.clock()
        message.deleted_by = "user"
        self._notify()

    def user_presses(
        self,
        chat: FakeChat | int,
        user: FakeUser | int,
        message_id: int,
        data: str | None,
        *,
        stale: bool = False,
        inaccessible: bool = False,
    ) -> str:
        """A person presses the inline button with ``callback_data=data`` under a message;
        queues a ``callback_query`` update (getUpdates or webhook) and returns its id, to
        look its answer up in ``callback_answers``.

        The message must show that button now (a ValueError says what it shows), unless
        ``stale``: the person's app still showed a button the bot just edited away -- the
        query then carries the message as it is now. ``data=None`` is a button without
        ``callback_data`` (a game). ``inaccessible`` delivers the message as Telegram does
        once it is too old for the bot (Bot API 7.0 ``InaccessibleMessage``: chat,
        message_id and ``date`` 0 only).
        """
        chat = self._as_chat(chat)
        sender = self._as_user(user)
        if chat.type == "private" and sender.id != chat.id:
            raise ValueError(f"user {sender.id} cannot press buttons in the private chat of {chat.id}")
        message = chat.messages.get(message_id)
        if message is None or message.deleted:
            raise ValueError(f"no message {message_id} in chat {chat.id}")
        if not stale and (data is None or data not in [d for _, d in message.buttons]):
            raise ValueError(
                f"message {message_id} in chat {chat.id} shows no button with callback_data={data!r}; "
                f"it shows {message.buttons}"
            )
        query_id = f"{sender.id}{next(self._callback_ids):06d}"
        query: dict[str, Any] = {
            "id": query_id,
            "from": sender.to_dict(),
            "chat_instance": str(abs(chat.id) * 7919 % 10**12),
        }
        if inaccessible:
            query["message"] = {"chat": chat.to_dict(), "message_id": message.message_id, "date": 0}
        else:
            query["message"] = self._message_json(message)
        if data is not None:
            query["data"] = data
        else:
            query["game_short_name"] = "game"
        return self._enqueue_query(query)

    def user_presses_inline(
        self, user: FakeUser | int, data: str, *, inline_message_id: str = "AgAAAFakeInline"
    ) -> str:
        """A person presses a button under a message sent in inline mode (no ``message``,
        an ``inline_message_id`` instead); returns the query id."""
        sender = self._as_user(user)
        query_id = f"{sender.id}{next(self._callback_ids):06d}"
        query = {
            "id": query_id,
            "from": sender.to_dict(),
            "chat_instance": str(sender.id * 7919 % 10**12),
            "inline_message_id": inline_message_id,
            "data": data,
        }
        return self._enqueue_query(query)

    def user_clicks(
        self, chat: FakeChat | int, user: FakeUser | int, message_id: int, data: str
    ) -> dict[str, Any]:
        """``user_presses``, returning the whole CallbackQuery dict (as the Discord fake's
        ``user_clicks`` returns its interaction)."""
        query_id = self.user_presses(chat, user, message_id, data)
        return self._callbacks[query_id]["query"]

    def _enqueue_query(self, query: dict[str, Any]) -> str:
        self._callbacks[query["id"]] = {"answered": False, "t": self.clock(), "query": query}
        self._enqueue("callback_query", query)
        return str(query["id"])

    def user_blocks_bot(self, user: FakeUser | int, blocked: bool = True) -> None:
        """The user blocks (or unblocks) the bot: sends to their chat fail with 403."""
        self.private_chat(user).blocked = blocked

    def push_update(self, update: Mapping[str, Any]) -> int:
        """Queue an arbitrary Update (``update_id`` assigned if missing); returns its id."""
        update = dict(update)
        payload_types = [key for key in update if key != "update_id"]
        if len(payload_types) != 1:
            raise ValueError("an Update carries exactly one payload")
        if "update_id" in update:
            update_id = int(update["update_id"])
            self._queue(_Queued(update_id, update))
            return update_id
        return self._enqueue(payload_types[0], update[payload_types[0]])

    def redeliver(self, update_id: int) -> None:
        """Deliver an update the bot already received once more, with the same
        ``update_id`` (as after a crash before the offset was confirmed, or a lost webhook
        answer). parley must not answer it twice."""
        update = self._all_updates.get(update_id)
        if update is None:
            raise KeyError(f"unknown update {update_id}")
        if not any(q.update_id == update_id for q in self._pending):
            self._queue(_Queued(update_id, update, forced=True))

    @property
    def in_flight(self) -> int:
        """Bot API calls received but not answered yet (long polls included)."""
        return self._in_flight

    @property
    def waiting_polls(self) -> int:
        """How many getUpdates long polls are waiting for an update right now."""
        return self._waiting_polls

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        """Updates not yet confirmed by the bot (oldest first)."""
        return [q.update for q in self._pending]

    def _delivered_to_bot(self, chat: FakeChat, message: SeenMessage, target: SeenMessage | None) -> bool:
        """Privacy mode: in groups only commands, mentions and replies to the bot arrive."""
        if not self.privacy_mode or not chat.is_group:
            return True
        if target is not None and target.from_bot:
            return True
        mention = f"@{self.bot_user['username']}".lower()
        for entity in message.entities:
            if entity["type"] == "bot_command":
                return True
            if entity["type"] == "mention" and mention in message.text.lower():
                return True
        return False

    def _enqueue(self, kind: str, payload: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        while update_id in self._all_updates:
            update_id = next(self._update_ids)
        update = {"update_id": update_id, kind: payload}
        if kind not in self._allowed_updates:
            self._all_updates[update_id] = update
            self._notify()
            return update_id
        self._queue(_Queued(update_id, update))
        return update_id

    def _queue(self, queued: _Queued) -> None:
        self._all_updates[queued.update_id] = queued.update
        position = len(self._pending)
        while position and self._pending[position - 1].update_id > queued.update_id:
            position -= 1
        self._pending.insert(position, queued)
        self._notify(updates=True)

    # ------------------------------------------------------------------ what the person sees

    def messages(self, chat_id: int) -> list[SeenMessage]:
        """Every message of the chat in order, deleted ones included (``deleted=True``)."""
        chat = self._chats.get(chat_id)
        if chat is None:
            return []
        return [m for m in chat.messages.values() if m.service is None]

    def message(self, chat_id: int, message_id: int) -> SeenMessage:
        return self._chats[chat_id].messages[message_id]

    def buttons(self, chat_id: int, message_id: int) -> list[tuple[str, str | None]]:
        """The buttons under a message now, as ``(label, callback_data)`` (empty: none;
        ``message(...).button_rows`` keeps the rows)."""
        return self.message(chat_id, message_id).buttons

    def bot_texts(self, chat_id: int) -> list[str]:
        """Current text of the bot's visible (not deleted) messages, in order."""
        chat = self._chats.get(chat_id)
        if chat is None:
            return []
        return [m.text for m in chat.messages.values() if m.from_bot and not m.deleted]

    def current_draft(self, chat_id: int, thread_id: int | None = None) -> str | None:
        """The draft text the person sees now (``""`` = the "Thinking..." placeholder),
        or None: no draft, expired (``draft_ttl`` after its last update), or replaced by a
        message the bot sent to the same chat and thread since."""
        chat = self._chats.get(chat_id)
        if chat is None:
            return None
        last = next((d for d in reversed(chat.drafts) if d.thread_id == thread_id), None)
        if last is None or self.clock() >= last.t + self._limits.draft_ttl:
            return None
        for message in reversed(chat.messages.values()):
            if message.message_id < last.next_message_id:
                break
            if message.from_bot and message.thread_id == thread_id:
                return None
        return last.text

    def drafts(self, chat_id: int) -> list[DraftRecord]:
        """Every draft update the chat received, in order."""
        chat = self._chats.get(chat_id)
        return list(chat.drafts) if chat is not None else []

    def chat_actions(self, chat_id: int) -> list[tuple[float, str, int | None]]:
        """``(t, action, thread_id)`` for every accepted sendChatAction."""
        chat = self._chats.get(chat_id)
        return list(chat.actions) if chat is not None else []

    def count_429(self, method: str | None = None, chat_id: int | str | None = None) -> int:
        """How many calls were answered 429 (filtered by method and/or chat)."""
        return sum(
            n
            for (m, c), n in self._flood_hits.items()
            if (method is None or m.lower() == method.lower()) and (chat_id is None or str(c) == str(chat_id))
        )

    def calls_to(self, method: str, *, chat_id: int | str | None = None) -> list[CallRecord]:
        """The answered calls of one method (case-insensitive), optionally for one chat."""
        lower = method.lower()
        return [
            c for c in self.calls
            if c.method.lower() == lower and (chat_id is None or str(c.chat_id) == str(chat_id))
        ]  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks: calls per method, statuses, 429s, messages, edits."""
        messages = edits = 0
        for chat in self._chats.values():
            for message in chat.messages.values():
                if message.from_bot:
                    messages += 1
                    edits += message.edit_count
        return {
            "calls": dict(self._calls_by_method),
            "total_calls": sum(self._calls_by_method.values()),
            "statuses": {f"{m} {s}": n for (m, s), n in self._status_by_method.items()},
            "429": self.count_429(),
            "429_by_method": {m: self.count_429(m) for m in {m for m, _ in self._flood_hits}},
            "bot_messages": messages,
            "bot_edits": edits,
            "pending_updates": len(self._pending),
            "in_flight": self._in_flight,
        }

    def add_file(self, file_path: str, data: bytes) -> None:
        """Serve ``data`` at ``/file/bot<token>/<file_path>``."""
        self.files[file_path] = data

    # ------------------------------------------------------------------ faults

    def inject(
        self,
        kind: str,
        *,
        method: str | None = None,
        chat_id: int | None = None,
        times: int | None = 1,
        start: float | None = None,
        end: float | None = None,
        retry_after: int | None = None,
        status: int = 500,
        hold: float = 30.0,
        description: str | None = None,
        when: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> Fault:
        """Make matching calls fail.

        ``kind``: ``"5xx"`` (error envelope with ``status``), ``"error"`` (any error
        envelope: ``status`` and the exact ``description``, e.g. a 400 "Bad Request: can't
        parse entities: ..." that the real server gives for markup it rejects), ``"timeout"`` (hold the
        request ``hold`` seconds -- longer than PTB's 5 s read timeout -- then drop it,
        unapplied), ``"timeout_after_apply"``, ``"drop"`` (close without answering,
        unapplied), ``"drop_after_apply"`` (applied, then dropped), ``"429"`` (flood
        answer with ``retry_after``, default 5). A storm is ``times=N`` or a window
        ``start``/``end`` on the fake's clock with ``times=None``. ``when`` narrows the
        fault to calls whose decoded params satisfy it (e.g. only edits carrying entities).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        fault = Fault(
            kind, method, chat_id, times, start, end, retry_after if retry_after is not None else 5, status, hold,
            description, when,
        )
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self._faults.clear()

    def _take_fault(self, method: str, chat_id: int | str | None, params: Mapping[str, Any]) -> Fault | None:
        now = self.clock()
        for fault in self._faults:
            if fault.matches(method, chat_id, now, params):
                fault.hits += 1
                return fault
        return None

    # ------------------------------------------------------------------ HTTP

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        match = re.fullmatch(r"/bot([^/]*)/(?:test/)?([^/]+)/?", path)
        if match is not None:
            return await self._handle_bot(request, match.group(1), match.group(2))
        match = re.fullmatch(r"/file/bot([^/]*)/(.+)", path)
        if match is not None:
            return await self._handle_file(request, match.group(1), match.group(2))
        if path.startswith("/_fake/"):
            return await self._handle_control(request, path[len("/_fake/") :])
        return self._envelope(BotApiError(404, "Not Found").envelope(), 404)

    @staticmethod
    def _envelope(body: Any, status: int = 200, retry_after: int | None = None) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return web.Response(
            body=json.dumps(body, ensure_ascii=False).encode(),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    def _check_token(self, token: str) -> None:
        if token == self.token:
            return
        if not _TOKEN_SHAPE.fullmatch(token):
            raise BotApiError(401, "Unauthorized: invalid token specified")
        raise BotApiError(401, "Unauthorized")

    async def _handle_bot(self, request: web.Request, token: str, method: str) -> web.StreamResponse:
        lower = method.lower()
        canonical = self._canonical.get(lower, method)
        record = CallRecord(canonical, {}, None, self.clock())
        self._in_flight += 1
        response: web.StreamResponse | None = None
        try:
            try:
                params = await _read_params(request)
                self._notify()  # a call arrived (in_flight changed)
                record.chat_id = _chat_id_of(params)
                record.params = params if self.keep_history else {
                    k: v for k, v in params.items() if k in ("chat_id", "message_id", "draft_id")
                }  # fmt: skip
                if self.latency > 0:
                    await self._pause(self.latency)
                self._check_token(token)
                handler = self._handlers.get(lower)
                if handler is None:
                    raise BotApiError(404, "Not Found: method not found")
                fault = self._take_fault(lower, record.chat_id, params)
                if fault is not None:
                    record.fault = fault.kind
                    result = await self._apply_fault(fault, handler, params, record)
                else:
                    result = await self._run(handler, params, record)
                body: dict[str, Any] = {"ok": True, "result": result}
                if isinstance(result, _Described):
                    body = {"ok": True, "result": result.value, "description": result.description}
                    result = result.value
                record.status, record.ok = 200, True
                record.result = result if self.keep_history else None
                response = self._envelope(body)
            except BotApiError as error:
                record.status, record.ok, record.description = error.status, False, error.description
                record.retry_after = error.retry_after
                if error.status == 429:
                    self._flood_hits[(canonical, record.chat_id)] += 1
                response = self._envelope(error.envelope(), error.status, error.retry_after)
            except _Dropped:
                record.status, record.ok, record.description = None, False, "connection dropped without an answer"
                if request.transport is not None:
                    request.transport.abort()
                response = web.Response(status=500)
            except Exception as exc:  # a bug in the fake: answer like a server error, keep the trace
                log.exception("fake Telegram failed on %s", canonical)
                record.status, record.ok, record.description = 500, False, f"fake Telegram bug: {exc!r}"
                response = self._envelope(BotApiError(500, "Internal Server Error").envelope(), 500)
            return response
        finally:
            self._in_flight -= 1
            record.t_responded = self.clock()
            self._record(record)
            log.debug(
                "%s chat=%s -> %s %s", record.method, record.chat_id, record.status, record.description or ""
            )

    async def _run(self, handler: Callable[..., Any], params: dict[str, Any], record: CallRecord) -> Any:
        result = handler(params, record)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def _apply_fault(
        self, fault: Fault, handler: Callable[..., Any], params: dict[str, Any], record: CallRecord
    ) -> Any:
        if fault.kind == "5xx":
            raise BotApiError(fault.status, _STATUS_TEXT.get(fault.status, "Internal Server Error"))
        if fault.kind == "error":
            raise BotApiError(fault.status, fault.description or _STATUS_TEXT.get(fault.status, "Bad Request"))
        if fault.kind == "429":
            raise _flood(fault.retry_after)
        if fault.kind == "drop":
            raise _Dropped
        if fault.kind == "timeout":
            await self._pause(fault.hold)
            raise _Dropped
        with contextlib.suppress(BotApiError):
            await self._run(handler, params, record)
        if fault.kind == "timeout_after_apply":
            await self._pause(fault.hold)
        raise _Dropped

    def _record(self, record: CallRecord) -> None:
        self.calls.append(record)
        if self.max_calls is not None and len(self.calls) > 2 * self.max_calls:
            del self.calls[: len(self.calls) - self.max_calls]
        self._calls_by_method[record.method] += 1
        self._status_by_method[(record.method, record.status)] += 1
        self._notify()

    async def _handle_file(self, request: web.Request, token: str, file_path: str) -> web.StreamResponse:
        """``/file/bot<token>/<file_path>``: the bytes, streamed (404 for a wrong token or path)."""
        if token == self.token and file_path in self.files:
            return web.Response(body=self.files[file_path], content_type="application/octet-stream")
        file = self._media_paths.get(file_path)
        if token != self.token or file is None or not file.available:
            return self._envelope(BotApiError(404, "Not Found").envelope(), 404)
        file.downloads += 1
        self._notify()
        if self.latency > 0:
            await self._pause(self.latency)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = file.length
        await response.prepare(request)
        chunk = 64 * 1024
        for start in range(0, file.length, chunk):
            end = min(file.length, start + chunk)
            await response.write(file.data[start:end] if file.data is not None else bytes(end - start))
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ message helpers

    def _resolve_chat(self, params: Mapping[str, Any]) -> FakeChat:
        raw = params.get("chat_id")
        if raw is None or str(raw).strip() == "":
            raise _bad("chat_id is empty")
        text = str(raw).strip()
        if text.startswith("@"):
            name = text[1:].lower()
            for chat in self._chats.values():
                if chat.username and chat.username.lower() == name:
                    return chat
            raise _bad("chat not found")
        try:
            chat_id = int(text)
        except ValueError:
            raise _bad("chat not found") from None
        chat = self._chats.get(chat_id)
        if chat is None:
            raise _bad("chat not found")
        return chat

    def _writable(self, chat: FakeChat) -> None:
        if chat.blocked:
            raise BotApiError(403, "Forbidden: bot was blocked by the user")

    def _thread(self, chat: FakeChat, params: Mapping[str, Any]) -> int | None:
        thread_id = _int_param(params, "message_thread_id")
        if not thread_id:
            return None
        if not chat.is_forum:
            return None  # outside forums the thread id refers to comment threads; ignored here
        if thread_id not in chat.topics:
            raise _bad("message thread not found")
        return thread_id

    def _reply_target(self, chat: FakeChat, params: Mapping[str, Any]) -> SeenMessage | None:
        reply = params.get("reply_parameters")
        allow_without = _bool_param(params, "allow_sending_without_reply")
        message_id: int | None = None
        if isinstance(reply, Mapping):
            message_id = _int_param(reply, "message_id")
            allow_without = allow_without or bool(reply.get("allow_sending_without_reply"))
        elif isinstance(reply, str) and reply:
            raise _bad("can't parse reply parameters JSON object")
        else:
            message_id = _int_param(params, "reply_to_message_id")
        if not message_id:
            return None
        target = chat.messages.get(message_id)
        if target is None or target.deleted:
            if allow_without:
                return None
            raise _bad("message to be replied not found")
        return target

    def _markup(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The inline keyboard to attach (other keyboards are not part of the message).

        None: no keyboard (omitted, or one without buttons). Buttons are checked as the
        Bot API does (see the module docstring) and kept as sent.
        """
        markup = params.get("reply_markup")
        if markup is None or markup == "":
            return None
        if not isinstance(markup, Mapping):
            raise _bad("can't parse reply keyboard markup JSON object")
        keyboard = markup.get("inline_keyboard")
        if keyboard is None:
            return None
        if not isinstance(keyboard, list) or not all(isinstance(row, list) for row in keyboard):
            raise _bad("field \"inline_keyboard\" of the InlineKeyboardMarkup must be an Array of Arrays")
        rows = []
        for row in keyboard:
            for button in row:
                self._check_button(button)
            if row:
                rows.append([dict(button) for button in row])
        return {"inline_keyboard": rows} if rows else None

    @staticmethod
    def _check_button(button: Any) -> None:
        if not isinstance(button, Mapping):
            raise _bad("can't parse inline keyboard button: InlineKeyboardButton must be an Object")
        if "text" not in button:
            raise _bad("can't parse inline keyboard button: Can't find field \"text\"")
        if not isinstance(button["text"], str):
            raise _bad("can't parse inline keyboard button: Field \"text\" must be of type String")
        actions = [key for key in BUTTON_ACTIONS if button.get(key) not in (None, "")]
        if not actions:
            raise _bad(TEXT_BUTTONS_UNALLOWED)
        if len(actions) > 1:
            raise _bad("can't parse inline keyboard button: exactly one of the optional fields must be used")
        data = button.get("callback_data")
        if data is not None and (not isinstance(data, str) or not 1 <= len(data.encode()) <= 64):
            raise _bad("BUTTON_DATA_INVALID")

    def _format(self, params: Mapping[str, Any], text: str, *, allow_empty: bool = False) -> FormattedText:
        try:
            return format_text(
                text,
                params.get("parse_mode") if isinstance(params.get("parse_mode"), str) else None,
                params.get("entities"),
                allow_empty=allow_empty,
                find_user=self._find_user,
            )
        except FormattingError as exc:
            raise _bad(exc.description) from None

    def _too_long(self, text: str) -> bool:
        size = utf16_len(text) if self._limits.strict_utf16 else len(text)
        return size > self._limits.max_text_length

    def _take_flood(self, chat: FakeChat, kind: str = "message") -> None:
        retry_after = self.flood.acquire(chat.id, is_group=chat.is_group, kind=kind)
        if retry_after is not None:
            raise _flood(retry_after)

    def _message_json(self, message: SeenMessage, *, with_reply: bool = True) -> dict[str, Any]:
        chat = self._chats[message.chat_id]
        data: dict[str, Any] = {"message_id": message.message_id}
        if message.sender is not None:
            data["from"] = message.sender
        data["chat"] = chat.to_dict()
        data["date"] = message.date
        if message.thread_id is not None:
            data["message_thread_id"] = message.thread_id
            if chat.is_forum:
                data["is_topic_message"] = True
        if with_reply:
            target_id = message.reply_to
            if target_id is None and chat.is_forum and message.thread_id is not None:
                target_id = message.thread_id  # topic messages reply to the topic's service message
            target = chat.messages.get(target_id) if target_id is not None else None
            if target is not None and not (target.deleted and target.service is None):
                data["reply_to_message"] = self._message_json(target, with_reply=False)
        if message.edit_date is not None:
            data["edit_date"] = message.edit_date
        if message.service is not None:
            data.update(message.service)
        elif message.media is not None:
            if message.media_group_id is not None:
                data["media_group_id"] = message.media_group_id
            data.update(message.media)
            if message.text:  # a caption: "0-1024 characters", absent when empty [doc Message]
                data["caption"] = message.text
                if message.entities:
                    data["caption_entities"] = message.entities
        else:
            data["text"] = message.text
            if message.entities:
                data["entities"] = message.entities
        if message.link_preview_options:
            data["link_preview_options"] = message.link_preview_options
        if message.reply_markup is not None:
            data["reply_markup"] = message.reply_markup
        return data

    # ------------------------------------------------------------------ methods

    def _get_me(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        return {
            **self.bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": not self.privacy_mode,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    def _log_out(self, params: dict[str, Any], record: CallRecord) -> bool:
        return True

    def _get_file(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        """getFile: the file's ``file_path`` for downloading, within the 20 MB bot limit."""
        file_id = str(params.get("file_id") or "").strip()
        if not file_id:
            raise _bad("file_id not specified")
        file = self.media_files.get(file_id)
        if file is None and not self._FILE_ID_SHAPE.fullmatch(file_id):
            raise _bad("invalid file_id")
        if file is None or not file.available:
            raise _bad("wrong file_id or the file is temporarily unavailable")
        if file.size > self._limits.max_download_size:
            raise _bad("file is too big")
        return {**self._file_json(file), "file_path": file.file_path}

    def _get_chat(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        chat = self._resolve_chat(params)
        data = chat.to_dict()
        data.update(
            {
                "accent_color_id": 0,
                "max_reaction_count": 11,
                "accepted_gift_types": {
                    "unlimited_gifts": False,
                    "limited_gifts": False,
                    "unique_gifts": False,
                    "premium_subscription": False,
                    "gifts_from_channels": False,
                },
            }
        )
        return data

    def _send_message(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        chat = self._resolve_chat(params)
        self._writable(chat)
        text = params.get("text")
        if not isinstance(text, str) or text == "":
            raise _bad("message text is empty")
        thread_id = self._thread(chat, params)
        target = self._reply_target(chat, params)
        if target is not None and thread_id is None and chat.is_forum:
            thread_id = target.thread_id
        markup = self._markup(params)
        formatted = self._format(params, text)
        if self._too_long(formatted.text):
            raise _bad("message is too long")
        self._take_flood(chat)
        preview = params.get("link_preview_options")
        message = SeenMessage(
            chat.id,
            self._next_message_id(chat),
            True,
            dict(self.bot_user),
            formatted.text,
            formatted.entities,
            thread_id,
            target.message_id if target is not None else None,
            self.clock(),
            int(time.time()),
            reply_markup=markup,
            link_preview_options=dict(preview) if isinstance(preview, Mapping) else None,
        )
        if self.keep_history:
            message.edits.append((message.created_at, formatted.text, formatted.entities))
        else:
            message.edits.append((message.created_at, None, None))
        chat.messages[message.message_id] = message
        return self._message_json(message)

    def _edit_message_text(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        if params.get("inline_message_id") and params.get("chat_id") is None:
            raise _bad("MESSAGE_ID_INVALID")
        chat = self._resolve_chat(params)
        message_id = _int_param(params, "message_id")
        if not message_id:
            raise _bad("message identifier is not specified")
        text = params.get("text")
        if not isinstance(text, str) or text == "":
            raise _bad("message text is empty")
        message = chat.messages.get(message_id)
        if message is None or message.deleted:
            raise _bad("message to edit not found")
        if not message.from_bot or message.service is not None:
            raise _bad("message can't be edited")
        markup = self._markup(params)
        formatted = self._format(params, text)
        if self._too_long(formatted.text):
            raise _bad("MESSAGE_TOO_LONG")
        self._take_flood(chat)
        if formatted.text == message.text and formatted.entities == message.entities and markup == message.reply_markup:
            raise _bad(NOT_MODIFIED)
        now = self.clock()
        message.text = formatted.text
        message.entities = formatted.entities
        message.reply_markup = markup
        message.edit_date = int(time.time())
        if self.keep_history:
            message.edits.append((now, formatted.text, formatted.entities))
        else:
            message.edits.append((now, None, None))
        return self._message_json(message)

    def _edit_message_reply_markup(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        """editMessageReplyMarkup: only the keyboard changes (none given: it is removed)."""
        if params.get("inline_message_id") and params.get("chat_id") is None:
            raise _bad("MESSAGE_ID_INVALID")
        chat = self._resolve_chat(params)
        message_id = _int_param(params, "message_id")
        if not message_id:
            raise _bad("message identifier is not specified")
        message = chat.messages.get(message_id)
        if message is None or message.deleted:
            raise _bad("message to edit not found")
        if not message.from_bot or message.service is not None:
            raise _bad("message can't be edited")
        markup = self._markup(params)
        self._take_flood(chat)
        if markup == message.reply_markup:
            raise _bad(NOT_MODIFIED)
        message.reply_markup = markup
        message.edit_date = int(time.time())
        return self._message_json(message)

    def _delete_message(self, params: dict[str, Any], record: CallRecord) -> bool:
        chat = self._resolve_chat(params)
        message_id = _int_param(params, "message_id")
        message = chat.messages.get(message_id) if message_id else None
        if message is None or message.deleted:
            raise _bad("message to delete not found")
        if not message.from_bot and chat.is_group and not chat.bot_is_admin:
            raise _bad("message can't be deleted")
        self._take_flood(chat)
        message.deleted = True
        message.deleted_at = self.clock()
        message.deleted_by = "bot"
        return True

    def _send_chat_action(self, params: dict[str, Any], record: CallRecord) -> bool:
        chat = self._resolve_chat(params)
        action = str(params.get("action", "")).strip().lower()
        if action not in CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        self._writable(chat)
        thread_id = self._thread(chat, params)
        self._take_flood(chat, "chat_action")
        chat.actions.append((self.clock(), action, thread_id))
        return True

    def _send_message_draft(self, params: dict[str, Any], record: CallRecord) -> bool:
        chat = self._resolve_chat(params)
        if chat.type != "private":
            raise _bad("TEXTDRAFT_PEER_INVALID")  # [3p] observed wording; exact Bot API text unverified
        self._writable(chat)
        draft_id = _int_param(params, "draft_id")
        if not draft_id:
            raise _bad("draft_id must be non-zero")  # [unverified] wording
        text = params.get("text")
        text = text if isinstance(text, str) else ""
        formatted = self._format(params, text, allow_empty=True) if text else FormattedText("", [])
        if self._too_long(formatted.text):
            raise _bad("message is too long")
        thread_id = _int_param(params, "message_thread_id") or None
        self._take_flood(chat, "draft")
        chat.drafts.append(
            DraftRecord(
                self.clock(), chat.id, thread_id, draft_id, formatted.text, formatted.entities, chat.next_message_id
            )
        )
        return True

    def _set_my_commands(self, params: dict[str, Any], record: CallRecord) -> bool:
        commands = params.get("commands")
        if commands is None or commands == "":
            commands = []
        if not isinstance(commands, list):
            raise _bad("can't parse commands JSON object")
        if len(commands) > 100:
            raise _bad("BOT_COMMANDS_TOO_MUCH")
        parsed: list[dict[str, str]] = []
        for item in commands:
            if not isinstance(item, Mapping):
                raise _bad("can't parse BotCommand: expected an Object")
            command, description = item.get("command"), item.get("description")
            if not isinstance(command, str) or not isinstance(description, str):
                raise _bad("can't parse BotCommand: Field \"command\" and \"description\" must be of type String")
            command = command.lstrip("/")
            if not _COMMAND_SHAPE.fullmatch(command):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(description.strip()) <= 256:
                raise _bad("BOT_COMMAND_DESCRIPTION_INVALID")
            parsed.append({"command": command, "description": description})
        self._commands[self._commands_key(params)] = parsed
        return True

    def _get_my_commands(self, params: dict[str, Any], record: CallRecord) -> list[dict[str, str]]:
        return list(self._commands.get(self._commands_key(params), []))

    def _delete_my_commands(self, params: dict[str, Any], record: CallRecord) -> bool:
        self._commands.pop(self._commands_key(params), None)
        return True

    @staticmethod
    def _commands_key(params: Mapping[str, Any]) -> tuple[str, str]:
        scope = params.get("scope")
        if not isinstance(scope, Mapping) or scope.get("type") in (None, "default"):
            scope_key = "default"
        else:
            scope_key = json.dumps(scope, sort_keys=True)
        return scope_key, str(params.get("language_code") or "")

    def commands(self, *, scope: Mapping[str, Any] | None = None, language_code: str = "") -> list[dict[str, str]]:
        """The command list the bot registered (test-side view)."""
        return list(self._commands.get(self._commands_key({"scope": scope, "language_code": language_code}), []))

    def _answer_callback_query(self, params: dict[str, Any], record: CallRecord) -> bool:
        query_id = str(params.get("callback_query_id") or "")
        state = self._callbacks.get(query_id)
        if state is None or state["answered"]:
            raise _bad(QUERY_TOO_OLD)
        if self.clock() - state["t"] > self.callback_answer_deadline:
            raise _bad(QUERY_TOO_OLD)
        text = params.get("text")
        if isinstance(text, str) and len(text) > 200:
            raise _bad("MESSAGE_TOO_LONG")
        state["answered"] = True
        self.callback_answers[query_id] = {
            "text": text,
            "show_alert": _bool_param(params, "show_alert"),
            "url": params.get("url"),
            "t": self.clock(),
        }
        return True

    # ------------------------------------------------------------------ getUpdates

    def _set_allowed_updates(self, params: Mapping[str, Any]) -> None:
        value = params.get("allowed_updates")
        if not isinstance(value, list):
            return
        wanted = frozenset(str(v).lower() for v in value if isinstance(v, str)) & frozenset(UPDATE_TYPES)
        self._allowed_updates = wanted or (frozenset(UPDATE_TYPES) - _OPT_IN_UPDATES)

    def _confirm(self, offset: int) -> None:
        if offset > 0:
            self._pending = [q for q in self._pending if q.update_id >= offset or (q.forced and not q.returned)]
        elif offset < 0:
            self._pending = self._pending[offset:]

    async def _get_updates(self, params: dict[str, Any], record: CallRecord) -> list[dict[str, Any]]:
        if self._webhook is not None:
            raise BotApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the "
                "webhook first",
            )
        offset = _int_param(params, "offset") or 0
        limit = min(100, max(1, _int_param(params, "limit") or 100))
        timeout = min(50, max(0, _int_param(params, "timeout") or 0))
        self._set_allowed_updates(params)
        now = self.clock()
        if self.busy_loop_guard and self._prev_poll is not None and self._prev_poll[0] == offset:
            if timeout < 3 and now < self._prev_poll[1] + 3.0:
                timeout = 3
            if now < self._prev_poll[1] + 0.5:
                limit = 1
        self._prev_poll = (offset, now)
        token = object()
        self._poll_token = token  # any older long poll is now terminated
        self._confirm(offset)
        self._notify(updates=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._poll_token is not token:
                raise BotApiError(409, CONFLICT_OTHER_POLL)
            if self._webhook is not None:
                raise BotApiError(409, "Conflict: terminated by setWebhook request")  # [unverified] wording
            if self._pending:
                batch = self._pending[:limit]
                for queued in batch:
                    queued.returned = True
                self._notify()
                return [q.update for q in batch]
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing.is_set():
                return []
            event = self._updates_event
            self._waiting_polls += 1
            self._notify()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
            finally:
                self._waiting_polls -= 1

    # ------------------------------------------------------------------ webhooks

    def _set_webhook(self, params: dict[str, Any], record: CallRecord) -> _Described:
        url = str(params.get("url") or "")
        if not url:
            return self._delete_webhook(params, record)
        now = self.clock()
        if now < self._next_set_webhook:
            raise _flood(1)
        self._next_set_webhook = now + 1.0
        match = re.fullmatch(r"(https?)://([^/:?#]+)(?::(\d+))?([/?#].*)?", url, re.IGNORECASE)
        if match is None:
            raise _bad("invalid webhook URL specified")
        if self.require_https and match.group(1).lower() != "https":
            raise _bad("bad webhook: An HTTPS URL must be provided for webhook")
        secret = params.get("secret_token")
        if secret is not None and secret != "" and not _SECRET_SHAPE.fullmatch(str(secret)):
            raise _bad("secret token contains unallowed characters")  # [unverified] wording
        max_connections = min(100, max(1, _int_param(params, "max_connections") or 40))
        drop = _bool_param(params, "drop_pending_updates")
        current = self._webhook
        self._set_allowed_updates(params)
        if (
            current is not None
            and current.url == url
            and current.secret == (secret or None)
            and current.max_connections == max_connections
            and not drop
        ):
            return _Described(True, "Webhook is already set")
        if drop:
            self._pending.clear()
        self._webhook_generation += 1
        self._webhook = _Webhook(url, str(secret) if secret else None, max_connections, self._webhook_generation)
        if self._webhook_task is not None:
            self._webhook_task.cancel()
        self._webhook_task = asyncio.get_running_loop().create_task(self._webhook_loop(self._webhook))
        self._notify(updates=True)
        return _Described(True, "Webhook was set")

    def _delete_webhook(self, params: dict[str, Any], record: CallRecord) -> _Described:
        had = self._webhook is not None
        self._webhook = None
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            self._webhook_task = None
        if _bool_param(params, "drop_pending_updates"):
            self._pending.clear()
        self._notify(updates=True)
        return _Described(True, "Webhook was deleted" if had else "Webhook is already deleted")

    def _get_webhook_info(self, params: dict[str, Any], record: CallRecord) -> dict[str, Any]:
        hook = self._webhook
        info: dict[str, Any] = {
            "url": hook.url if hook else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending),
        }
        if hook is not None:
            info["max_connections"] = hook.max_connections
            if hook.last_error_date is not None:
                info["last_error_date"] = hook.last_error_date
                info["last_error_message"] = hook.last_error_message
            if self._allowed_updates != frozenset(UPDATE_TYPES) - _OPT_IN_UPDATES:
                info["allowed_updates"] = sorted(self._allowed_updates)
        return info

    async def _webhook_loop(self, hook: _Webhook) -> None:
        """Deliver pending updates in order, one at a time; retry failures with back-off."""
        initial, ceiling = self.webhook_retry
        delay = initial
        while self._webhook is hook and not self._closing.is_set():
            if not self._pending:
                event = self._updates_event
                await event.wait()
                continue
            queued = self._pending[0]
            status, error = await self._post_update(hook, queued)
            if status is not None and 200 <= status < 300:
                if queued in self._pending:
                    self._pending.remove(queued)
                delay = initial
                self._notify()
                continue
            hook.last_error_date = int(time.time())
            hook.last_error_message = error or f"Wrong response from the webhook: {status}"
            self._notify()
            await self._pause(delay)
            delay = min(ceiling, delay * 2)

    async def _post_update(self, hook: _Webhook, queued: _Queued) -> tuple[int | None, str | None]:
        headers = {"Content-Type": "application/json"}
        if hook.secret:
            headers["X-Telegram-Bot-Api-Secret-Token"] = hook.secret
        status: int | None = None
        error: str | None = None
        assert self._session is not None
        try:
            async with self._session.post(hook.url, data=json.dumps(queued.update).encode(), headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (ClientError, TimeoutError, OSError) as exc:
            error = f"Connection error: {type(exc).__name__}"
        self.webhook_deliveries.append(
            WebhookDelivery(self.clock(), queued.update_id, hook.url, status, error, dict(headers))
        )
        return status, error

    # ------------------------------------------------------------------ control API

    async def _handle_control(self, request: web.Request, action: str) -> web.Response:
        """``/_fake/...``: the test-side API over HTTP, for a fake in another process."""
        try:
            body: dict[str, Any] = {}
            if request.method == "POST" and request.body_exists:
                raw = await request.read()
                body = json.loads(raw) if raw.strip() else {}
            query = request.query
            if action == "user_says" and request.method == "POST":
                chat_id = int(body.get("chat_id", body.get("chat", 0)))
                chat = self.ensure_chat(chat_id, type=body.get("chat_type"), title=body.get("title"))
                user = body.get("user") or body.get("user_id")
                result: Any = self.user_says(
                    chat, user, str(body["text"]), reply_to=body.get("reply_to"), thread=body.get("thread")
                )
            elif action == "user_sends" and request.method == "POST":
                # {"chat_id", "user", "kind": "photo"|"document"|..., "data_b64" or "size", "caption", ...}
                chat_id = int(body.get("chat_id", body.get("chat", 0)))
                chat = self.ensure_chat(chat_id, type=body.get("chat_type"), title=body.get("title"))
                user = body.get("user") or body.get("user_id")
                kind = str(body["kind"])
                sender = getattr(self, f"user_sends_{kind}", None)
                if sender is None or kind == "album":
                    raise ValueError(f"unknown media kind {kind!r}")
                data = base64.b64decode(body["data_b64"]) if "data_b64" in body else None
                options = {k: v for k, v in body.items()
                           if k in ("caption", "size", "file_name", "mime_type", "duration", "reply_to")}
                result = sender(chat, user, data, **options)
            elif action == "user_presses" and request.method == "POST":
                # {"chat_id", "user", "message_id", "data"} -> the callback query id
                user = body.get("user") or body.get("user_id")
                result = self.user_presses(int(body["chat_id"]), user, int(body["message_id"]), body.get("data"))
            elif action == "callback_answers":
                result = self.callback_answers
            elif action == "messages":
                result = [m.to_dict() for m in self.messages(int(query["chat_id"]))]
            elif action == "calls":
                since = int(query.get("since", 0))
                method = query.get("method")
                result = [
                    c.to_dict() for c in self.calls[since:] if method is None or c.method.lower() == method.lower()
                ]
            elif action == "stats":
                result = self.stats()
            elif action == "config" and request.method == "POST":
                if "latency" in body:
                    self.latency = float(body["latency"])
                if "privacy_mode" in body:
                    self.privacy_mode = bool(body["privacy_mode"])
                if "limits" in body:
                    self.limits = dataclasses.replace(self._limits, **body["limits"])
                result = {"latency": self.latency, "limits": dataclasses.asdict(self._limits)}
            elif action == "inject" and request.method == "POST":
                fault = self.inject(
                    body["kind"],
                    method=body.get("method"),
                    chat_id=body.get("chat_id"),
                    times=body.get("times", 1),
                    retry_after=body.get("retry_after"),
                    status=int(body.get("status", 500)),
                )
                result = dataclasses.asdict(fault)
            elif action == "reset" and request.method == "POST":
                self.reset()
                result = True
            else:
                return self._envelope({"ok": False, "description": f"unknown control action {action}"}, 404)
        except (KeyError, ValueError, TypeError) as exc:
            return self._envelope({"ok": False, "description": f"{type(exc).__name__}: {exc}"}, 400)
        return self._envelope({"ok": True, "result": result})


@dataclass(frozen=True, slots=True)
class _Described:
    """A successful result that carries a ``description`` in the envelope."""

    value: Any
    description: str


# =========================================================================== CLI


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.telegram", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--bot-username", default="parley_bot")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every Bot API call")
    parser.add_argument("--no-limits", action="store_true", help="disable flood control")
    parser.add_argument("--light", action="store_true", help="benchmark mode: no per-version text, no params")
    parser.add_argument("--max-calls", type=int, default=None, help="keep about this many call records")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(list(argv) if argv is not None else None)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeTelegram(
        args.token,
        limits=TelegramLimits(enabled=not args.no_limits),
        latency=args.latency,
        bot_username=args.bot_username,
        keep_history=not args.light,
        max_calls=args.max_calls,
    )
    await fake.start(args.host, args.port)
    print(fake.base_url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: Iterable[str] | None = None) -> None:
    """Serve until killed; prints the base URL (what PTB's ``base_url`` takes) first."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
