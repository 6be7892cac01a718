"""A faithful fake Discord (REST API v10 + websocket Gateway) for tests and benchmarks.

The *real* discord.py talks to this server over 127.0.0.1 — pointed at it by
`bots.discord_endpoints.point_discord_at(fake.api_base, fake.gateway_url)`, nothing else —
so a test that passes here exercised discord.py's real HTTP, rate-limit and Gateway code.
Every behaviour follows `../shared/reference/discord-api.md` (section numbers below refer to
it); where the reference marks a fact [unverified] the docstring says so.

What a test gets:

* **A world**: a default guild with a text channel, a default human user, and the bot.
  Create more with `guild()`, `text_channel()`, `thread()`, `dm_channel()`, `user()`.
* **People acting**: `user_says()`, `user_edits()`, `user_deletes()`, `redeliver()`,
  `user_runs_command()`, `user_clicks()` dispatch Gateway events to every connected bot.
* **The channel as a person sees it**: `messages(channel)` (`SeenMessage` with edit
  history, deletion, flags, replies, `buttons`), `messages_seen_by(channel, user)` and
  `visible_to()` (ephemeral messages are their interaction user's alone), `buttons()`,
  `bot_texts()`, `typing_events()`, `interaction()` (`FakeInteraction`: the ack, its
  type and time, ephemeral replies, follow-ups, every callback tried).
* **Components**: message components are validated on every create and edit (rows of
  at most 5 buttons, at most 5 rows, custom_id <= 100, label <= 80, link buttons need a
  url: 400 50035 otherwise); an edit without `components` keeps them, `components: []`
  removes them. A click answers with type 4 (flags 64: ephemeral), 6 (deferred
  update) or 7 (update the clicked message), within 3 s, once.
* **The wire**: `calls` (every REST call with timings and status), `count_429()`.
* **Knobs**: `latency`, `limits` (`DiscordLimits`: per-route buckets and the global
  limit, with the real headers), `inject()` (5xx, timeouts, dropped connections, forced
  429s with or without `Via`), `disconnect_gateway()` / `invalidate_session()` /
  `request_reconnect()` for RESUME paths, an injectable `clock` for the limiter and the
  interaction clocks (3 s acknowledgement, 15 min token) — e.g. `FakeClock().now` from
  `tests.support.fakeclock`.
* **Waiting**: `await wait_for(predicate)` re-evaluates on every state change (and
  every 20 ms, for predicates over a bot's own state); `await wait_ready()` returns once
  a connected bot got READY and its GUILD_CREATEs.

* **Files people attach**: `user_says(..., attachments=[Upload(data, "a.pdf")])`,
  `user_sends_voice()` (a voice message: flag IS_VOICE_MESSAGE, `duration_secs`,
  `waveform`) and `user_sends_sticker()`. Attachment URLs are signed CDN URLs on the
  fake itself (`/attachments/{channel}/{attachment}/{name}?ex=..&is=..&hm=..&`, the
  shape of Discord's [dc-doc reference.mdx "Signed Attachment CDN URLs"]), served by
  `GET` so `Attachment.read()` / `HTTPClient.get_from_cdn()` work. A URL past its `ex`
  (`attachment_url_ttl`, 24 h by default [3p: ~24 h widely observed]), with a wrong
  signature, of a deleted message, or `expire_attachment()`-ed answers 404 with
  "This content is no longer available." [3p], which discord.py raises as `NotFound`.
  `cdn_requests` records every fetch; `fail_cdn()` makes the next ones fail,
  `cdn_latency` holds them (until `release_cdn()`).

Not modelled: TYPING_START dispatches, presences, voice, member add/remove events, the
CDN for files the bot uploads (listed on its messages, not served), refreshing expired
attachment URLs (`POST /attachments/refresh-urls`), zstd-stream compression.
* **Other processes**: JSON endpoints under `/_fake/` and
  `python -m tests.fakes.discord --port 8082 --latency 0.05`.

The test-side API is synchronous where it only changes state (`user_says()` returns the
message at once; the Gateway frames are queued in order and written by a per-connection
writer) and asynchronous where it has to wait (`start`, `stop`, `wait_for`, gateway knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import hmac
import itertools
import json
import logging
import math
import re
import secrets
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar

from aiohttp import WSMsgType, web

__all__ = [
    "API_PREFIX",
    "CALLBACK",
    "DELETE",
    "EDIT",
    "FOLLOWUP",
    "ORIGINAL_EDIT",
    "SEND",
    "TYPING",
    "Call",
    "DiscordLimits",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeUser",
    "GatewaySession",
    "Injection",
    "SeenButton",
    "SeenMessage",
    "Intents",
    "Upload",
    "snowflake_time",
]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1420070400000

# Route keys as the call log, `inject()` and `count_429()` name them (method + template).
SEND = "POST /channels/{channel_id}/messages"
EDIT = "PATCH /channels/{channel_id}/messages/{message_id}"
DELETE = "DELETE /channels/{channel_id}/messages/{message_id}"
TYPING = "POST /channels/{channel_id}/typing"
CALLBACK = "POST /interactions/{interaction_id}/{interaction_token}/callback"
ORIGINAL_EDIT = "PATCH /webhooks/{application_id}/{interaction_token}/messages/@original"
FOLLOWUP = "POST /webhooks/{application_id}/{interaction_token}"

# Message flags and channel types used here (dc-doc message.mdx / channel.mdx).
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_IS_VOICE_MESSAGE = 1 << 13
CDN_GONE = "This content is no longer available."
CH_TEXT, CH_DM, CH_PUBLIC_THREAD = 0, 1, 11
ALL_PERMISSIONS = str((1 << 51) - 1)


class Intents:
    """Gateway intent bits the fake honours (reference §5.1)."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15
    PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


class _Snowflakes:
    """Mints realistic, strictly increasing snowflake strings (reference §2).

    discord.py derives `created_at` from ids and picks delete sub-buckets by message age,
    so ids carry the real wall-clock time.
    """

    def __init__(self) -> None:
        self._last = 0
        self._counter = itertools.count()

    def __call__(self) -> str:
        ms = int(time.time() * 1000)
        value = ((ms - DISCORD_EPOCH_MS) << 22) | (next(self._counter) & 0xFFF)
        value = max(value, self._last + 1)
        self._last = value
        return str(value)


def snowflake_time(snowflake: str | int) -> float:
    """Unix time (seconds) encoded in a snowflake."""
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000.0


def _iso(wall: float) -> str:
    return _dt.datetime.fromtimestamp(wall, _dt.timezone.utc).isoformat()


def _up3(seconds: float) -> str:
    """Seconds with 3 decimals, rounded *up*: a client sleeping this long is never early."""
    return f"{math.ceil(seconds * 1000) / 1000:.3f}"


def _bucket_hash(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


def _json_response(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """JSON with exactly `Content-Type: application/json` (reference §2, the content-type trap).

    aiohttp's `json_response` appends `; charset=utf-8`, and discord.py then treats the
    body as text and crashes at login.
    """
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _id(obj: Any) -> str:
    """Accept an object with `.id`, an int or a str and return the snowflake string."""
    if obj is None:
        raise ValueError("an id is required")
    if isinstance(obj, Mapping):
        return str(obj["id"])
    return str(getattr(obj, "id", obj))


_BODY: web.RequestKey[Any] = web.RequestKey("parsed_body", object)
_MENTION_RE = re.compile(r"<@!?(\d+)>")

# ---------------------------------------------------------------------------------------
# Errors: what a handler raises, the middleware renders with the real bodies (§8)
# ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """A Discord API error: HTTP status plus the JSON error body."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def _form_error(path: str, code: str, message: str) -> ApiError:
    """400 50035 `Invalid Form Body` with the nested `_errors` shape of the real API."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return ApiError(400, 50035, "Invalid Form Body", errors)


def _too_long(path: str, limit: int) -> ApiError:
    return _form_error(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")


BUTTON_LABEL_MAX = 80
CUSTOM_ID_MAX = 100
ROW_MAX = 5  # components per action row
ROWS_MAX = 5  # action rows per message
_SELECT_TYPES = (3, 5, 6, 7, 8)


def _validate_components(rows: Any) -> None:
    """Check message components as Discord does for a bot's message (400 50035 on a violation).

    Classic (non-v2) layout: up to 5 action rows (type 1), each with 1-5 buttons (type 2)
    or exactly one select menu. A button of style 1-4 needs a `custom_id` of 1-100
    characters and has a label of at most 80; style 5 (link) needs a `url` and no
    `custom_id`; style 6 (premium) a `sku_id`. Custom ids are unique in a message
    (`COMPONENT_CUSTOM_ID_DUPLICATED`, discord-api-docs#3673). Limits per dc-doc
    components/reference.mdx; the `_errors` codes other than BASE_TYPE_* and the
    duplicate are [unverified].
    """
    if not isinstance(rows, list):
        raise _form_error("components", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
    if len(rows) > ROWS_MAX:
        raise _too_long("components", ROWS_MAX)
    seen: set[str] = set()
    for r, row in enumerate(rows):
        where = f"components.{r}"
        if not isinstance(row, dict) or row.get("type") != 1:
            raise _form_error(f"{where}.type", "UNION_TYPE_CHOICES",
                              "Value of field \"type\" must be one of (1,).")  # [unverified] top level: rows only
        items = row.get("components")
        if not isinstance(items, list) or not items:
            raise _form_error(f"{where}.components", "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length.")
        if len(items) > ROW_MAX:
            raise _too_long(f"{where}.components", ROW_MAX)
        for i, item in enumerate(items):
            at = f"{where}.components.{i}"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in _SELECT_TYPES:
                if len(items) != 1:
                    raise _form_error(at, "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                                      "The specified component exceeds the maximum width")  # [unverified]
            elif kind != 2:
                raise _form_error(f"{at}.type", "UNION_TYPE_CHOICES",
                                  "Value of field \"type\" must be one of (2, 3, 5, 6, 7, 8).")  # [unverified]
            else:
                _validate_button(item, at)
            custom_id = item.get("custom_id")
            if kind in _SELECT_TYPES and not custom_id:
                raise _form_error(f"{at}.custom_id", "BASE_TYPE_REQUIRED", "This field is required")
            if custom_id is not None:
                if len(str(custom_id)) > CUSTOM_ID_MAX:
                    raise _too_long(f"{at}.custom_id", CUSTOM_ID_MAX)
                if custom_id in seen:
                    raise _form_error(f"{at}.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED",
                                      "Component custom id was already specified")
                seen.add(custom_id)


def _validate_button(item: dict[str, Any], at: str) -> None:
    style = item.get("style")
    if style not in BUTTON_STYLES:
        raise _form_error(f"{at}.style", "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4, 5, 6}.")
    label = item.get("label")
    if label is not None and len(str(label)) > BUTTON_LABEL_MAX:
        raise _too_long(f"{at}.label", BUTTON_LABEL_MAX)
    if style == 5:
        if not item.get("url"):
            raise _form_error(f"{at}.url", "BASE_TYPE_REQUIRED", "This field is required")
        if item.get("custom_id") is not None:  # [unverified] code
            raise _form_error(f"{at}.custom_id", "COMPONENT_INVALID_FIELD", "A link button cannot have a custom id")
    elif style == 6:
        if not item.get("sku_id"):
            raise _form_error(f"{at}.sku_id", "BASE_TYPE_REQUIRED", "This field is required")
    else:
        if not item.get("custom_id"):
            raise _form_error(f"{at}.custom_id", "BASE_TYPE_REQUIRED", "This field is required")
        if not label and not item.get("emoji"):  # [unverified] code
            raise _form_error(f"{at}.label", "BASE_TYPE_REQUIRED", "A button needs a label or an emoji")


UNAUTHORIZED = lambda: ApiError(401, 0, "401: Unauthorized")  # noqa: E731
UNKNOWN_CHANNEL = lambda: ApiError(404, 10003, "Unknown Channel")  # noqa: E731
UNKNOWN_MESSAGE = lambda: ApiError(404, 10008, "Unknown Message")  # noqa: E731
UNKNOWN_WEBHOOK = lambda: ApiError(404, 10015, "Unknown Webhook")  # noqa: E731
UNKNOWN_INTERACTION = lambda: ApiError(404, 10062, "Unknown interaction")  # noqa: E731
ALREADY_ACKED = lambda: ApiError(400, 40060, "Interaction has already been acknowledged.")  # noqa: E731
EMPTY_MESSAGE = lambda: ApiError(400, 50006, "Cannot send an empty message")  # noqa: E731
NOT_AUTHOR = lambda: ApiError(403, 50005, "Cannot edit a message authored by another user")  # noqa: E731
INVALID_WEBHOOK_TOKEN = lambda: ApiError(401, 50027, "Invalid Webhook Token")  # noqa: E731
MISSING_PERMISSIONS = lambda: ApiError(403, 50013, "Missing Permissions")  # noqa: E731
DM_ACTION = lambda: ApiError(403, 50003, "Cannot execute action on a DM channel")  # noqa: E731


# ---------------------------------------------------------------------------------------
# Rate limits (§9)
# ---------------------------------------------------------------------------------------


@dataclass
class DiscordLimits:
    """Rate limits and hard limits of the fake. Change at runtime via `fake.limits = ...`.

    Per-route numbers are undocumented by Discord (§9.1). The defaults follow what is
    widely observed but [unverified]: 5 message POSTs per channel per ~5 s. Observed in
    discord-api-docs #1442 and #8073: `POST /channels/{id}/messages` and
    `PATCH /channels/{id}/messages/{id}` report the *same* `X-RateLimit-Bucket` hash yet
    count against *separate* counters. That is the default here
    (`edits_share_send_bucket=False`); set it True for one shared counter (stricter).
    Deletes have their own hash and counter unless `deletes_share_send_bucket`.

    `enabled=False` turns every limit off *and* stops sending `X-RateLimit-*` headers, so
    discord.py does no pre-emptive throttling either (for "unlimited" benchmarks).
    """

    channel_messages: int = 5
    channel_window: float = 5.0
    channel_edits: int | None = None  # None: same as channel_messages
    channel_deletes: int | None = None
    channel_typing: int | None = None
    edits_share_send_bucket: bool = False
    deletes_share_send_bucket: bool = False
    webhook_messages: int = 5  # per interaction token (follow-ups, @original) [unverified]
    webhook_window: float = 2.0
    default_limit: int = 50  # any other route, per route and major parameter
    default_window: float = 1.0
    global_rate: float = 50.0  # requests per second per bot (not interactions/webhooks)
    enabled: bool = True
    max_content: int = 2000  # counted in code points (Python len), §8 [unverified]
    ack_deadline: float = 3.0  # initial interaction response
    token_ttl: float = 900.0  # interaction token for follow-ups / @original
    nonce_ttl: float = 300.0  # `enforce_nonce` de-duplication window ("a few minutes")

    def counter_for(self, bucket: str) -> tuple[str, str, int, float]:
        """Map a route's bucket name to (counter name, hash name, limit, window)."""
        m, w = self.channel_messages, self.channel_window
        if bucket == "messages":
            return "messages", "messages", m, w
        if bucket == "edits":
            if self.edits_share_send_bucket:
                return "messages", "messages", m, w
            return "edits", "messages", self.channel_edits or m, w
        if bucket == "deletes":
            if self.deletes_share_send_bucket:
                return "messages", "messages", m, w
            return "deletes", "deletes", self.channel_deletes or m, w
        if bucket == "typing":
            return "typing", "typing", self.channel_typing or m, w
        if bucket in ("webhook", "callback"):
            return bucket, bucket, self.webhook_messages, self.webhook_window
        return bucket, bucket, self.default_limit, self.default_window


@dataclass(slots=True)
class _Window:
    """One fixed window: opened by the first request after the previous one expired."""

    limit: int
    window: float
    count: int = 0
    reset_at: float = 0.0


@dataclass(slots=True)
class _Verdict:
    allowed: bool
    headers: dict[str, str]
    retry_after: float = 0.0
    scope: str = "user"
    is_global: bool = False


class RateLimiter:
    """Per-route buckets keyed like Discord's (bucket, major parameter) plus the global limit.

    Windows are fixed and start at the first request (as `X-RateLimit-Reset-After`
    suggests): a client sending at exactly `limit / window` never sees a 429, one more
    request inside the window does.
    """

    def __init__(self, limits: DiscordLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._global = _Window(1, 1.0)

    def reset(self) -> None:
        self._windows.clear()
        self._global = _Window(1, 1.0)

    def _take(self, win: _Window, now: float) -> bool:
        if now >= win.reset_at:
            win.count = 0
            win.reset_at = now + win.window
        if win.count >= win.limit:
            return False
        win.count += 1
        return True

    def check(self, bucket: str, major: str, *, global_limited: bool) -> _Verdict | None:
        """Count one request; return headers and whether it may proceed (None: limits off)."""
        lim = self.limits
        if not lim.enabled:
            return None
        now = self.clock()
        if global_limited:
            g = self._global
            g.limit = max(1, int(lim.global_rate))
            g.window = g.limit / lim.global_rate if lim.global_rate > 0 else 1.0
            if not self._take(g, now):
                retry = max(g.reset_at - now, 0.001)
                return _Verdict(
                    False,
                    {"X-RateLimit-Global": "true"},
                    retry_after=retry,
                    scope="global",
                    is_global=True,
                )
        counter, hash_name, limit, window = lim.counter_for(bucket)
        key = (counter, major)
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = _Window(limit, window)
        win.limit, win.window = limit, window
        allowed = self._take(win, now)
        reset_after = max(win.reset_at - now, 0.0)
        headers = {
            "X-RateLimit-Limit": str(win.limit),
            "X-RateLimit-Remaining": str(max(win.limit - win.count, 0)),
            "X-RateLimit-Reset": _up3(time.time() + reset_after),
            "X-RateLimit-Reset-After": _up3(reset_after),
            "X-RateLimit-Bucket": _bucket_hash(hash_name),
        }
        if allowed:
            return _Verdict(True, headers)
        return _Verdict(False, headers, retry_after=max(reset_after, 0.001))

    def peek_headers(self, bucket: str, major: str) -> dict[str, str]:
        """Current headers of a bucket without counting a request (for forced 429s)."""
        counter, hash_name, limit, window = self.limits.counter_for(bucket)
        win = self._windows.get((counter, major))
        now = self.clock()
        count = win.count if win and now < win.reset_at else 0
        reset_after = max(win.reset_at - now, 0.0) if win and now < win.reset_at else window
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(limit - count, 0)),
            "X-RateLimit-Reset": _up3(time.time() + reset_after),
            "X-RateLimit-Reset-After": _up3(reset_after),
            "X-RateLimit-Bucket": _bucket_hash(hash_name),
        }


def _rate_limited_response(retry_after: float, headers: dict[str, str], *, scope: str, is_global: bool,
                           via: bool = True) -> web.Response:
    """A 429 exactly as discord.py needs it to retry: JSON body and a `Via` header (§9.2)."""
    hdrs = dict(headers)
    hdrs["Retry-After"] = str(max(1, math.ceil(retry_after)))
    hdrs["X-RateLimit-Scope"] = scope
    if is_global:
        hdrs["X-RateLimit-Global"] = "true"
    if via:
        hdrs["Via"] = "1.1 google"
    body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": is_global}
    return _json_response(body, status=429, headers=hdrs)


# ---------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------


@dataclass
class FakeUser:
    id: str
    username: str
    global_name: str | None = None
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "public_flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data


@dataclass
class FakeGuild:
    id: str
    name: str
    owner_id: str
    joined_at: float
    channel_ids: list[str] = field(default_factory=list)
    member_ids: list[str] = field(default_factory=list)


@dataclass
class FakeChannel:
    """A text channel (type 0), DM (type 1) or public thread (type 11)."""

    id: str
    type: int
    name: str | None = None
    guild_id: str | None = None
    parent_id: str | None = None
    recipient_id: str | None = None
    owner_id: str | None = None
    position: int = 0
    created_wall: float = 0.0
    bot_can_send: bool = True
    last_message_id: str | None = None
    message_count: int = 0

    @property
    def is_dm(self) -> bool:
        return self.type == CH_DM

    @property
    def is_thread(self) -> bool:
        return self.type == CH_PUBLIC_THREAD


BUTTON_STYLES = {1: "primary", 2: "secondary", 3: "success", 4: "danger", 5: "link", 6: "premium"}


@dataclass(frozen=True)
class SeenButton:
    """One button under a message, as a person sees it (`SeenMessage.buttons`).

    `style` is Discord's name for the style number (1 primary, 2 secondary, 3 success,
    4 danger, 5 link, 6 premium); `row` the action row it sits in (0-4).
    """

    label: str | None
    custom_id: str | None
    style: str
    row: int = 0
    url: str | None = None
    disabled: bool = False


@dataclass
class SeenMessage:
    """A message as a person in the channel sees it, with its history.

    `content` is what is shown now; `original_content` what was first posted; `edits`
    every content edit as (clock time, new content). `reference` is the replied-to
    message id; `allowed_mentions` and `flags` are as the sender sent them.
    Interaction responses appear here too (`interaction_id` set; ephemeral ones have the
    EPHEMERAL flag and are seen only by the invoking user; a deferred response shows the
    LOADING flag until its first edit). `components` are the action rows shown now;
    `buttons` reads them as `SeenButton`s and `component_versions` keeps every set of
    rows the message showed, first to last (an edit that leaves them alone adds none).
    """

    id: str
    channel_id: str
    guild_id: str | None
    author_id: str
    from_bot: bool
    content: str
    created_at: float
    created_wall: float
    original_content: str = ""
    edits: list[tuple[float, str]] = field(default_factory=list)
    deleted: bool = False
    deleted_at: float | None = None
    reference: str | None = None
    allowed_mentions: dict[str, Any] | None = None
    flags: int = 0
    nonce: str | None = None
    type: int = 0
    tts: bool = False
    embeds: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    mentions: list[str] = field(default_factory=list)
    reactions: list[str] = field(default_factory=list)
    interaction_id: str | None = None
    webhook_id: str | None = None
    edited_wall: float | None = None
    sticker_items: list[dict[str, Any]] = field(default_factory=list)
    component_versions: list[list[dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.component_versions:
            self.component_versions.append(list(self.components))

    @property
    def buttons(self) -> list[SeenButton]:
        """The buttons the message shows now, row by row, left to right."""
        return _buttons_of(self.components)

    @property
    def button_versions(self) -> list[list[SeenButton]]:
        """Every set of buttons the message showed, first to last (see `component_versions`)."""
        return [_buttons_of(rows) for rows in self.component_versions]

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    @property
    def versions(self) -> list[str]:
        """Every content the message showed, first to last."""
        return [self.original_content, *(text for _, text in self.edits)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _buttons_of(rows: list[dict[str, Any]]) -> list[SeenButton]:
    return [
        SeenButton(label=c.get("label"), custom_id=c.get("custom_id"),
                   style=BUTTON_STYLES.get(c.get("style"), str(c.get("style"))), row=i, url=c.get("url"),
                   disabled=bool(c.get("disabled")))
        for i, row in enumerate(rows) for c in row.get("components") or [] if c.get("type") == 2
    ]


@dataclass
class Upload:
    """A file a person attaches to a message (`user_says(..., attachments=[...])`).

    `data` None serves `size` filler bytes; `size` given with `data` is what Discord
    *reports* (to play a CDN that sends more than the message said). `duration_secs`
    and `waveform` (base64) are set on voice messages only.
    """

    data: bytes | None
    filename: str
    content_type: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None
    duration_secs: float | None = None
    waveform: str | None = None


@dataclass
class _CdnFile:
    attachment_id: str
    channel_id: str
    message_id: str | None
    filename: str
    content_type: str | None
    data: bytes | None
    size: int
    expires: int  # unix seconds, the `ex` of its URL
    signature: str
    available: bool = True

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.size


@dataclass
class FakeInteraction:
    """An interaction a user started, and what the bot did with it.

    `response_type` is the callback type the bot answered with (4 message, 5 deferred,
    6 deferred update, 7 update), `original` the `@original` message (its `edits` are the
    streamed edits), `followups` the follow-up messages, `rejected` the error codes the
    fake returned for this interaction (e.g. 10062 late ack, 40060 double ack).
    `callbacks` lists every callback the bot attempted, accepted or not, as
    (clock time, requested type, HTTP status): exactly one acknowledgement is
    `len(callbacks) == 1 and not rejected`.

    For a component interaction (`type` 3, a click: `message_id` and `custom_id` set),
    `@original` is the clicked message after a type 6/7 response and the new message
    after a type 4; `response_message` tells them apart, `replies` lists the messages the
    click produced (its type 4/5 response and its follow-ups) and `ephemeral_texts`
    what of them only the clicker saw.
    """

    id: str
    token: str
    type: int
    name: str | None
    options: dict[str, Any]
    channel_id: str
    guild_id: str | None
    user_id: str
    created_at: float
    payload: dict[str, Any]
    message_id: str | None = None  # component interactions: the message clicked
    response_type: int | None = None
    acked_at: float | None = None
    original: SeenMessage | None = None
    followups: list[SeenMessage] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    callbacks: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return self.response_type is not None

    @property
    def custom_id(self) -> str | None:
        """The clicked component's custom_id (component interactions only)."""
        return (self.payload.get("data") or {}).get("custom_id") if self.type == 3 else None

    @property
    def ack_delay(self) -> float | None:
        """Clock seconds from the interaction to its accepted acknowledgement."""
        return None if self.acked_at is None else self.acked_at - self.created_at

    @property
    def response_message(self) -> SeenMessage | None:
        """The message the initial response created (types 4 and 5), else None."""
        if self.response_type in (4, 5) and self.original is not None and self.original.interaction_id == self.id:
            return self.original
        return None

    @property
    def replies(self) -> list[SeenMessage]:
        """Messages this interaction produced: its type 4/5 response, then its follow-ups."""
        first = self.response_message
        return ([first] if first is not None else []) + list(self.followups)

    @property
    def ephemeral_texts(self) -> list[str]:
        """What this interaction's ephemeral replies say now (seen by the user alone)."""
        return [m.content for m in self.replies if m.ephemeral and not m.deleted]

    @property
    def deferred(self) -> bool:
        return self.response_type in (5, 6)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("original", "followups")}
        data["original"] = self.original.to_dict() if self.original else None
        data["followups"] = [m.to_dict() for m in self.followups]
        return data


@dataclass(slots=True)
class Call:
    """One REST call as the fake saw it. Times are `time.monotonic()`."""

    t_received: float
    method: str
    path: str  # relative to the API base, e.g. /channels/123/messages
    route: str | None  # e.g. "POST /channels/{channel_id}/messages"; None for unknown routes
    query: str
    json: Any
    channel_id: str | None
    t_responded: float | None = None
    status: int | None = None
    code: int | None = None  # Discord error code of an error response
    retry_after: float | None = None
    scope: str | None = None
    injected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class Injection:
    """A fault armed by `FakeDiscord.inject()`; `hits` counts the calls it affected."""

    kind: str
    method: str | None = None
    route: str | None = None
    channel_id: str | None = None
    times: int | None = 1
    start: float | None = None  # clock time from which it applies
    end: float | None = None  # clock time until which it applies
    retry_after: float | None = None
    status: int | None = None
    is_global: bool = False
    hold: float = 30.0
    hits: int = 0

    KINDS = ("5xx", "timeout", "timeout_after_apply", "drop", "drop_after_apply", "429", "429_no_via")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, call: Call, now: float) -> bool:
        if self.exhausted:
            return False
        if self.method and self.method.upper() != call.method:
            return False
        if self.route and call.route is not None:
            if self.route not in (call.route, call.route.split(" ", 1)[1]):
                return False
        elif self.route:
            return False
        if self.channel_id and self.channel_id != call.channel_id:
            return False
        if self.start is not None and now < self.start:
            return False
        if self.end is not None and now >= self.end:
            return False
        return True


class _Dropped(web.Response):
    """Marks a call whose connection the fake aborted instead of answering."""


@dataclass(frozen=True)
class _RouteSpec:
    key: str
    bucket: str  # see DiscordLimits.counter_for
    auth: bool = True
    global_limited: bool = True


# ---------------------------------------------------------------------------------------
# Gateway sessions (§4)
# ---------------------------------------------------------------------------------------


class _Connection:
    """One websocket connection; sends are serialised (zlib-stream needs strict order)."""

    def __init__(self, ws: web.WebSocketResponse, *, zlib_stream: bool) -> None:
        self.ws = ws
        self.cursor = 0  # last sequence number written to this connection
        self.session: GatewaySession | None = None
        self.writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._z = zlib.compressobj() if zlib_stream else None
        self.server_closed = False

    async def send(self, text: str) -> None:
        async with self._lock:
            if self.ws.closed:
                return
            if self._z is not None:
                data = self._z.compress(text.encode()) + self._z.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(data)
            else:
                await self.ws.send_str(text)

    async def send_json(self, obj: Any) -> None:
        await self.send(json.dumps(obj, separators=(",", ":")))


@dataclass
class GatewaySession:
    """A bot's Gateway session: survives disconnects until it closes or is invalidated.

    Dispatches are numbered and kept (bounded) so a RESUME can replay what was missed.
    """

    id: str
    intents: int
    shard: list[int] | None
    seq: int = 0
    frames: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=5000))
    connection: _Connection | None = None
    ready_seq: int = 0  # sequence of the last GUILD_CREATE of the READY burst
    delivered: int = 0  # last sequence written to any connection
    resumes: int = 0
    replayed: int = 0
    identified_at: float = field(default_factory=time.monotonic)
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.ws.closed

    @property
    def ready(self) -> bool:
        return self.ready_seq > 0 and self.delivered >= self.ready_seq

    def has(self, intent: int) -> bool:
        return bool(self.intents & intent)

    def push(self, event: str, data: Any, *, encoded: str | None = None) -> int:
        """Queue a dispatch; `encoded` is `data` already serialised (shared by sessions)."""
        self.seq += 1
        body = encoded if encoded is not None else json.dumps(data, separators=(",", ":"))
        self.frames.append((self.seq, f'{{"op":0,"t":"{event}","s":{self.seq},"d":{body}}}'))
        self.wake.set()
        return self.seq

    def frames_after(self, cursor: int) -> list[tuple[int, str]] | None:
        """Frames with s > cursor, or None if some were already trimmed."""
        if cursor >= self.seq:
            return []
        if not self.frames or self.frames[0][0] > cursor + 1:
            return None
        start = cursor + 1 - self.frames[0][0]
        return list(itertools.islice(self.frames, start, None))


T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------------------


class FakeDiscord:
    """A Discord REST API + Gateway on 127.0.0.1 that the real discord.py can log into."""

    def __init__(
        self,
        token: str = "fake-discord-token",
        *,
        limits: DiscordLimits | None = None,
        latency: float = 0.0,
        clock: Callable[[], float] | None = None,
        gateway_zlib: bool = False,
        heartbeat_interval: float = 41.25,
        privileged_intents: int = Intents.PRIVILEGED,
        bot_name: str = "fakebot",
        max_calls: int | None = None,
    ) -> None:
        """Create a stopped server.

        `clock` (default `time.monotonic`) drives the rate limiter, the interaction
        clocks and the timestamps in `messages()`/`typing_events()`; pass
        `tests.support.fakeclock.FakeClock().now` for deterministic tests. The call
        log always uses `time.monotonic()`. `max_calls` bounds `calls` to roughly the
        newest N records (benchmarks); `stats()` counts stay exact.
        """
        self.token = token
        self.max_calls = max_calls
        self.latency = float(latency)
        self.clock: Callable[[], float] = clock or time.monotonic
        self._limits = limits or DiscordLimits()
        self._limiter = RateLimiter(self._limits, self.clock)
        self.gateway_zlib = gateway_zlib
        self.heartbeat_interval = heartbeat_interval
        self.privileged_intents = privileged_intents

        self._snowflake = _Snowflakes()
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._stopping = asyncio.Event()
        self._gateway_gate = asyncio.Event()
        self._gateway_gate.set()
        self._change = asyncio.Event()
        self._version = 0

        self.calls: list[Call] = []
        self.unhandled: list[Call] = []
        self._status_counts: Counter[tuple[str | None, int]] = Counter()
        self._injections: list[Injection] = []

        self._users: dict[str, FakeUser] = {}
        self._guilds: dict[str, FakeGuild] = {}
        self._channels: dict[str, FakeChannel] = {}
        self._dms: dict[str, str] = {}
        self._messages: dict[str, SeenMessage] = {}
        self._by_channel: dict[str, list[SeenMessage]] = {}
        self._user_payloads: dict[str, dict[str, Any]] = {}  # message id -> MESSAGE_CREATE d
        self._typing: dict[str, list[float]] = {}
        self._nonces: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._interactions: dict[str, FakeInteraction] = {}
        self._by_token: dict[str, FakeInteraction] = {}
        self._commands: dict[str | None, dict[str, dict[str, Any]]] = {}
        self._sessions: dict[str, GatewaySession] = {}
        self._connections: set[_Connection] = set()
        self._cdn: dict[str, _CdnFile] = {}  # attachment id -> what the CDN serves
        self._cdn_secret = secrets.token_bytes(16)
        self.attachment_url_ttl = 24 * 3600.0  # seconds a signed attachment URL stays valid
        self.cdn_requests: list[tuple[float, str, int]] = []  # (monotonic, attachment id, status)
        self._cdn_failures: deque[int] = deque()  # statuses the next CDN fetches answer with
        self.cdn_latency = 0.0  # seconds the CDN holds each answer (on top of `latency`)
        self._cdn_release = asyncio.Event()  # set: held CDN answers go out now
        self.gateway_log: list[tuple[float, str, Any]] = []  # (monotonic, "op2"/"close 4004"/..., detail)

        self.bot_user = FakeUser(self._snowflake(), bot_name, bot=True)
        self._users[self.bot_user.id] = self.bot_user
        self.application_id = self.bot_user.id  # modern apps: application id == bot user id
        self.owner = self.user(username="owner")
        self.default_user = self.user(username="human", global_name="Human")
        self.default_guild = self.guild("Fake Guild", _dispatch=False)
        self.default_channel = self.text_channel(self.default_guild, "general", _dispatch=False)

        self._app = self._build_app()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeDiscord:
        """Listen on host:port (port 0 picks a free port); returns self."""
        self._stopping.clear()
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self._host, self._port = sockets[0].getsockname()[:2]
        return self

    async def stop(self) -> None:
        """Close every Gateway connection (1001) and the HTTP server; releases held calls."""
        self._stopping.set()
        self._gateway_gate.set()
        for conn in list(self._connections):
            conn.server_closed = True
            await conn.ws.close(code=1001, message=b"going away")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self._host}:{self._port}/gateway"

    @property
    def limits(self) -> DiscordLimits:
        return self._limits

    @limits.setter
    def limits(self, value: DiscordLimits) -> None:
        self._limits = value
        self._limiter.limits = value

    # -- state changes and waiting ----------------------------------------------------

    def _changed(self) -> None:
        self._version += 1
        event, self._change = self._change, asyncio.Event()
        event.set()

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0, *, what: str | None = None,
                       poll: float = 0.02) -> T:
        """Wait until `predicate()` is truthy; return its value.

        The predicate is re-checked on every state change of the fake (a call, a
        dispatch written to a bot, a world change) and, because it may also read state
        the fake cannot see (what a bot recorded after handling a dispatch), at least
        every `poll` seconds. Raises TimeoutError naming the condition and summarising
        the fake's state.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._change
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                name = what or getattr(predicate, "__name__", repr(predicate))
                raise TimeoutError(f"FakeDiscord.wait_for: {name} not true after {timeout}s; {self.describe()}")
            try:
                await asyncio.wait_for(event.wait(), min(remaining, poll))
            except asyncio.TimeoutError:
                pass

    async def wait_ready(self, timeout: float = 5.0) -> GatewaySession:
        """Wait until a bot completed IDENTIFY and was sent READY plus its GUILD_CREATEs."""

        def ready_session() -> GatewaySession | None:
            return next((s for s in self._sessions.values() if s.ready and s.connected and not s.closed), None)

        return await self.wait_for(ready_session, timeout, what="a Gateway session got READY")

    def describe(self) -> str:
        """A one-line summary of the fake's state for failure messages."""
        msgs = {cid: len(lst) for cid, lst in self._by_channel.items() if lst}
        last = [f"{c.method} {c.path} -> {c.status}" for c in self.calls[-5:]]
        sess = [f"{s.id[:6]}(seq={s.seq},delivered={s.delivered},connected={s.connected})"
                for s in self._sessions.values() if not s.closed]
        return f"messages per channel={msgs}; last calls={last}; sessions={sess}"

    # -- world ------------------------------------------------------------------------

    def user(self, id: str | int | None = None, username: str | None = None, *, bot: bool = False,
             global_name: str | None = None) -> FakeUser:
        """Create (or return the existing) user."""
        uid = str(id) if id is not None else self._snowflake()
        if uid in self._users:
            return self._users[uid]
        u = FakeUser(uid, username or f"user{uid[-4:]}", global_name, bot)
        self._users[uid] = u
        return u

    def guild(self, name: str = "Guild", *, id: str | int | None = None, _dispatch: bool = True) -> FakeGuild:
        """Create a guild the bot is in (GUILD_CREATE to connected bots)."""
        gid = str(id) if id is not None else self._snowflake()
        g = FakeGuild(gid, name, self.owner.id, time.time(), member_ids=[self.bot_user.id, self.owner.id])
        self._guilds[gid] = g
        if _dispatch:
            self._dispatch("GUILD_CREATE", self._guild_payload(g), intent=Intents.GUILDS)
        self._changed()
        return g

    def text_channel(self, guild: FakeGuild | str | int | None = None, name: str = "general", *,
                     id: str | int | None = None, _dispatch: bool = True) -> FakeChannel:
        """Create a text channel (CHANNEL_CREATE to connected bots)."""
        g = self._guild(guild)
        cid = str(id) if id is not None else self._snowflake()
        ch = FakeChannel(cid, CH_TEXT, name, g.id, position=len(g.channel_ids), created_wall=time.time())
        self._channels[cid] = ch
        g.channel_ids.append(cid)
        if _dispatch:
            self._dispatch("CHANNEL_CREATE", self._channel_payload(ch), intent=Intents.GUILDS)
        self._changed()
        return ch

    def thread(self, channel: FakeChannel | str | int | None = None, name: str = "thread", *,
               id: str | int | None = None, owner: FakeUser | str | int | None = None) -> FakeChannel:
        """Create an active public thread under a text channel (THREAD_CREATE)."""
        parent = self._channel(channel if channel is not None else self.default_channel)
        if parent.type != CH_TEXT:
            raise ValueError("threads live under guild text channels")
        tid = str(id) if id is not None else self._snowflake()
        owner_id = _id(owner) if owner is not None else self.default_user.id
        th = FakeChannel(tid, CH_PUBLIC_THREAD, name, parent.guild_id, parent_id=parent.id, owner_id=owner_id,
                         created_wall=time.time())
        self._channels[tid] = th
        payload = self._channel_payload(th)
        payload["newly_created"] = True
        self._dispatch("THREAD_CREATE", payload, intent=Intents.GUILDS)
        self._changed()
        return th

    def dm_channel(self, user: FakeUser | str | int | None = None) -> FakeChannel:
        """The DM channel between `user` and the bot (created on first use, no event)."""
        u = self._user(user)
        cid = self._dms.get(u.id)
        if cid is None:
            cid = self._snowflake()
            self._channels[cid] = FakeChannel(cid, CH_DM, None, recipient_id=u.id, created_wall=time.time())
            self._dms[u.id] = cid
        return self._channels[cid]

    def revoke_send(self, channel: FakeChannel | str | int, allowed: bool = False) -> None:
        """Take away (or give back) the bot's permission to post in a channel (403 50013)."""
        self._channel(channel).bot_can_send = allowed

    def _guild(self, guild: Any) -> FakeGuild:
        if guild is None:
            return self.default_guild
        gid = _id(guild)
        try:
            return self._guilds[gid]
        except KeyError:
            raise KeyError(f"unknown guild {gid}") from None

    def _channel(self, channel: Any) -> FakeChannel:
        if channel is None:
            return self.default_channel
        cid = _id(channel)
        try:
            return self._channels[cid]
        except KeyError:
            raise KeyError(f"unknown channel {cid}") from None

    def _user(self, user: Any) -> FakeUser:
        if user is None:
            return self.default_user
        uid = _id(user)
        return self._users.get(uid) or self.user(uid)

    def channel(self, channel_id: str | int) -> FakeChannel:
        return self._channel(channel_id)

    # -- payloads ---------------------------------------------------------------------

    def _member_payload(self, guild: FakeGuild, user_id: str, *, with_user: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [],
            "joined_at": _iso(guild.joined_at),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "premium_since": None,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self._users[user_id].payload()
        return data

    def _channel_payload(self, ch: FakeChannel) -> dict[str, Any]:
        if ch.is_dm:
            return {"id": ch.id, "type": CH_DM, "last_message_id": ch.last_message_id, "flags": 0,
                    "recipients": [self._users[ch.recipient_id].payload()] if ch.recipient_id else []}
        data: dict[str, Any] = {
            "id": ch.id,
            "type": ch.type,
            "guild_id": ch.guild_id,
            "name": ch.name,
            "last_message_id": ch.last_message_id,
            "rate_limit_per_user": 0,
            "flags": 0,
            "nsfw": False,
        }
        if ch.is_thread:
            data.update(
                parent_id=ch.parent_id,
                owner_id=ch.owner_id,
                message_count=ch.message_count,
                total_message_sent=ch.message_count,
                member_count=2,
                thread_metadata={
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": _iso(ch.created_wall),
                    "locked": False,
                    "create_timestamp": _iso(ch.created_wall),
                },
            )
        else:
            data.update(position=ch.position, permission_overwrites=[], parent_id=None, topic=None)
        return data

    def _guild_payload(self, g: FakeGuild) -> dict[str, Any]:
        channels = [self._channel_payload(self._channels[c]) for c in g.channel_ids]
        threads = [self._channel_payload(c) for c in self._channels.values() if c.is_thread and c.guild_id == g.id]
        members = [self._member_payload(g, uid, with_user=True) for uid in g.member_ids]
        return {
            "id": g.id,
            "name": g.name,
            "icon": None,
            "owner_id": g.owner_id,
            "unavailable": False,
            "joined_at": _iso(g.joined_at),
            "large": False,
            "member_count": len(members),  # == len(members): discord.py never waits for chunks (§4.2)
            "members": members,
            "channels": channels,
            "threads": threads,
            "roles": [{"id": g.id, "name": "@everyone", "permissions": ALL_PERMISSIONS, "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "system_channel_id": None,
        }

    def _message_payload(self, m: SeenMessage, *, gateway: bool, depth: int = 0) -> dict[str, Any]:
        author = self._users[m.author_id]
        data: dict[str, Any] = {
            "id": m.id,
            "type": m.type,
            "channel_id": m.channel_id,
            "author": author.payload(),
            "content": m.content,
            "timestamp": _iso(m.created_wall),
            "edited_timestamp": _iso(m.edited_wall) if m.edited_wall else None,
            "tts": m.tts,
            "mention_everyone": False,
            "mentions": [self._users[u].payload() for u in m.mentions if u in self._users],
            "mention_roles": [],
            "attachments": m.attachments,
            "embeds": m.embeds,
            "pinned": False,
            "flags": m.flags,
            "components": m.components,
        }
        if m.sticker_items:
            data["sticker_items"] = m.sticker_items
        if m.nonce is not None:
            data["nonce"] = m.nonce
        if m.webhook_id:
            data["webhook_id"] = m.webhook_id
            data["application_id"] = self.application_id
        if m.interaction_id:
            inter = self._interactions.get(m.interaction_id)
            if inter is not None:
                data["interaction_metadata"] = {
                    "id": inter.id, "type": inter.type, "user": self._users[inter.user_id].payload(),
                    "authorizing_integration_owners": {"0": inter.guild_id} if inter.guild_id else {"1": inter.user_id},
                }
        if m.reference:
            data["message_reference"] = {"type": 0, "message_id": m.reference, "channel_id": m.channel_id}
            if m.guild_id:
                data["message_reference"]["guild_id"] = m.guild_id
            if depth == 0:
                ref = self._messages.get(m.reference)
                data["referenced_message"] = (
                    None if ref is None or ref.deleted else self._message_payload(ref, gateway=False, depth=1)
                )
        if gateway and m.guild_id:
            data["guild_id"] = m.guild_id
            data["member"] = self._member_payload(self._guilds[m.guild_id], m.author_id, with_user=False)
        return data

    # -- dispatch ---------------------------------------------------------------------

    def _dispatch(self, event: str, data: dict[str, Any], *, intent: int | None = None,
                  content_visible: Callable[[GatewaySession], bool] | None = None) -> None:
        """Queue a dispatch on every live (or resumable) session that should receive it.

        `content_visible(session)` False strips content/embeds/attachments/components,
        as Discord does without the MESSAGE_CONTENT intent (§5.1).
        """
        encoded: str | None = None
        stripped: str | None = None
        for s in self._sessions.values():
            if s.closed or (intent is not None and not s.has(intent)):
                continue
            if content_visible is not None and not content_visible(s):
                if stripped is None:
                    bare = dict(data, content="", embeds=[], attachments=[], components=[])
                    bare.pop("poll", None)
                    stripped = json.dumps(bare, separators=(",", ":"))
                s.push(event, None, encoded=stripped)
            else:
                if encoded is None:
                    encoded = json.dumps(data, separators=(",", ":"))
                s.push(event, None, encoded=encoded)

    def _dispatch_message(self, event: str, m: SeenMessage, payload: dict[str, Any]) -> None:
        ch = self._channels[m.channel_id]
        intent = Intents.DIRECT_MESSAGES if ch.is_dm else Intents.GUILD_MESSAGES
        mentions_bot = self.bot_user.id in m.mentions

        def visible(s: GatewaySession) -> bool:
            return s.has(Intents.MESSAGE_CONTENT) or ch.is_dm or mentions_bot or m.from_bot

        self._dispatch(event, payload, intent=intent, content_visible=visible)

    # -- people acting ----------------------------------------------------------------

    def _new_message(self, ch: FakeChannel, author: FakeUser, content: str, **kw: Any) -> SeenMessage:
        now = self.clock()
        wall = time.time()
        m = SeenMessage(
            id=self._snowflake(), channel_id=ch.id, guild_id=ch.guild_id, author_id=author.id,
            from_bot=author.id == self.bot_user.id, content=content, created_at=now, created_wall=wall,
            original_content=content, **kw,
        )
        self._messages[m.id] = m
        self._by_channel.setdefault(ch.id, []).append(m)
        ch.last_message_id = m.id
        ch.message_count += 1
        return m

    def _mentions_in(self, content: str) -> list[str]:
        seen: list[str] = []
        for uid in _MENTION_RE.findall(content):
            if uid in self._users and uid not in seen:
                seen.append(uid)
        return seen

    def user_says(self, channel: Any, user: Any, content: str, *, reply_to: Any = None,
                  mentions_bot: bool = False, reply_ping: bool = True, attachments: Iterable[Upload] = (),
                  flags: int = 0, sticker_items: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """A person posts `content`; MESSAGE_CREATE goes to every connected bot.

        `mentions_bot=True` prefixes `<@BOTID>` unless the content already mentions the
        bot. A reply (`reply_to`, a message id) carries `message_reference` and
        `referenced_message`, and by default pings the replied-to author (so a reply to
        the bot counts as mentioning it); `reply_ping=False` is a reply with the client's
        "@ mention" toggle turned off: the author is not added to `mentions`. Returns the
        full Gateway payload (before any MESSAGE_CONTENT stripping). `attachments` are
        files served by the fake's CDN (see `Upload`); `content` may then be empty.
        """
        ch = self._channel(channel)
        u = self._user(user)
        if mentions_bot and f"<@{self.bot_user.id}>" not in content and f"<@!{self.bot_user.id}>" not in content:
            content = f"<@{self.bot_user.id}> {content}"
        mentions = self._mentions_in(content)
        ref_id = _id(reply_to) if reply_to is not None else None
        if ref_id is not None:
            ref = self._messages.get(ref_id)
            if ref is None:
                raise KeyError(f"unknown message {ref_id}")
            if reply_ping and ref.author_id not in mentions:
                mentions.append(ref.author_id)
        if ch.guild_id:
            g = self._guilds[ch.guild_id]
            if u.id not in g.member_ids:
                g.member_ids.append(u.id)
        m = self._new_message(ch, u, content, reference=ref_id, mentions=mentions, type=19 if ref_id else 0,
                              flags=flags, sticker_items=[dict(item) for item in sticker_items])
        m.attachments = [self._cdn_attachment(m, upload) for upload in attachments]
        payload = self._message_payload(m, gateway=True)
        self._user_payloads[m.id] = payload
        self._dispatch_message("MESSAGE_CREATE", m, payload)
        self._changed()
        return payload

    def user_sends_voice(self, channel: Any, user: Any, data: bytes | None = None, *, duration: float = 3.0,
                         size: int | None = None, waveform: str | None = None) -> dict[str, Any]:
        """A person records a voice message: no content, the IS_VOICE_MESSAGE flag, one
        `voice-message.ogg` attachment (audio/ogg) with `duration_secs` and a base64
        `waveform` [dc-doc message.mdx: message flags, attachment object]."""
        if waveform is None:
            waveform = base64.b64encode(bytes((i * 37) % 256 for i in range(64))).decode()
        upload = Upload(data, "voice-message.ogg", "audio/ogg", size=size, duration_secs=duration, waveform=waveform)
        return self.user_says(channel, user, "", attachments=[upload], flags=FLAG_IS_VOICE_MESSAGE)

    def user_sends_sticker(self, channel: Any, user: Any, name: str = "Wave", *,
                           format_type: int = 1) -> dict[str, Any]:
        """A person sends a sticker: no content, one `sticker_items` entry (format 1 PNG,
        2 APNG, 3 Lottie, 4 GIF) [dc-doc sticker.mdx]."""
        item = {"id": self._snowflake(), "name": name, "format_type": format_type}
        return self.user_says(channel, user, "", sticker_items=[item])

    def _cdn_attachment(self, m: SeenMessage, upload: Upload) -> dict[str, Any]:
        """Keep `upload` on the CDN; its attachment object, with a signed URL to the fake."""
        aid = self._snowflake()
        issued = int(time.time())
        expires = issued + int(self.attachment_url_ttl)
        signature = self._sign(m.channel_id, aid, upload.filename, expires, issued)
        size = upload.size if upload.size is not None else len(upload.data or b"")
        self._cdn[aid] = _CdnFile(aid, m.channel_id, m.id, upload.filename, upload.content_type, upload.data, size,
                                  expires, signature)
        path = f"/attachments/{m.channel_id}/{aid}/{upload.filename}?ex={expires:x}&is={issued:x}&hm={signature}&"
        data: dict[str, Any] = {"id": aid, "filename": upload.filename, "size": size, "url": self.base_url + path,
                                "proxy_url": f"{self.base_url}/media{path}", "flags": 0}
        if upload.content_type is not None:
            data["content_type"] = upload.content_type
        if upload.width is not None and upload.height is not None:
            data["width"], data["height"] = upload.width, upload.height
        if upload.duration_secs is not None:
            data["duration_secs"] = upload.duration_secs
        if upload.waveform is not None:
            data["waveform"] = upload.waveform
        return data

    def _sign(self, channel_id: str, attachment_id: str, filename: str, expires: int, issued: int) -> str:
        message = f"{channel_id}/{attachment_id}/{filename}:{expires:x}:{issued:x}".encode()
        return hmac.new(self._cdn_secret, message, hashlib.sha256).hexdigest()

    def expire_attachment(self, attachment_id: Any) -> None:
        """The attachment's signed URL has expired: the CDN answers 404 from now on."""
        self._cdn[_id(attachment_id)].expires = 0

    def fail_cdn(self, status: int = 502, times: int = 1) -> None:
        """The next `times` CDN fetches answer `status` (a bad gateway in front of the CDN)."""
        self._cdn_failures.extend([status] * times)

    def release_cdn(self) -> None:
        """Answer the CDN fetches being held by `cdn_latency` now, and stop holding new ones."""
        self.cdn_latency = 0.0
        self._cdn_release.set()
        self._cdn_release = asyncio.Event()

    def cdn_file(self, attachment_id: Any) -> _CdnFile:
        """What the CDN keeps for an attachment (its data, size, availability)."""
        return self._cdn[_id(attachment_id)]

    async def _serve_cdn(self, request: web.Request) -> web.StreamResponse:
        """`GET /attachments/{channel}/{attachment}/{filename}` (and `/media/...`, the proxy)."""
        aid = request.match_info["attachment_id"]
        file = self._cdn.get(aid)
        status = 200
        try:
            ex, issued = int(request.query.get("ex", ""), 16), int(request.query.get("is", ""), 16)
        except ValueError:
            ex = issued = -1
        if (
            file is None or not file.available or file.channel_id != request.match_info["channel_id"]
            or file.filename != request.match_info["filename"] or ex != file.expires or time.time() >= ex
            or not hmac.compare_digest(request.query.get("hm", ""), self._sign(file.channel_id, aid, file.filename,
                                                                               ex, issued))
        ):
            status = 404
        if status == 200 and self._cdn_failures:
            status = self._cdn_failures.popleft()
        self.cdn_requests.append((time.monotonic(), aid, status))
        self._changed()
        if self.latency + self.cdn_latency > 0:
            release = self._cdn_release
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), self.latency + self.cdn_latency)
        if status == 404 or file is None:
            return web.Response(status=404, text=CDN_GONE)
        if status != 200:
            return web.Response(status=status, text=f"{status} error")
        response = web.StreamResponse(headers={"Content-Type": file.content_type or "application/octet-stream"})
        response.content_length = file.length
        await response.prepare(request)
        chunk = 64 * 1024
        for start in range(0, file.length, chunk):
            end = min(file.length, start + chunk)
            await response.write(file.data[start:end] if file.data is not None else bytes(end - start))
        await response.write_eof()
        return response

    def redeliver(self, message_id: Any) -> dict[str, Any]:
        """Dispatch a person's MESSAGE_CREATE again, same id (to test de-duplication)."""
        mid = _id(message_id)
        payload = self._user_payloads[mid]
        self._dispatch_message("MESSAGE_CREATE", self._messages[mid], payload)
        self._changed()
        return payload

    def user_edits(self, channel: Any, message_id: Any, content: str) -> dict[str, Any]:
        """A person edits their message (MESSAGE_UPDATE)."""
        m = self._messages[_id(message_id)]
        if m.channel_id != self._channel(channel).id:
            raise KeyError("message is not in that channel")
        self._apply_edit(m, content)
        payload = self._message_payload(m, gateway=True)
        self._user_payloads[m.id] = payload
        self._dispatch_message("MESSAGE_UPDATE", m, payload)
        self._changed()
        return payload

    def user_deletes(self, channel: Any, message_id: Any) -> None:
        """A person (or a moderator) deletes a message (MESSAGE_DELETE)."""
        ch = self._channel(channel)
        m = self._messages[_id(message_id)]
        if m.channel_id != ch.id:
            raise KeyError("message is not in that channel")
        self._delete(m)
        self._changed()

    def _apply_edit(self, m: SeenMessage, content: str) -> None:
        m.content = content
        m.edits.append((self.clock(), content))
        m.edited_wall = time.time()
        m.mentions = self._mentions_in(content)

    def _delete(self, m: SeenMessage) -> None:
        m.deleted = True
        m.deleted_at = self.clock()
        for attachment in m.attachments:  # a deleted message's files leave the CDN with it
            if attachment["id"] in self._cdn:
                self._cdn[attachment["id"]].available = False
        data: dict[str, Any] = {"id": m.id, "channel_id": m.channel_id}
        if m.guild_id:
            data["guild_id"] = m.guild_id
        ch = self._channels[m.channel_id]
        self._dispatch("MESSAGE_DELETE", data, intent=Intents.DIRECT_MESSAGES if ch.is_dm else Intents.GUILD_MESSAGES)

    def _option_payload(self, command: dict[str, Any] | None, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        declared = {o["name"]: o.get("type", 3) for o in (command or {}).get("options", []) or []}
        result = []
        for name, value in options.items():
            if name in declared:
                otype = declared[name]
            elif isinstance(value, bool):
                otype = 5
            elif isinstance(value, int):
                otype = 4
            elif isinstance(value, float):
                otype = 10
            else:
                otype = 3
            result.append({"name": name, "type": otype, "value": value})
        return result

    def _interaction_base(self, itype: int, ch: FakeChannel, u: FakeUser) -> dict[str, Any]:
        iid, token = self._snowflake(), "itok_" + secrets.token_urlsafe(24)
        data: dict[str, Any] = {
            "id": iid,
            "application_id": self.application_id,
            "type": itype,
            "token": token,
            "version": 1,
            "channel_id": ch.id,
            "channel": self._channel_payload(ch),
            "app_permissions": ALL_PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 26214400,  # hard-required by discord.py (§5.3)
        }
        if ch.guild_id:
            g = self._guilds[ch.guild_id]
            if u.id not in g.member_ids:
                g.member_ids.append(u.id)
            member = self._member_payload(g, u.id, with_user=True)
            member["permissions"] = ALL_PERMISSIONS
            data.update(guild_id=ch.guild_id, member=member, guild_locale="en-US", context=0,
                        authorizing_integration_owners={"0": ch.guild_id})
        else:
            data.update(user=u.payload(), context=1, authorizing_integration_owners={"0": u.id})
        return data

    def _register_interaction(self, payload: dict[str, Any], *, name: str | None, options: Mapping[str, Any],
                              ch: FakeChannel, u: FakeUser, message_id: str | None = None) -> FakeInteraction:
        rec = FakeInteraction(
            id=payload["id"], token=payload["token"], type=payload["type"], name=name, options=dict(options),
            channel_id=ch.id, guild_id=ch.guild_id, user_id=u.id, created_at=self.clock(), payload=payload,
            message_id=message_id,
        )
        self._interactions[rec.id] = rec
        self._by_token[rec.token] = rec
        self._dispatch("INTERACTION_CREATE", payload)  # not tied to an intent
        self._changed()
        return rec

    def user_runs_command(self, channel: Any, user: Any, name: str,
                          options: Mapping[str, Any] | None = None) -> FakeInteraction:
        """A person runs `/name` with options; INTERACTION_CREATE (type 2) to connected bots.

        Option types come from the command the bot registered (`tree.sync()`), else from
        the Python type of each value (str 3, int 4, bool 5, float 10). The returned
        record fills in as the bot acknowledges (3 s clock), edits `@original` and sends
        follow-ups (15 min token).
        """
        ch = self._channel(channel)
        u = self._user(user)
        options = options or {}
        command = None
        guild_scoped = False
        if ch.guild_id and name in self._commands.get(ch.guild_id, {}):
            command, guild_scoped = self._commands[ch.guild_id][name], True
        elif name in self._commands.get(None, {}):
            command = self._commands[None][name]
        payload = self._interaction_base(2, ch, u)
        data: dict[str, Any] = {
            "id": command["id"] if command else self._snowflake(),
            "name": name,
            "type": 1,
            "options": self._option_payload(command, options),
        }
        if guild_scoped:
            data["guild_id"] = ch.guild_id
        payload["data"] = data
        return self._register_interaction(payload, name=name, options=options, ch=ch, u=u)

    def user_clicks(self, channel: Any, user: Any, message_id: Any, custom_id: str, *,
                    component_type: int = 2, check: bool = True) -> FakeInteraction:
        """A person clicks a component (button) on a message; INTERACTION_CREATE type 3.

        People click what they see: with `check` (the default) the message must be in
        `channel`, not deleted, visible to `user` (`visible_to`) and show an enabled
        button with this `custom_id`, else ValueError. `check=False` plays a client that
        still shows buttons the bot has removed since. The returned record fills in as
        the bot answers: `response_type` (4 message, 6 deferred update, 7 update),
        `ephemeral_texts`, `followups`, `callbacks` -- within the 3 s acknowledgement
        clock (10062 after) and the 15 min token.
        """
        ch = self._channel(channel)
        u = self._user(user)
        m = self._messages[_id(message_id)]
        if check:
            if m.channel_id != ch.id or m.deleted or not self.visible_to(m, u):
                raise ValueError(f"{u.username} cannot see message {m.id} in channel {ch.id}")
            if not any(b.custom_id == custom_id and not b.disabled for b in m.buttons):
                shown = [b.custom_id for b in m.buttons]
                raise ValueError(f"message {m.id} shows no enabled button {custom_id!r} (it shows {shown})")
        payload = self._interaction_base(3, ch, u)
        payload["message"] = self._message_payload(m, gateway=False)
        payload["data"] = {"custom_id": custom_id, "component_type": component_type}
        return self._register_interaction(payload, name=None, options={}, ch=ch, u=u, message_id=m.id)

    # -- the channel as a person sees it ----------------------------------------------

    def messages(self, channel: Any) -> list[SeenMessage]:
        """Every message in the channel, oldest first, including deleted ones (flagged)."""
        return list(self._by_channel.get(_id(channel), ()))

    def message(self, message_id: Any) -> SeenMessage:
        return self._messages[_id(message_id)]

    def buttons(self, message_id: Any) -> list[SeenButton]:
        """The buttons a message shows now (`SeenMessage.buttons`)."""
        return self.message(message_id).buttons

    def visible_to(self, message: SeenMessage | Any, user: Any) -> bool:
        """Whether `user` sees the message: everyone sees a normal one; an ephemeral one
        only the user whose interaction it answers."""
        m = message if isinstance(message, SeenMessage) else self.message(message)
        if m.deleted:
            return False
        if not m.ephemeral:
            return True
        inter = self._interactions.get(m.interaction_id or "")
        return inter is not None and inter.user_id == self._user(user).id

    def messages_seen_by(self, channel: Any, user: Any) -> list[SeenMessage]:
        """The channel as `user` sees it now: not deleted, ephemeral ones only if theirs."""
        return [m for m in self.messages(channel) if self.visible_to(m, user)]

    def bot_texts(self, channel: Any) -> list[str]:
        """What the bot's visible (not deleted) messages in the channel say now."""
        return [m.content for m in self._by_channel.get(_id(channel), ()) if m.from_bot and not m.deleted]

    def typing_events(self, channel: Any) -> list[float]:
        """Clock times at which the bot triggered the typing indicator in the channel."""
        return list(self._typing.get(_id(channel), ()))

    def interaction(self, interaction_id: Any) -> FakeInteraction:
        return self._interactions[_id(interaction_id)]

    @property
    def interactions(self) -> list[FakeInteraction]:
        return list(self._interactions.values())

    @property
    def sessions(self) -> list[GatewaySession]:
        return list(self._sessions.values())

    def commands(self, guild: Any = None) -> list[dict[str, Any]]:
        """Application commands the bot registered (global, or for a guild)."""
        return list(self._commands.get(_id(guild) if guild is not None else None, {}).values())

    # -- call log ---------------------------------------------------------------------

    def calls_to(self, route: str | None = None, *, method: str | None = None,
                 channel_id: Any = None) -> list[Call]:
        """Calls matching a route key (or template without method), method and channel."""
        cid = _id(channel_id) if channel_id is not None else None
        out = []
        for c in self.calls:
            if route is not None and (c.route is None or route not in (c.route, c.route.split(" ", 1)[1])):
                continue
            if method is not None and c.method != method.upper():
                continue
            if cid is not None and c.channel_id != cid:
                continue
            out.append(c)
        return out

    def count_429(self, route: str | None = None, *, method: str | None = None, channel_id: Any = None) -> int:
        """How many 429s the fake answered (optionally for one route/method/channel)."""
        return sum(1 for c in self.calls_to(route, method=method, channel_id=channel_id) if c.status == 429)

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks: calls per route and status, 429s, sessions."""
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), n in self._status_counts.items():
            by_route.setdefault(route or "<unknown>", {})[str(status)] = n
        return {
            "calls": len(self.calls),
            "count_429": sum(n for (_, st), n in self._status_counts.items() if st == 429),
            "by_route": by_route,
            "messages": len(self._messages),
            "sessions": [{"id": s.id, "seq": s.seq, "connected": s.connected, "ready": s.ready,
                          "resumes": s.resumes, "closed": s.closed} for s in self._sessions.values()],
            "interactions": len(self._interactions),
        }

    def reset(self) -> None:
        """Forget messages (and their files), calls, typing, interactions, injections and limiter state.

        The world (users, guilds, channels), registered commands and Gateway sessions stay.
        """
        self.calls.clear()
        self.unhandled.clear()
        self._status_counts.clear()
        self._injections.clear()
        self._messages.clear()
        self._by_channel.clear()
        self._user_payloads.clear()
        self._typing.clear()
        self._nonces.clear()
        self._interactions.clear()
        self._by_token.clear()
        self._cdn.clear()
        self.cdn_requests.clear()
        self._limiter.reset()
        self._changed()

    # -- fault injection --------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        method: str | None = None,
        route: str | None = None,
        channel_id: Any = None,
        times: int | None = 1,
        start: float | None = None,
        end: float | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        is_global: bool = False,
        hold: float = 30.0,
    ) -> Injection:
        """Arm a fault for matching REST calls; returns the `Injection` (see `.hits`).

        Kinds:
        - `"5xx"`: answer `status` (default 500) without acting. discord.py itself retries
          500/502/504/524 (sleeping 1 + 2·try s), raises `DiscordServerError` for others.
        - `"timeout"`: do not act, hold the request `hold` s (default 30, cut short by
          `stop()`), then drop the connection. discord.py sets no request timeout of its
          own (aiohttp's default is 5 min), so the caller's timeout decides.
        - `"timeout_after_apply"`: act, then hold and drop (the action happened).
        - `"drop"`: close the connection without acting or answering.
        - `"drop_after_apply"`: act (the message exists), then close without answering:
          the ambiguous outcome an exactly-once sender must reconcile.
        - `"429"`: a rate-limit answer with `Via` (discord.py sleeps `retry_after`, default
          0.1 s, and retries); `is_global=True` makes it a global limit.
        - `"429_no_via"`: a Cloudflare-style 429 (text body, no `Via`): discord.py raises
          `HTTPException` at once.

        `route` is a route key like `fakes.discord.SEND` or a template without method;
        `start`/`end` are offsets in seconds from now on the fake's clock; `times=None`
        means every matching call.
        """
        if kind not in Injection.KINDS:
            raise ValueError(f"unknown injection kind {kind!r}; expected one of {Injection.KINDS}")
        now = self.clock()
        inj = Injection(
            kind=kind, method=method, route=route, channel_id=_id(channel_id) if channel_id is not None else None,
            times=times, start=None if start is None else now + start, end=None if end is None else now + end,
            retry_after=retry_after, status=status, is_global=is_global, hold=hold,
        )
        self._injections.append(inj)
        return inj

    def clear_injections(self) -> None:
        self._injections.clear()

    def _take_injection(self, call: Call) -> Injection | None:
        now = self.clock()
        for inj in self._injections:
            if inj.matches(call, now):
                inj.hits += 1
                return inj
        return None

    # -- Gateway knobs ----------------------------------------------------------------

    async def disconnect_gateway(self, code: int = 4000, *, hold: bool = False) -> None:
        """Close every bot's Gateway connection with `code` (sessions stay resumable).

        discord.py reconnects to `resume_gateway_url` and RESUMEs; the fake replays what
        it missed, then RESUMED. With `hold=True` new connections wait (no HELLO) until
        `release_gateway()`, so a test can dispatch events while the bot is away.
        Codes 4007 and 4009 also invalidate the sessions (the RESUME gets op 9 false).
        """
        if hold:
            self._gateway_gate.clear()
        for conn in list(self._connections):
            if conn.session is not None and code in (4007, 4009):
                conn.session.closed = True
            conn.server_closed = True
            await conn.ws.close(code=code, message=b"fake disconnect")
        self._changed()

    def release_gateway(self) -> None:
        """Let held Gateway connections proceed (see `disconnect_gateway(hold=True)`)."""
        self._gateway_gate.set()

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION to connected bots (`d: false` → they IDENTIFY anew)."""
        for conn in list(self._connections):
            if conn.session is not None and not resumable:
                conn.session.closed = True
            await conn.send_json({"op": 9, "d": resumable, "s": None, "t": None})
        self._changed()

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: bots close and RESUME."""
        for conn in list(self._connections):
            await conn.send_json({"op": 7, "d": None, "s": None, "t": None})

    # -- HTTP app ---------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=32 * 1024 * 1024)
        self._specs: dict[Any, _RouteSpec] = {}

        def add(method: str, template: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                bucket: str = "default", *, auth: bool = True, global_limited: bool = True) -> None:
            route = app.router.add_route(method, API_PREFIX + template, handler)
            self._specs[route] = _RouteSpec(f"{method} {template}", bucket, auth, global_limited)

        add("GET", "/users/@me", self._h_me)
        add("GET", "/oauth2/applications/@me", self._h_application)
        add("GET", "/applications/@me", self._h_application)
        add("GET", "/gateway", self._h_gateway, auth=False)
        add("GET", "/gateway/bot", self._h_gateway_bot)
        add("POST", "/users/@me/channels", self._h_create_dm)
        add("GET", "/channels/{channel_id}", self._h_get_channel)
        add("GET", "/channels/{channel_id}/messages", self._h_history)
        add("POST", "/channels/{channel_id}/messages", self._h_send, "messages")
        add("GET", "/channels/{channel_id}/messages/{message_id}", self._h_get_message)
        add("PATCH", "/channels/{channel_id}/messages/{message_id}", self._h_edit, "edits")
        add("DELETE", "/channels/{channel_id}/messages/{message_id}", self._h_delete, "deletes")
        add("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._h_react)
        add("POST", "/channels/{channel_id}/typing", self._h_typing, "typing")
        add("GET", "/applications/{application_id}/commands", self._h_get_commands)
        add("PUT", "/applications/{application_id}/commands", self._h_put_commands)
        add("GET", "/applications/{application_id}/guilds/{guild_id}/commands", self._h_get_commands)
        add("PUT", "/applications/{application_id}/guilds/{guild_id}/commands", self._h_put_commands)
        add("POST", "/interactions/{interaction_id}/{interaction_token}/callback", self._h_callback,
            "callback", auth=False, global_limited=False)
        for method, handler in (("GET", self._h_get_original), ("PATCH", self._h_edit_original),
                                ("DELETE", self._h_delete_original)):
            add(method, "/webhooks/{application_id}/{interaction_token}/messages/@original", handler,
                "webhook", auth=False, global_limited=False)
        add("POST", "/webhooks/{application_id}/{interaction_token}", self._h_followup,
            "webhook", auth=False, global_limited=False)
        for method, handler in (("GET", self._h_get_webhook_message), ("PATCH", self._h_edit_webhook_message),
                                ("DELETE", self._h_delete_webhook_message)):
            add(method, "/webhooks/{application_id}/{interaction_token}/messages/{message_id}", handler,
                "webhook", auth=False, global_limited=False)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._h_unknown)

        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._serve_cdn)
        app.router.add_get("/media/attachments/{channel_id}/{attachment_id}/{filename}", self._serve_cdn)
        app.router.add_get("/_fake/world", self._c_world)
        app.router.add_post("/_fake/user_says", self._c_user_says)
        app.router.add_post("/_fake/text_channel", self._c_text_channel)
        app.router.add_post("/_fake/user_deletes", self._c_user_deletes)
        app.router.add_post("/_fake/user_runs_command", self._c_user_runs_command)
        app.router.add_post("/_fake/user_clicks", self._c_user_clicks)
        app.router.add_get("/_fake/messages", self._c_messages)
        app.router.add_get("/_fake/typing", self._c_typing)
        app.router.add_get("/_fake/calls", self._c_calls)
        app.router.add_get("/_fake/stats", self._c_stats)
        app.router.add_get("/_fake/interactions/{interaction_id}", self._c_interaction)
        app.router.add_post("/_fake/config", self._c_config)
        app.router.add_post("/_fake/inject", self._c_inject)
        app.router.add_post("/_fake/reset", self._c_reset)
        app.router.add_post("/_fake/disconnect_gateway", self._c_disconnect)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)
        t0 = time.monotonic()
        spec = self._specs.get(request.match_info.route)
        body = await self._read_body(request)
        request[_BODY] = body
        call = Call(
            t_received=t0, method=request.method, path=request.path[len(API_PREFIX):],
            route=spec.key if spec else None, query=request.query_string, json=body,
            channel_id=request.match_info.get("channel_id"),
        )
        self.calls.append(call)
        if self.max_calls is not None and len(self.calls) > self.max_calls + self.max_calls // 4 + 1:
            del self.calls[: len(self.calls) - self.max_calls]
        try:
            response = await self._serve(request, handler, spec, call)
        except asyncio.CancelledError:
            call.t_responded = time.monotonic()
            self._changed()
            raise
        call.status = None if isinstance(response, _Dropped) else response.status
        call.t_responded = time.monotonic()
        self._status_counts[(call.route, call.status or 0)] += 1  # 0: connection dropped
        if spec is None:
            self.unhandled.append(call)
            log.warning("fake discord: unhandled route %s %s", request.method, request.path)
        self._changed()
        return response

    async def _read_body(self, request: web.Request) -> Any:
        if not request.can_read_body:
            return None
        ctype = request.content_type
        if ctype == "application/json":
            raw = await request.read()
            return json.loads(raw) if raw else None
        if ctype.startswith("multipart/"):
            form = await request.post()
            payload = json.loads(form["payload_json"]) if "payload_json" in form else {}  # type: ignore[arg-type]
            files = []
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    files.append({"field": name, "filename": value.filename,
                                  "size": len(value.file.read()), "content_type": value.content_type})
            payload["_files"] = files
            return payload
        await request.read()
        return None

    async def _serve(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     spec: _RouteSpec | None, call: Call) -> web.StreamResponse:
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        inj = self._take_injection(call) if self._injections else None
        if inj is not None:
            call.injected = inj.kind
            forced = await self._apply_injection(inj, request, spec, call)
            if forced is not None:
                return forced
        major = self._major(request)
        if spec is not None and spec.auth and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._error_response(UNAUTHORIZED(), call)
        verdict = None
        if spec is not None:
            verdict = self._limiter.check(spec.bucket if spec.bucket != "default" else spec.key, major,
                                          global_limited=spec.global_limited)
            if verdict is not None and not verdict.allowed:
                call.retry_after, call.scope = verdict.retry_after, verdict.scope
                return _rate_limited_response(verdict.retry_after, verdict.headers, scope=verdict.scope,
                                              is_global=verdict.is_global)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = self._error_response(exc, call)
        if verdict is not None:
            response.headers.update(verdict.headers)
        if inj is not None and inj.kind == "drop_after_apply":
            return self._drop_connection(request)
        if inj is not None and inj.kind == "timeout_after_apply":
            await self._hold(inj.hold)
            return self._drop_connection(request)
        return response

    def _error_response(self, exc: ApiError, call: Call) -> web.Response:
        call.code = exc.code
        return _json_response(exc.body(), status=exc.status)

    @staticmethod
    def _major(request: web.Request) -> str:
        mi = request.match_info
        for key in ("channel_id", "guild_id"):
            if key in mi:
                return mi[key]
        if "interaction_token" in mi:
            return f"{mi.get('interaction_id') or mi.get('application_id')}+{mi['interaction_token']}"
        return ""

    @staticmethod
    def _drop_connection(request: web.Request) -> web.Response:
        """Abort the TCP connection; the returned response is never written (aiohttp
        notices the closed transport and drops it quietly)."""
        if request.transport is not None:
            request.transport.abort()
        return _Dropped(status=599)

    async def _apply_injection(self, inj: Injection, request: web.Request, spec: _RouteSpec | None,
                               call: Call) -> web.StreamResponse | None:
        if inj.kind == "5xx":
            status = inj.status or 500
            call.code = 0
            if status in (502, 504):
                return web.Response(status=status, text=f"<html><body>{status} Bad Gateway</body></html>",
                                    content_type="text/html")
            return _json_response({"message": f"{status}: Internal Server Error", "code": 0}, status=status)
        if inj.kind == "429" or inj.kind == "429_no_via":
            retry = inj.retry_after if inj.retry_after is not None else 0.1
            call.retry_after = retry
            if inj.kind == "429_no_via":
                call.scope = "cloudflare"
                return web.Response(status=429, text="error code: 1015", content_type="text/plain",
                                    headers={"Retry-After": str(max(1, math.ceil(retry)))})
            headers = {}
            if spec is not None and not inj.is_global:
                headers = self._limiter.peek_headers(spec.bucket if spec.bucket != "default" else spec.key,
                                                     self._major(request))
                headers["X-RateLimit-Remaining"] = "0"
                headers["X-RateLimit-Reset-After"] = _up3(retry)
                headers["X-RateLimit-Reset"] = _up3(time.time() + retry)
            call.scope = "global" if inj.is_global else "user"
            return _rate_limited_response(retry, headers, scope=call.scope, is_global=inj.is_global)
        if inj.kind == "timeout":
            await self._hold(inj.hold)
            return self._drop_connection(request)
        if inj.kind == "drop":
            return self._drop_connection(request)
        return None  # the *_after_apply kinds act first

    async def _hold(self, seconds: float) -> None:
        """Wait `seconds`, or less if the server stops."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- REST handlers ----------------------------------------------------------------

    def _require_channel(self, request: web.Request) -> FakeChannel:
        ch = self._channels.get(request.match_info["channel_id"])
        if ch is None:
            raise UNKNOWN_CHANNEL()
        return ch

    def _require_message(self, ch: FakeChannel, message_id: str) -> SeenMessage:
        """A message reachable through the channel routes: an ephemeral one is not (only its
        interaction's webhook reaches it) [unverified: observed as 10008 by bot authors]."""
        m = self._messages.get(message_id)
        if m is None or m.deleted or m.channel_id != ch.id or m.ephemeral:
            raise UNKNOWN_MESSAGE()
        return m

    async def _h_unknown(self, request: web.Request) -> web.Response:
        return _json_response({"message": "404: Not Found", "code": 0}, status=404)

    async def _h_me(self, request: web.Request) -> web.Response:
        data = self.bot_user.payload()
        data.update(verified=True, mfa_enabled=False, flags=0)
        return _json_response(data)

    async def _h_application(self, request: web.Request) -> web.Response:
        return _json_response({
            "id": self.application_id, "name": self.bot_user.username, "description": "", "icon": None,
            "bot_public": True, "bot_require_code_grant": False, "owner": self.owner.payload(),
            "verify_key": "00" * 32, "flags": 0, "team": None, "interactions_endpoint_url": None,
            "bot": self.bot_user.payload(),
        })

    async def _h_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url})

    async def _h_gateway_bot(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}})

    async def _h_create_dm(self, request: web.Request) -> web.Response:
        body = request[_BODY] or {}
        uid = str(body.get("recipient_id", ""))
        if uid not in self._users:
            raise _form_error("recipient_id", "NUMBER_TYPE_COERCE", f'Value "{uid}" is not snowflake.')
        return _json_response(self._channel_payload(self.dm_channel(uid)))

    async def _h_get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._channel_payload(self._require_channel(request)))

    async def _h_history(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        limit = min(int(request.query.get("limit", 50)), 100)
        before = request.query.get("before")
        msgs = [m for m in self._by_channel.get(ch.id, ()) if not m.deleted and not m.ephemeral
                and (before is None or int(m.id) < int(before))]
        return _json_response([self._message_payload(m, gateway=False) for m in reversed(msgs[-limit:])])

    async def _h_get_message(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        m = self._require_message(ch, request.match_info["message_id"])
        return _json_response(self._message_payload(m, gateway=False))

    def _validate_content(self, body: Mapping[str, Any], *, creating: bool) -> None:
        content = body.get("content")
        if content is not None and len(str(content)) > self._limits.max_content:
            raise _too_long("content", self._limits.max_content)
        for i, embed in enumerate(body.get("embeds") or []):
            desc = (embed or {}).get("description") or ""
            if len(desc) > 4096:
                raise _too_long(f"embeds.{i}.description", 4096)
        if body.get("components") is not None:
            _validate_components(body["components"])
        if creating and not (content or body.get("embeds") or body.get("_files") or body.get("sticker_ids")
                             or body.get("components") or body.get("poll")):
            raise EMPTY_MESSAGE()

    async def _h_send(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        body = request[_BODY] or {}
        if not ch.bot_can_send:
            raise MISSING_PERMISSIONS()
        self._validate_content(body, creating=True)
        nonce = body.get("nonce")
        now = self.clock()
        if nonce is not None and body.get("enforce_nonce"):
            key = (ch.id, self.bot_user.id, str(nonce))
            seen = self._nonces.get(key)
            if seen is not None and now - seen[0] <= self._limits.nonce_ttl and seen[1] in self._messages:
                return _json_response(self._message_payload(self._messages[seen[1]], gateway=False))
        ref = body.get("message_reference") or None
        ref_id = None
        if ref:
            ref_id = str(ref.get("message_id"))
            target = self._messages.get(ref_id)
            if target is None or target.deleted or target.channel_id != str(ref.get("channel_id") or ch.id):
                if ref.get("fail_if_not_exists", True):
                    raise _form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
                ref_id = None
        content = str(body.get("content") or "")
        m = self._new_message(
            ch, self.bot_user, content, reference=ref_id, allowed_mentions=body.get("allowed_mentions"),
            flags=int(body.get("flags") or 0), nonce=str(nonce) if nonce is not None else None,
            type=19 if ref_id else 0, tts=bool(body.get("tts")), embeds=list(body.get("embeds") or []),
            attachments=[self._attachment(ch, f) for f in body.get("_files", [])],
            components=list(body.get("components") or []), mentions=self._mentions_in(content),
        )
        if nonce is not None and body.get("enforce_nonce"):
            self._nonces[(ch.id, self.bot_user.id, str(nonce))] = (now, m.id)
        self._dispatch_message("MESSAGE_CREATE", m, self._message_payload(m, gateway=True))
        return _json_response(self._message_payload(m, gateway=False))

    def _attachment(self, ch: FakeChannel, upload: Mapping[str, Any]) -> dict[str, Any]:
        """An attachment object for an uploaded file (the CDN URL is not served)."""
        aid = self._snowflake()
        url = f"{self.base_url}/attachments/{ch.id}/{aid}/{upload['filename']}"
        return {"id": aid, "filename": upload["filename"], "size": upload["size"], "url": url, "proxy_url": url,
                "content_type": upload.get("content_type")}

    def _edit_message(self, m: SeenMessage, body: Mapping[str, Any]) -> None:
        self._validate_content(body, creating=False)
        if "content" in body and body["content"] is not None:
            self._apply_edit(m, str(body["content"]))
        else:
            m.edited_wall = time.time()
        if m.loading and "content" in body:
            m.flags &= ~FLAG_LOADING
        if "flags" in body and body["flags"] is not None:
            m.flags = (m.flags & (FLAG_EPHEMERAL | FLAG_LOADING)) | int(body["flags"])
        if "allowed_mentions" in body:
            m.allowed_mentions = body["allowed_mentions"]
        if "embeds" in body and body["embeds"] is not None:
            m.embeds = list(body["embeds"])
        if "components" in body and body["components"] is not None:
            m.components = list(body["components"])
            if m.components != m.component_versions[-1]:
                m.component_versions.append(list(m.components))
        if not (m.content or m.embeds or m.attachments or m.components) and not m.loading:
            raise EMPTY_MESSAGE()

    async def _h_edit(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        m = self._require_message(ch, request.match_info["message_id"])
        if m.author_id != self.bot_user.id:
            raise NOT_AUTHOR()
        self._edit_message(m, request[_BODY] or {})
        if not m.ephemeral:
            self._dispatch_message("MESSAGE_UPDATE", m, self._message_payload(m, gateway=True))
        return _json_response(self._message_payload(m, gateway=False))

    async def _h_delete(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        m = self._require_message(ch, request.match_info["message_id"])
        if ch.is_dm and m.author_id != self.bot_user.id:
            raise DM_ACTION()
        self._delete(m)
        return web.Response(status=204)

    async def _h_react(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        m = self._require_message(ch, request.match_info["message_id"])
        m.reactions.append(request.match_info["emoji"])
        return web.Response(status=204)

    async def _h_typing(self, request: web.Request) -> web.Response:
        ch = self._require_channel(request)
        if not ch.bot_can_send:
            raise MISSING_PERMISSIONS()
        self._typing.setdefault(ch.id, []).append(self.clock())
        return web.Response(status=204)

    def _check_app(self, request: web.Request) -> None:
        if request.match_info["application_id"] != self.application_id:
            raise ApiError(403, 50001, "Missing Access")

    async def _h_get_commands(self, request: web.Request) -> web.Response:
        self._check_app(request)
        return _json_response(list(self._commands.get(request.match_info.get("guild_id"), {}).values()))

    async def _h_put_commands(self, request: web.Request) -> web.Response:
        self._check_app(request)
        gid = request.match_info.get("guild_id")
        if gid is not None and gid not in self._guilds:
            raise ApiError(404, 10004, "Unknown Guild")
        old = self._commands.get(gid, {})
        new: dict[str, dict[str, Any]] = {}
        for cmd in request[_BODY] or []:
            name = cmd["name"]
            prev = old.get(name)
            data = {
                "type": 1, "description": "", "options": [], "default_member_permissions": None,
                "nsfw": False, "contexts": None, "integration_types": [0],
                **cmd,
                "id": prev["id"] if prev else self._snowflake(),
                "application_id": self.application_id,
                "version": self._snowflake(),
            }
            if gid is not None:
                data["guild_id"] = gid
            new[name] = data
        self._commands[gid] = new
        return _json_response(list(new.values()))

    # -- interactions -----------------------------------------------------------------

    def _interaction_message(self, rec: FakeInteraction, content: str, data: Mapping[str, Any], *,
                             loading: bool = False, msg_type: int = 20) -> SeenMessage:
        ch = self._channels[rec.channel_id]
        flags = int(data.get("flags") or 0) & FLAG_EPHEMERAL
        if loading:
            flags |= FLAG_LOADING
        m = self._new_message(
            ch, self.bot_user, content, flags=flags, type=msg_type, interaction_id=rec.id,
            webhook_id=self.application_id, allowed_mentions=data.get("allowed_mentions"),
            embeds=list(data.get("embeds") or []), components=list(data.get("components") or []),
            tts=bool(data.get("tts")), mentions=self._mentions_in(content),
        )
        if not m.ephemeral:
            self._dispatch_message("MESSAGE_CREATE", m, self._message_payload(m, gateway=True))
        return m

    async def _h_callback(self, request: web.Request) -> web.Response:
        rec = self._interactions.get(request.match_info["interaction_id"])
        if rec is None or rec.token != request.match_info["interaction_token"]:
            raise UNKNOWN_INTERACTION()
        body = request[_BODY] or {}
        now = self.clock()
        try:
            requested = int(body.get("type", 0))
        except (TypeError, ValueError):
            requested = 0
        try:
            if rec.acknowledged:
                raise ALREADY_ACKED()
            if now - rec.created_at > self._limits.ack_deadline:
                raise UNKNOWN_INTERACTION()
            rtype = int(body.get("type", 0))
            data = body.get("data") or {}
            if rtype not in (1, 4, 5, 6, 7, 8, 9, 12):
                raise _form_error("type", "BASE_TYPE_CHOICES", "Value must be one of {1, 4, 5, 6, 7, 8, 9, 12}.")
            if rtype in (6, 7) and rec.type != 3:
                # [unverified] exact error; only the 400 / 50035 shape is known
                raise _form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID",
                                  "Interaction response type is only valid for component interactions")
            resource: dict[str, Any] = {"type": rtype}
            if rtype in (6, 7):
                rec.original = self._messages[rec.message_id]  # type: ignore[index]  # @original = clicked message
            if rtype == 4:
                self._validate_content(data, creating=True)
                rec.original = self._interaction_message(rec, str(data.get("content") or ""), data)
                resource["message"] = self._message_payload(rec.original, gateway=False)
            elif rtype == 5:
                rec.original = self._interaction_message(rec, "", data, loading=True)
            elif rtype == 7:
                target = rec.original
                self._edit_message(target, data)
                self._dispatch_message("MESSAGE_UPDATE", target, self._message_payload(target, gateway=True))
                resource["message"] = self._message_payload(target, gateway=False)
        except ApiError as exc:
            rec.rejected.append(exc.code)
            rec.callbacks.append((now, requested, exc.status))
            self._changed()
            raise
        rec.response_type, rec.acked_at = rtype, now
        with_response = request.query.get("with_response", "").lower() in ("1", "true")
        rec.callbacks.append((now, requested, 200 if with_response else 204))
        self._changed()
        if not with_response:
            return web.Response(status=204)
        original = rec.original
        return _json_response({
            "interaction": {
                "id": rec.id, "type": rec.type,
                "response_message_id": original.id if original else None,
                "response_message_loading": bool(original and original.loading),
                "response_message_ephemeral": bool(original and original.ephemeral),
            },
            "resource": resource,
        })

    def _require_token(self, request: web.Request) -> FakeInteraction:
        if request.match_info["application_id"] != self.application_id:
            raise UNKNOWN_WEBHOOK()
        rec = self._by_token.get(request.match_info["interaction_token"])
        if rec is None or self.clock() - rec.created_at > self._limits.token_ttl:
            if rec is not None:
                rec.rejected.append(50027)
            raise INVALID_WEBHOOK_TOKEN()
        if not rec.acknowledged:
            # [unverified] the token only becomes a webhook once the interaction was answered
            rec.rejected.append(10015)
            raise UNKNOWN_WEBHOOK()
        return rec

    def _require_original(self, rec: FakeInteraction) -> SeenMessage:
        if rec.original is None or rec.original.deleted:
            rec.rejected.append(10008)
            raise UNKNOWN_MESSAGE()
        return rec.original

    async def _h_get_original(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        return _json_response(self._message_payload(self._require_original(rec), gateway=False))

    async def _h_edit_original(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        m = self._require_original(rec)
        return self._edit_webhook_message(m, request)

    async def _h_delete_original(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        self._delete(self._require_original(rec))
        self._changed()
        return web.Response(status=204)

    def _edit_webhook_message(self, m: SeenMessage, request: web.Request) -> web.Response:
        self._edit_message(m, request[_BODY] or {})
        if not m.ephemeral:
            self._dispatch_message("MESSAGE_UPDATE", m, self._message_payload(m, gateway=True))
        self._changed()
        return _json_response(self._message_payload(m, gateway=False))

    async def _h_followup(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        body = request[_BODY] or {}
        self._validate_content(body, creating=True)
        loading = rec.original
        if loading is not None and loading.loading and not loading.deleted:
            # A follow-up sent while the deferred response still loads *is* that response:
            # it fills the "thinking…" message, which keeps the deferral's flags whatever the
            # follow-up asks (an ephemeral deferral stays ephemeral) [discord-api-docs#2742,
            # #3466: "If you ACK with a flag of 64 then your response will also be ephemeral"].
            self._edit_message(loading, {k: v for k, v in body.items() if k != "flags"})
            if not loading.ephemeral:
                self._dispatch_message("MESSAGE_UPDATE", loading, self._message_payload(loading, gateway=True))
            m = loading
        else:  # after the response was edited or deleted: a new message, with its own flags
            m = self._interaction_message(rec, str(body.get("content") or ""), body, msg_type=20)
            rec.followups.append(m)
        self._changed()
        if request.query.get("wait", "").lower() not in ("1", "true"):
            return web.Response(status=204)
        return _json_response(self._message_payload(m, gateway=False))

    def _webhook_message(self, rec: FakeInteraction, message_id: str) -> SeenMessage:
        for m in [rec.original, *rec.followups]:
            if m is not None and m.id == message_id and not m.deleted:
                return m
        raise UNKNOWN_MESSAGE()

    async def _h_get_webhook_message(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        m = self._webhook_message(rec, request.match_info["message_id"])
        return _json_response(self._message_payload(m, gateway=False))

    async def _h_edit_webhook_message(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        return self._edit_webhook_message(self._webhook_message(rec, request.match_info["message_id"]), request)

    async def _h_delete_webhook_message(self, request: web.Request) -> web.Response:
        rec = self._require_token(request)
        self._delete(self._webhook_message(rec, request.match_info["message_id"]))
        self._changed()
        return web.Response(status=204)

    # -- Gateway ----------------------------------------------------------------------

    def _note(self, what: str, detail: Any = None) -> None:
        self.gateway_log.append((time.monotonic(), what, detail))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        if not self._gateway_gate.is_set():
            gate = asyncio.ensure_future(self._gateway_gate.wait())
            closed = asyncio.ensure_future(ws.receive())  # returns when the client gives up
            done, _ = await asyncio.wait({gate, closed}, return_when=asyncio.FIRST_COMPLETED)
            gate.cancel()
            if closed in done:
                return ws
            closed.cancel()  # and wait for it: aiohttp forbids two concurrent receive() calls
            with contextlib.suppress(asyncio.CancelledError):
                await closed
        if self._stopping.is_set():
            await ws.close(code=1001)
            return ws
        zlib_stream = self.gateway_zlib and request.query.get("compress") == "zlib-stream"
        conn = _Connection(ws, zlib_stream=zlib_stream)
        self._connections.add(conn)
        self._note("connect", dict(request.query))
        try:
            await conn.send_json({"op": 10, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000)},
                                  "s": None, "t": None})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.BINARY:
                        await ws.close(code=4002, message=b"Error while decoding payload.")
                    continue
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
                await self._on_frame(conn, frame)
        finally:
            self._connections.discard(conn)
            if conn.writer is not None:
                conn.writer.cancel()
            session = conn.session
            code = ws.close_code
            self._note("close", code)
            if session is not None and session.connection is conn:
                session.connection = None
                if not conn.server_closed and code in (1000, 1001):
                    session.closed = True  # the bot closed on purpose: nothing to resume
            self._changed()
        return ws

    async def _on_frame(self, conn: _Connection, frame: Mapping[str, Any]) -> None:
        op = frame.get("op")
        d = frame.get("d")
        if op == 1:
            await conn.send_json({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, d or {})
        elif op == 6:
            await self._resume(conn, d or {})
        elif op == 8:
            self._note("op8", d)
            await self._request_members(conn, d or {})
        elif op in (3, 4):
            self._note(f"op{op}", d)
        else:
            await conn.ws.close(code=4001, message=b"Unknown opcode.")

    def _token_ok(self, token: Any) -> bool:
        token = str(token or "")
        return token == self.token or token == f"Bot {self.token}"

    async def _identify(self, conn: _Connection, d: Mapping[str, Any]) -> None:
        self._note("identify", {k: v for k, v in d.items() if k != "token"})
        if conn.session is not None:
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        if not self._token_ok(d.get("token")):
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(d.get("intents", 0))
        if intents & Intents.PRIVILEGED & ~self.privileged_intents:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        session = GatewaySession(secrets.token_hex(16), intents, d.get("shard"))
        self._sessions[session.id] = session
        ready: dict[str, Any] = {
            "v": 10,
            "user": dict(self.bot_user.payload(), verified=True, mfa_enabled=False, flags=0),
            "guilds": [{"id": g.id, "unavailable": True} for g in self._guilds.values()],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.application_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["local"],
            "user_settings": {},
            "auth": {},
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        session.ready_seq = session.push("READY", ready)
        if session.has(Intents.GUILDS):
            for g in self._guilds.values():
                session.ready_seq = session.push("GUILD_CREATE", self._guild_payload(g))
        self._attach(conn, session, cursor=0)

    async def _resume(self, conn: _Connection, d: Mapping[str, Any]) -> None:
        self._note("resume", {k: v for k, v in d.items() if k != "token"})
        if not self._token_ok(d.get("token")):
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        session = self._sessions.get(str(d.get("session_id")))
        seq = d.get("seq") or 0
        missed = session.frames_after(int(seq)) if session is not None and not session.closed else None
        if session is None or session.closed or missed is None or int(seq) > session.seq:
            await conn.send_json({"op": 9, "d": False, "s": None, "t": None})
            return
        old = session.connection
        if old is not None and old is not conn and not old.ws.closed:
            old.server_closed = True
            await old.ws.close(code=4000, message=b"Session resumed elsewhere.")
        session.resumes += 1
        session.replayed += len(missed)
        session.push("RESUMED", {})
        self._attach(conn, session, cursor=int(seq))

    def _attach(self, conn: _Connection, session: GatewaySession, *, cursor: int) -> None:
        conn.session = session
        conn.cursor = cursor
        session.connection = conn
        session.wake.set()
        conn.writer = asyncio.ensure_future(self._writer(conn, session))
        self._changed()

    async def _writer(self, conn: _Connection, session: GatewaySession) -> None:
        """Write the session's dispatches to this connection, in order, as they are queued."""
        try:
            while not conn.ws.closed and session.connection is conn:
                session.wake.clear()
                frames = session.frames_after(conn.cursor)
                if frames is None:  # fell behind the buffer: the session cannot continue
                    await conn.send_json({"op": 9, "d": False, "s": None, "t": None})
                    return
                for s, text in frames:
                    await conn.send(text)
                    conn.cursor = s
                    session.delivered = max(session.delivered, s)
                if frames:
                    self._changed()
                    continue
                await session.wake.wait()
        except (ConnectionResetError, RuntimeError):
            return

    async def _request_members(self, conn: _Connection, d: Mapping[str, Any]) -> None:
        gids = d.get("guild_id")
        gids = gids if isinstance(gids, list) else [gids]
        wanted = {str(u) for u in d.get("user_ids") or []}
        query = str(d.get("query") or "")
        session = conn.session
        if session is None:
            return
        for gid in gids:
            g = self._guilds.get(str(gid))
            if g is None:
                continue
            members = [
                self._member_payload(g, uid, with_user=True) for uid in g.member_ids
                if (not wanted or uid in wanted) and self._users[uid].username.startswith(query)
            ]
            chunk = {"guild_id": g.id, "members": members, "chunk_index": 0, "chunk_count": 1, "not_found": []}
            if d.get("nonce") is not None:
                chunk["nonce"] = d["nonce"]
            session.push("GUILD_MEMBERS_CHUNK", chunk)

    # -- /_fake control endpoints (cross-process) -------------------------------------

    async def _c_world(self, request: web.Request) -> web.Response:
        return _json_response({
            "api_base": self.api_base,
            "gateway_url": self.gateway_url,
            "token": self.token,
            "application_id": self.application_id,
            "bot_user": self.bot_user.payload(),
            "default_guild_id": self.default_guild.id,
            "default_channel_id": self.default_channel.id,
            "default_user_id": self.default_user.id,
            "users": [u.payload() for u in self._users.values()],
            "guilds": [self._guild_payload(g) for g in self._guilds.values()],
            "dm_channels": {uid: cid for uid, cid in self._dms.items()},
        })

    async def _c_user_says(self, request: web.Request) -> web.Response:
        b = await request.json()
        msg = self.user_says(b.get("channel_id"), b.get("user_id"), b["content"],
                             reply_to=b.get("reply_to"), mentions_bot=bool(b.get("mentions_bot")),
                             reply_ping=bool(b.get("reply_ping", True)))
        return _json_response(msg)

    async def _c_text_channel(self, request: web.Request) -> web.Response:
        """A new text channel (a fresh rate-limit bucket): what a benchmark in another
        process uses to give every run a channel of its own."""
        b = await request.json() if request.can_read_body else {}
        ch = self.text_channel(b.get("guild_id"), b.get("name") or "general")
        return _json_response(self._channel_payload(ch))

    async def _c_user_deletes(self, request: web.Request) -> web.Response:
        b = await request.json()
        self.user_deletes(b.get("channel_id"), b["message_id"])
        return _json_response({"ok": True})

    async def _c_user_runs_command(self, request: web.Request) -> web.Response:
        b = await request.json()
        rec = self.user_runs_command(b.get("channel_id"), b.get("user_id"), b["name"], b.get("options"))
        return _json_response(rec.to_dict())

    async def _c_user_clicks(self, request: web.Request) -> web.Response:
        b = await request.json()
        try:
            rec = self.user_clicks(b.get("channel_id"), b.get("user_id"), b["message_id"], b["custom_id"],
                                   check=bool(b.get("check", True)))
        except ValueError as exc:
            return _json_response({"error": str(exc)}, status=400)
        return _json_response(rec.to_dict())

    async def _c_messages(self, request: web.Request) -> web.Response:
        cid = request.query.get("channel_id") or self.default_channel.id
        return _json_response([m.to_dict() for m in self.messages(cid)])

    async def _c_typing(self, request: web.Request) -> web.Response:
        cid = request.query.get("channel_id") or self.default_channel.id
        return _json_response(self.typing_events(cid))

    async def _c_calls(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", 0))
        return _json_response([c.to_dict() for c in self.calls[since:]])

    async def _c_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats())

    async def _c_interaction(self, request: web.Request) -> web.Response:
        return _json_response(self.interaction(request.match_info["interaction_id"]).to_dict())

    async def _c_config(self, request: web.Request) -> web.Response:
        b = await request.json()
        if "latency" in b:
            self.latency = float(b["latency"])
        if "limits" in b:
            self.limits = dataclasses.replace(self._limits, **b["limits"])
        return _json_response({"latency": self.latency, "limits": dataclasses.asdict(self._limits)})

    async def _c_inject(self, request: web.Request) -> web.Response:
        b = dict(await request.json())
        inj = self.inject(b.pop("kind"), **b)
        return _json_response(dataclasses.asdict(inj))

    async def _c_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response({"ok": True})

    async def _c_disconnect(self, request: web.Request) -> web.Response:
        b = await request.json() if request.can_read_body else {}
        await self.disconnect_gateway(int(b.get("code", 4000)))
        return _json_response({"ok": True})


# ---------------------------------------------------------------------------------------
# Standalone: python -m tests.fakes.discord --port 8082 --latency 0.05
# ---------------------------------------------------------------------------------------


async def _serve_forever(args: argparse.Namespace) -> None:
    limits = DiscordLimits(channel_messages=args.channel_messages, channel_window=args.channel_window,
                           global_rate=args.global_rate, enabled=not args.no_limits)
    fake = FakeDiscord(args.token, limits=limits, latency=args.latency, gateway_zlib=args.zlib)
    await fake.start(args.host, args.port)
    print(f"api_base={fake.api_base}", flush=True)
    print(f"gateway_url={fake.gateway_url}", flush=True)
    print(f"control={fake.base_url}/_fake/", flush=True)
    print(f"token={fake.token} application_id={fake.application_id} "
          f"guild_id={fake.default_guild.id} channel_id={fake.default_channel.id} "
          f"user_id={fake.default_user.id}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.discord", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--token", default="fake-discord-token")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every REST call")
    parser.add_argument("--channel-messages", type=int, default=5)
    parser.add_argument("--channel-window", type=float, default=5.0)
    parser.add_argument("--global-rate", type=float, default=50.0)
    parser.add_argument("--no-limits", action="store_true", help="no rate limits and no X-RateLimit headers")
    parser.add_argument("--zlib", action="store_true", help="zlib-stream Gateway frames when requested")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(_serve_forever(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
