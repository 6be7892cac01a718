"""Telegram's text formatting, re-implemented for the fake Bot API server.

Why this exists: a bot that streams LLM output into Telegram lives or dies by what the
server *rejects* -- an unescaped ``.`` in MarkdownV2, an unclosed ``*`` mid-stream, an
entity that runs past the end of the text, a reply that is 4097 characters long. The fake
server must refuse exactly those inputs with exactly Telegram's words, and accept
everything else, or our tests prove nothing.

The behaviour follows TDLib (``td/telegram/MessageEntity.cpp``: ``parse_markdown``,
``parse_markdown_v2``, ``parse_html``, ``fix_formatted_text``, ``find_entities``) and the
Bot API server (``telegram-bot-api/Client.cpp``: ``get_formatted_text``,
``get_text_entity``), as summarised in ``../shared/reference/telegram-bot-api.md``.
It was written from that documented behaviour; no GPL code (ptbtest) was used.

Known simplifications (documented so nobody mistakes them for Telegram's rules):

* splittable entities (bold, italic, underline, strikethrough, spoiler) that overlap are
  kept as given instead of being re-split the way TDLib does;
* URL and e-mail detection in plain text is a close approximation of TDLib's
  ``find_urls`` (a compact list of common TLDs for scheme-less links);
* phone numbers, bank cards and media timestamps are not auto-detected;
* HTML ``<tg-time>`` (``date_time``) is not supported by the parsers (explicit
  ``date_time`` entities are accepted).

Offsets and lengths of entities are in UTF-16 code units, as on the wire. Parser error
offsets are UTF-8 *byte* offsets into the original text, as TDLib reports them.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENTITY_TYPES",
    "FormattedText",
    "FormattingError",
    "LinkError",
    "check_link",
    "find_entities",
    "fix_formatted_text",
    "format_text",
    "from_utf16_offset",
    "parse_entities_json",
    "parse_html",
    "parse_markdown",
    "parse_markdown_v2",
    "sort_entities",
    "to_utf16_offset",
    "utf16_len",
    "utf16_slice",
]

Entity = dict[str, Any]
"""A MessageEntity as the Bot API serialises it: ``{"type", "offset", "length", ...}``."""


# --------------------------------------------------------------------------- errors


class FormattingError(ValueError):
    """Telegram refused the text or its entities.

    ``description`` is the Bot API description *without* the ``"Bad Request: "`` prefix,
    already cased the way the server sends it (e.g. ``"can't parse entities: Character
    '.' is reserved and must be escaped with the preceding '\\'"``).
    """

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class EntityParseError(ValueError):
    """A parse-mode parser failed; the message is TDLib's text, verbatim."""


class LinkError(ValueError):
    """A URL that TDLib's ``check_link`` refuses; the message is TDLib's reason."""


def _lower_first(message: str) -> str:
    """Apply the Bot API's casing rule to a TDLib message (keep UPPER_SNAKE constants)."""
    if not message or re.fullmatch(r"[A-Z0-9_]+", message):
        return message
    return message[0].lower() + message[1:]


# --------------------------------------------------------------------------- UTF-16


def utf16_len(text: str) -> int:
    """Length of ``text`` in UTF-16 code units -- the unit of entity offsets."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le")) // 2


def _astral_positions(text: str) -> list[int]:
    """Code-point indexes of characters outside the BMP (two UTF-16 units each)."""
    if text.isascii():
        return []
    return [i for i, ch in enumerate(text) if ord(ch) > 0xFFFF]


def to_utf16_offset(text: str, index: int) -> int:
    """UTF-16 offset of the code point at ``index`` (``index`` may equal ``len(text)``)."""
    return index + bisect.bisect_left(_astral_positions(text), index)


def from_utf16_offset(text: str, offset: int) -> int | None:
    """Code-point index whose UTF-16 offset is ``offset``; None inside a surrogate pair
    or past the end of the text."""
    return _from_utf16(_astral_positions(text), len(text), offset)


def _from_utf16(astral: list[int], n: int, offset: int) -> int | None:
    lo, hi = 0, n
    while lo <= hi:
        mid = (lo + hi) // 2
        u = mid + bisect.bisect_left(astral, mid)
        if u == offset:
            return mid
        if u < offset:
            lo = mid + 1
        else:
            hi = mid - 1
    return None


def utf16_slice(text: str, offset: int, length: int) -> str:
    """The substring an entity covers (offset/length in UTF-16 units)."""
    if text.isascii():
        return text[offset : offset + length]
    units = text.encode("utf-16-le")
    return units[2 * offset : 2 * (offset + length)].decode("utf-16-le", errors="replace")


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8", errors="surrogatepass"))


# --------------------------------------------------------------------------- entities

ENTITY_TYPES = frozenset(
    {
        "mention", "hashtag", "cashtag", "bot_command", "url", "email", "phone_number",
        "bank_card_number", "bold", "italic", "underline", "strikethrough", "spoiler",
        "blockquote", "expandable_blockquote", "code", "pre", "text_link", "text_mention",
        "custom_emoji", "date_time",
    }
)  # fmt: skip
"""Every MessageEntity type of Bot API 10.x."""

# Types the server finds by itself: an explicit entity of these types is silently ignored
# (Client.cpp get_text_entity_type returns null for them).
_AUTO_TYPES = frozenset(
    {"mention", "hashtag", "cashtag", "bot_command", "url", "email", "phone_number", "bank_card_number"}
)
_SPLITTABLE = frozenset({"bold", "italic", "underline", "strikethrough", "spoiler"})
_BLOCKQUOTES = frozenset({"blockquote", "expandable_blockquote"})
# Entities whose meaning is not only visual; TDLib keeps them even over whitespace only.
_HIDDEN_DATA = frozenset({"text_link", "text_mention", "pre", "code"})

# TDLib MessageEntity::get_type_priority; ties after (offset, -length) sort by it.
_PRIORITY = {
    "mention": 50, "hashtag": 50, "bot_command": 50, "url": 50, "email": 50, "bold": 90,
    "italic": 91, "code": 20, "pre": 11, "text_link": 49, "text_mention": 49, "cashtag": 50,
    "phone_number": 50, "underline": 92, "strikethrough": 93, "blockquote": 0,
    "expandable_blockquote": 0, "bank_card_number": 50, "spoiler": 94, "custom_emoji": 99,
    "date_time": 50,
}  # fmt: skip


def _priority(entity: Entity) -> int:
    if entity["type"] == "pre" and entity.get("language"):
        return 10  # PreCode
    return _PRIORITY.get(entity["type"], 50)


def sort_entities(entities: list[Entity]) -> list[Entity]:
    """Sort in TDLib's order: offset ascending, length descending, then type priority."""
    entities.sort(key=lambda e: (e["offset"], -e["length"], _priority(e)))
    return entities


def _entity(kind: str, offset: int, length: int, **extra: Any) -> Entity:
    result: Entity = {"offset": offset, "length": length, "type": kind}
    result.update({k: v for k, v in extra.items() if v is not None})
    return result


@dataclass(slots=True)
class FormattedText:
    """Text as Telegram stores it: the visible string plus its entities."""

    text: str
    entities: list[Entity] = field(default_factory=list)


# --------------------------------------------------------------------------- links

_USER_LINK = re.compile(r"tg:(?://)?user\?id=(\d{1,19})", re.IGNORECASE)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-_]*[A-Za-z0-9])?|xn--[A-Za-z0-9\-]+")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def _link_user_id(url: str) -> int | None:
    match = _USER_LINK.fullmatch(url.strip())
    if match is None:
        return None
    user_id = int(match.group(1))
    return user_id if user_id > 0 else None


def check_link(url: str) -> str:
    """Validate and normalise a link the way TDLib's ``LinkManager::check_link`` does.

    Returns the canonical URL (``example.com`` -> ``http://example.com/``); raises
    :class:`LinkError` with TDLib's wording otherwise. Only http(s), tg and ton links are
    accepted.
    """
    original = url
    url = url.strip()
    if not url:
        raise LinkError(f"URL '{original}' is invalid: Wrong HTTP URL")
    match = _SCHEME.match(url)
    scheme = ""
    rest = url
    if match is not None:
        name = match.group(1).lower()
        after = url[match.end() :]
        if after.startswith("//") or name in ("tg", "ton"):
            scheme, rest = name, after
        elif "." not in name and not re.match(r"\d", after):
            raise LinkError(f"URL '{original}' is invalid: Unsupported URL protocol")
    if scheme in ("tg", "ton"):
        body = rest[2:] if rest.startswith("//") else rest
        if not body or not re.match(r"[A-Za-z0-9_\-]", body):
            raise LinkError(f"URL '{original}' is invalid: Wrong {scheme} URL")
        return f"{scheme}://{body}"
    if scheme and scheme not in ("http", "https"):
        raise LinkError(f"URL '{original}' is invalid: Unsupported URL protocol")
    if not scheme:
        scheme = "http"
    else:
        rest = rest[2:]
    split_at = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if pos != -1:
            split_at = min(split_at, pos)
    authority, path = rest[:split_at], rest[split_at:]
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    host, _, port = authority.partition(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise LinkError(f"URL '{original}' is invalid: Wrong port number specified in the URL")
    if not _valid_host(host):
        raise LinkError(f"URL '{original}' is invalid: Wrong HTTP URL")
    if not path:
        path = "/"
    elif path[0] != "/":
        path = "/" + path
    return f"{scheme}://{authority}{path}"


def _valid_host(host: str) -> bool:
    if _IPV4.fullmatch(host):
        return all(int(part) < 256 for part in host.split("."))
    labels = host.split(".")
    if len(labels) < 2 or not labels[-1]:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _custom_emoji_id(url: str) -> int:
    match = re.fullmatch(r"tg:(?://)?emoji\?id=(-?\d+)", url.strip(), re.IGNORECASE)
    if match is None:
        if not url.lower().startswith("tg:"):
            raise EntityParseError("Custom emoji URL must have scheme tg")
        raise EntityParseError("Custom emoji URL must have an emoji identifier")
    emoji_id = int(match.group(1))
    if emoji_id == 0 or abs(emoji_id) >= 2**63:
        raise EntityParseError("Invalid custom emoji identifier specified")
    return emoji_id


# --------------------------------------------------------------------------- MarkdownV2

_MDV2_STOP = re.compile(r"[\\_*\[\]()~`>#+\-=|{}.!\n]")
_CODE_STOP = re.compile(r"[\\`]")
_TD_SPACE = " \t\r\n\v\f\0"  # td::is_space, plus the NUL that ends a C string
_ENTITY_NAMES = {
    "bold": "Bold", "italic": "Italic", "underline": "Underline", "strikethrough": "Strikethrough",
    "spoiler": "Spoiler", "code": "Code", "pre": "Pre", "pre_code": "PreCode", "text_link": "TextUrl",
    "custom_emoji": "CustomEmoji", "blockquote": "BlockQuote", "expandable_blockquote": "BlockQuote",
}  # fmt: skip


@dataclass(slots=True)
class _Open:
    kind: str
    argument: str | None
    utf16: int
    index: int  # code-point index in the source, for byte offsets in errors
    out_pieces: int  # number of output pieces when the entity began


def _reserved(char: str) -> EntityParseError:
    return EntityParseError(f"Character '{char}' is reserved and must be escaped with the preceding '\\'")


def parse_markdown_v2(text: str) -> FormattedText:
    """Parse ``parse_mode=MarkdownV2`` like TDLib's ``parse_markdown_v2``.

    Raises :class:`EntityParseError` with TDLib's message (``Character '.' is reserved
    ...``, ``Can't find end of Bold entity at byte offset N``, ...).
    """
    n = len(text)
    out: list[str] = []
    entities: list[Entity] = []
    stack: list[_Open] = []
    u16 = 0
    have_blockquote = False
    i = 0

    def at(j: int) -> str:
        return text[j] if j < n else ""

    def read_url(start: int) -> tuple[str, int]:
        chars: list[str] = []
        j = start
        while j < n and text[j] != ")":
            if text[j] == "\\" and j + 1 < n and 0 < ord(text[j + 1]) <= 126:
                chars.append(text[j + 1])
                j += 2
                continue
            chars.append(text[j])
            j += 1
        return "".join(chars), j

    while i < n:
        in_code = bool(stack) and stack[-1].kind in ("code", "pre", "pre_code")
        match = (_CODE_STOP if in_code else _MDV2_STOP).search(text, i)
        stop = match.start() if match else n
        if stop > i:
            run = text[i:stop]
            out.append(run)
            u16 += utf16_len(run)
            i = stop
            if i >= n:
                break
        c = text[i]
        nxt = at(i + 1)
        if c == "\\":
            if nxt and 0 < ord(nxt) <= 126:
                out.append(nxt)
                u16 += 1
                i += 2
            else:  # a backslash before anything else is an ordinary character
                out.append(c)
                u16 += 1
                i += 1
            continue

        is_end = False
        if stack:
            top = stack[-1].kind
            if have_blockquote and c == "\n" and (i + 1 == n or text[i + 1] != ">"):
                is_end = True
            elif top == "bold":
                is_end = c == "*"
            elif top == "italic":
                is_end = c == "_" and nxt != "_"
            elif top == "code":
                is_end = c == "`"
            elif top in ("pre", "pre_code"):
                is_end = c == "`" and text[i + 1 : i + 3] == "``"
            elif top in ("text_link", "custom_emoji"):
                is_end = c == "]"
            elif top == "underline":
                is_end = c == "_" and nxt == "_"
            elif top == "strikethrough":
                is_end = c == "~"
            elif top == "spoiler":
                is_end = c == "|" and nxt == "|"
            elif top == "expandable_blockquote":
                is_end = c == "|" and nxt == "|" and at(i + 2) in ("", "\n")

        if not is_end:
            kind: str | None = None
            argument: str | None = None
            begin = i
            if c == "_":
                if nxt == "_":
                    kind = "underline"
                    i += 1
                else:
                    kind = "italic"
            elif c == "*":
                if (i == 0 or text[i - 1] == "\n") and not have_blockquote and text[i + 1 : i + 3] == "*>":
                    kind = "expandable_blockquote"
                    have_blockquote = True
                    i += 2
                else:
                    kind = "bold"
            elif c == "~":
                kind = "strikethrough"
            elif c == "|":
                if nxt != "|":
                    raise _reserved(c)
                i += 1
                kind = "spoiler"
            elif c == "[":
                kind = "text_link"
            elif c == "`":
                if text[i + 1 : i + 3] == "``":
                    i += 3
                    kind = "pre"
                    lang_end = i
                    while lang_end < n and text[lang_end] not in _TD_SPACE and text[lang_end] != "`":
                        lang_end += 1
                    if i != lang_end and lang_end < n and text[lang_end] != "`":
                        kind = "pre_code"
                        argument = text[i:lang_end]
                        i = lang_end
                    if at(i) in ("\n", "\r") and i < n:  # skip one new line at the start
                        if at(i + 1) in ("\n", "\r") and at(i + 1) != "" and text[i] != text[i + 1]:
                            i += 2
                        else:
                            i += 1
                    i -= 1
                else:
                    kind = "code"
            elif c == "!":
                if nxt != "[":
                    raise _reserved(c)
                i += 1
                kind = "custom_emoji"
            elif c == "\n":
                u16 += 1
                out.append("\n")
                if i + 1 < n and text[i + 1] == ">":
                    i += 1
                    if not have_blockquote:
                        kind = "blockquote"
                        have_blockquote = True
            elif c == ">":
                if i != 0:
                    raise _reserved(c)
                kind = "blockquote"
                have_blockquote = True
            else:
                raise _reserved(c)
            if kind is not None:
                stack.append(_Open(kind, argument, u16, begin, len(out)))
            i += 1
            continue

        # the end of an entity
        top_open = stack[-1]
        kind = top_open.kind
        if c == "\n" and kind not in _BLOCKQUOTES:
            raise EntityParseError(
                f"Can't find end of {_ENTITY_NAMES[kind]} entity at byte offset {_byte_offset(text, top_open.index)}"
            )
        argument = top_open.argument
        skip = u16 == top_open.utf16
        user_id: int | None = None
        emoji_id: int | None = None
        if kind in ("underline", "spoiler"):
            i += 1
        elif kind in ("pre", "pre_code"):
            i += 2
        elif kind == "text_link":
            if nxt != "(":
                url = "".join(out[top_open.out_pieces :])
            else:
                url_begin = i + 2
                url, i = read_url(url_begin)
                if i >= n:
                    raise EntityParseError(f"Can't find end of a URL at byte offset {_byte_offset(text, url_begin)}")
            user_id = _link_user_id(url)
            if user_id is None:
                try:
                    argument = check_link(url)
                except LinkError:
                    skip = True
        elif kind == "custom_emoji":
            if nxt != "(":
                raise EntityParseError("Custom emoji entity must contain a tg://emoji URL")
            url_begin = i + 2
            url, i = read_url(url_begin)
            if i >= n:
                raise EntityParseError(
                    f"Can't find end of a custom emoji URL at byte offset {_byte_offset(text, url_begin)}"
                )
            emoji_id = _custom_emoji_id(url)
        elif kind in _BLOCKQUOTES:
            have_blockquote = False
            if c == "|":
                i += 1  # the "||" that closes an expandable block quotation
            else:
                out.append(c)
                u16 += 1
        if not skip:
            length = u16 - top_open.utf16
            if user_id is not None:
                entities.append(_entity("text_mention", top_open.utf16, length, user={"id": user_id}))
            elif emoji_id is not None:
                entities.append(_entity("custom_emoji", top_open.utf16, length, custom_emoji_id=str(emoji_id)))
            elif kind == "pre_code":
                entities.append(_entity("pre", top_open.utf16, length, language=argument))
            elif kind == "text_link":
                entities.append(_entity("text_link", top_open.utf16, length, url=argument))
            else:
                entities.append(_entity(kind, top_open.utf16, length))
        stack.pop()
        i += 1

    if have_blockquote and stack and stack[-1].kind in _BLOCKQUOTES:
        top_open = stack.pop()
        if u16 != top_open.utf16:
            entities.append(_entity(top_open.kind, top_open.utf16, u16 - top_open.utf16))
    if stack:
        top_open = stack[-1]
        raise EntityParseError(
            f"Can't find end of {_ENTITY_NAMES[top_open.kind]} entity at byte offset "
            f"{_byte_offset(text, top_open.index)}"
        )
    return FormattedText("".join(out), sort_entities(entities))


# --------------------------------------------------------------------------- legacy Markdown

_MD1_STOP = re.compile(r"[\\_*`\[]")


def parse_markdown(text: str) -> FormattedText:
    """Parse the legacy ``parse_mode=Markdown`` like TDLib's ``parse_markdown``.

    Errors read ``Can't find end of the entity starting at byte offset N``.
    """
    n = len(text)
    out: list[str] = []
    entities: list[Entity] = []
    u16 = 0
    i = 0

    def at(j: int) -> str:
        return text[j] if j < n else ""

    while i < n:
        match = _MD1_STOP.search(text, i)
        stop = match.start() if match else n
        if stop > i:
            run = text[i:stop]
            out.append(run)
            u16 += utf16_len(run)
            i = stop
            if i >= n:
                break
        c = text[i]
        if c == "\\":
            if at(i + 1) in ("_", "*", "`", "[") and i + 1 < n:
                out.append(text[i + 1])
                u16 += 1
                i += 2
            else:
                out.append(c)
                u16 += 1
                i += 1
            continue
        begin = i
        end_char = "]" if c == "[" else c
        i += 1
        is_pre = False
        language = ""
        if c == "`" and text[i : i + 2] == "``":
            i += 2
            is_pre = True
            lang_end = i
            while lang_end < n and text[lang_end] not in _TD_SPACE and text[lang_end] != "`":
                lang_end += 1
            if i != lang_end and lang_end < n and text[lang_end] != "`":
                language = text[i:lang_end]
                i = lang_end
            if i < n and text[i] in "\n\r":
                if at(i + 1) in ("\n", "\r") and at(i + 1) != "" and text[i] != text[i + 1]:
                    i += 2
                else:
                    i += 1
        entity_offset = u16
        content_start = i
        while i < n and (text[i] != end_char or (is_pre and text[i + 1 : i + 3] != "``")):
            i += 1
        if i >= n:
            raise EntityParseError(f"Can't find end of the entity starting at byte offset {_byte_offset(text, begin)}")
        content = text[content_start:i]
        out.append(content)
        u16 += utf16_len(content)
        if u16 != entity_offset:
            length = u16 - entity_offset
            if c == "_":
                entities.append(_entity("italic", entity_offset, length))
            elif c == "*":
                entities.append(_entity("bold", entity_offset, length))
            elif c == "[":
                if at(i + 1) != "(":
                    url = content
                else:
                    i += 2
                    url_start = i
                    while i < n and text[i] != ")":
                        i += 1
                    url = text[url_start:i]
                user_id = _link_user_id(url)
                if user_id is not None:
                    entities.append(_entity("text_mention", entity_offset, length, user={"id": user_id}))
                else:
                    try:
                        entities.append(_entity("text_link", entity_offset, length, url=check_link(url)))
                    except LinkError:
                        pass
            elif is_pre:
                entities.append(_entity("pre", entity_offset, length, language=language or None))
            else:
                entities.append(_entity("code", entity_offset, length))
        if is_pre:
            i += 2
        i += 1
    return FormattedText("".join(out), sort_entities(entities))


# --------------------------------------------------------------------------- HTML

_HTML_STOP = re.compile(r"[&<]")
_HTML_TAGS = frozenset(
    {"a", "b", "strong", "i", "em", "s", "strike", "del", "u", "ins", "tg-spoiler", "tg-emoji", "span", "pre",
     "code", "blockquote"}
)  # fmt: skip
_HTML_NAMED = {"lt": 0x3C, "gt": 0x3E, "amp": 0x26, "quot": 0x22}
_HEX = "0123456789abcdefABCDEF"


def _decode_html_entity(text: str, pos: int) -> tuple[int, int]:
    """TDLib ``decode_html_entity``: (code point or 0, position after the entity)."""
    n = len(text)
    end = pos + 1
    code = 0
    if end < n and text[end] == "#":
        end += 1
        if end < n and text[end] == "x":
            end += 1
            while end < n and text[end] in _HEX:
                code = code * 16 + int(text[end], 16)
                end += 1
        else:
            while end < n and "0" <= text[end] <= "9":
                code = code * 10 + ord(text[end]) - 48
                end += 1
        if code == 0 or code >= 0x10FFFF or end - pos >= 10:
            return 0, pos
    else:
        while end < n and text[end].isascii() and text[end].isalpha():
            end += 1
        code = _HTML_NAMED.get(text[pos + 1 : end], 0)
        if code == 0:
            return 0, pos
    if end < n and text[end] == ";":
        end += 1
    return code, end


def parse_html(text: str) -> FormattedText:
    """Parse ``parse_mode=HTML`` like TDLib's ``parse_html``.

    Errors: ``Unsupported start tag "x" at byte offset N``, ``Unclosed start tag at byte
    offset N``, ``Unmatched end tag at byte offset N, expected "</b>", found "</i>"``,
    ``Can't find end tag corresponding to start tag b``, ...
    """
    n = len(text)
    out: list[str] = []
    entities: list[Entity] = []
    stack: list[tuple[str, str, int, int, int, bool]] = []  # tag, arg, utf16, out pieces, index, expandable
    u16 = 0
    surrogates = False
    i = 0

    def at(j: int) -> str:
        return text[j] if j < n else "\0"

    def space(ch: str) -> bool:
        return ch in _TD_SPACE

    while i < n:
        match = _HTML_STOP.search(text, i)
        stop = match.start() if match else n
        if stop > i:
            run = text[i:stop]
            out.append(run)
            u16 += utf16_len(run)
            i = stop
            if i >= n:
                break
        c = text[i]
        if c == "&":
            code, end = _decode_html_entity(text, i)
            if code:
                out.append(chr(code))
                u16 += 2 if code > 0xFFFF else 1
                surrogates = surrogates or 0xD800 <= code <= 0xDFFF
                i = end
            else:
                out.append("&")
                u16 += 1
                i += 1
            continue

        begin = i
        offset = _byte_offset(text, begin)
        i += 1
        if at(i) != "/":
            while not space(at(i)) and at(i) != ">":
                i += 1
            if i >= n:
                raise EntityParseError(f"Unclosed start tag at byte offset {offset}")
            tag = text[begin + 1 : i].lower()
            if tag not in _HTML_TAGS:
                raise EntityParseError(f'Unsupported start tag "{tag}" at byte offset {offset}')
            argument = ""
            expandable = False
            while at(i) != ">":
                while i < n and space(text[i]):
                    i += 1
                if at(i) == ">":
                    break
                attr_begin = i
                while not space(at(i)) and at(i) not in ("=", ">"):
                    i += 1
                name = text[attr_begin:i]
                if not name:
                    raise EntityParseError(f'Empty attribute name in the tag "{tag}" at byte offset {offset}')
                while i < n and space(text[i]):
                    i += 1
                if at(i) != "=":
                    if tag == "blockquote" and name == "expandable":
                        expandable = True
                        continue
                    raise EntityParseError(
                        f'Expected equal sign in declaration of an attribute of the tag "{tag}" at byte offset {offset}'
                    )
                i += 1
                while i < n and space(text[i]):
                    i += 1
                if i >= n:
                    raise EntityParseError(f'Unclosed start tag "{tag}" at byte offset {offset}')
                if text[i] not in "'\"":
                    token_begin = i
                    while i < n and ((text[i].isascii() and text[i].isalnum()) or text[i] in ".-"):
                        i += 1
                    value = text[token_begin:i].lower()
                    if not space(at(i)) and at(i) != ">":
                        raise EntityParseError(
                            f"Unexpected end of name token at byte offset {_byte_offset(text, token_begin)}"
                        )
                else:
                    quote = text[i]
                    i += 1
                    chars: list[str] = []
                    while i < n and text[i] != quote:
                        if text[i] == "&":
                            code, end = _decode_html_entity(text, i)
                            if code:
                                chars.append(chr(code))
                                i = end
                                continue
                        chars.append(text[i])
                        i += 1
                    if i < n:
                        i += 1
                    value = "".join(chars)
                if i >= n:
                    raise EntityParseError(f"Unclosed start tag at byte offset {offset}")
                if tag == "a" and name == "href":
                    argument = value
                elif tag == "code" and name == "class" and value.startswith("language-"):
                    argument = value[9:]
                elif tag == "span" and name == "class" and value.startswith("tg-"):
                    argument = value[3:]
                elif tag == "tg-emoji" and name == "emoji-id":
                    argument = value
            if tag == "span" and argument != "spoiler":
                raise EntityParseError(f'Tag "span" must have class "tg-spoiler" at byte offset {offset}')
            stack.append((tag, argument, u16, len(out), begin, expandable))
            i += 1
            continue

        # an end tag
        if not stack:
            raise EntityParseError(f"Unexpected end tag at byte offset {offset}")
        while not space(at(i)) and at(i) != ">":
            i += 1
        end_tag = text[begin + 2 : i].lower()
        while i < n and space(text[i]):
            i += 1
        if at(i) != ">":
            raise EntityParseError(f"Unclosed end tag at byte offset {offset}")
        tag, argument, start, pieces, _, expandable = stack[-1]
        if end_tag and end_tag != tag:
            raise EntityParseError(
                f'Unmatched end tag at byte offset {offset}, expected "</{tag}>", found "</{end_tag}>"'
            )
        if u16 > start:
            length = u16 - start
            if tag in ("i", "em"):
                entities.append(_entity("italic", start, length))
            elif tag in ("b", "strong"):
                entities.append(_entity("bold", start, length))
            elif tag in ("s", "strike", "del"):
                entities.append(_entity("strikethrough", start, length))
            elif tag in ("u", "ins"):
                entities.append(_entity("underline", start, length))
            elif tag in ("tg-spoiler", "span"):
                entities.append(_entity("spoiler", start, length))
            elif tag == "tg-emoji":
                try:
                    emoji_id = int(argument)
                except ValueError:
                    emoji_id = 0
                if emoji_id == 0 or abs(emoji_id) >= 2**63:
                    raise EntityParseError("Invalid custom emoji identifier specified")
                entities.append(_entity("custom_emoji", start, length, custom_emoji_id=str(emoji_id)))
            elif tag == "a":
                url = argument or "".join(out[pieces:])
                user_id = _link_user_id(url)
                if user_id is not None:
                    entities.append(_entity("text_mention", start, length, user={"id": user_id}))
                else:
                    try:
                        entities.append(_entity("text_link", start, length, url=check_link(url)))
                    except LinkError:
                        pass
            elif tag == "pre":
                last = entities[-1] if entities else None
                if (
                    last is not None
                    and last["type"] == "code"
                    and last["offset"] == start
                    and last["length"] == length
                    and last.get("language")
                ):
                    last["type"] = "pre"
                else:
                    entities.append(_entity("pre", start, length))
            elif tag == "code":
                last = entities[-1] if entities else None
                if (
                    last is not None
                    and last["type"] == "pre"
                    and last["offset"] == start
                    and last["length"] == length
                    and argument
                ):
                    last["language"] = argument
                else:
                    entities.append(_entity("code", start, length, language=argument or None))
            elif tag == "blockquote":
                entities.append(_entity("expandable_blockquote" if expandable else "blockquote", start, length))
        stack.pop()
        i += 1

    if stack:
        raise EntityParseError(f"Can't find end tag corresponding to start tag {stack[-1][0]}")
    for entity in entities:
        if entity["type"] == "code":
            entity.pop("language", None)
    result = "".join(out)
    if surrogates:
        raise EntityParseError(
            "Text contains invalid Unicode characters after decoding HTML entities, check for unmatched "
            "surrogate code units"
        )
    return FormattedText(result, sort_entities(entities))


# --------------------------------------------------------------------------- explicit entities

UserLookup = Callable[[int], "dict[str, Any] | None"]


def _int_field(item: Mapping[str, Any], name: str) -> int:
    if name not in item:
        raise FormattingError(f"can't parse MessageEntity: Can't find field \"{name}\"")
    value = item[name]
    if isinstance(value, bool):
        raise FormattingError(f"can't parse MessageEntity: Field \"{name}\" must be of type Number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise FormattingError(f"can't parse MessageEntity: Field \"{name}\" must be of type Number")


def _str_field(item: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    if name not in item:
        if required:
            raise FormattingError(f"can't parse MessageEntity: Can't find field \"{name}\"")
        return None
    value = item[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise FormattingError(f"can't parse MessageEntity: Field \"{name}\" must be of type String")
    return value


def parse_entities_json(value: Any, *, find_user: UserLookup | None = None) -> list[Entity]:
    """Read the ``entities`` parameter like the Bot API's ``get_text_entity``.

    A value that is not a JSON array is ignored (the server treats it as absent); types
    Telegram detects by itself (``url``, ``mention``, ...) are dropped; an unknown type or
    a missing field raises :class:`FormattingError` (``can't parse MessageEntity: ...``).
    """
    if not isinstance(value, list):
        return []
    result: list[Entity] = []
    for item in value:
        if not isinstance(item, Mapping):
            raise FormattingError("can't parse MessageEntity: expected an Object")
        offset = _int_field(item, "offset")
        length = _int_field(item, "length")
        kind = _str_field(item, "type", required=True)
        if not kind:
            raise FormattingError("can't parse MessageEntity: Type is not specified")
        if kind in _AUTO_TYPES:
            continue
        if kind not in ENTITY_TYPES:
            raise FormattingError("can't parse MessageEntity: Unsupported type specified")
        entity = _entity(kind, offset, length)
        if kind == "text_link":
            url = _str_field(item, "url", required=True) or ""
            user_id = _link_user_id(url)
            if user_id is not None:
                entity = _entity("text_mention", offset, length, user={"id": user_id})
            else:
                try:
                    entity["url"] = check_link(url)
                except LinkError as exc:
                    raise FormattingError(_lower_first(f"Entity {exc}")) from None
        elif kind == "text_mention":
            user = item.get("user")
            if not isinstance(user, Mapping):
                raise FormattingError("can't parse MessageEntity: Can't find field \"user\"")
            user_id = _int_field(user, "id")
            found = find_user(user_id) if find_user is not None else {"id": user_id}
            if found is None:
                raise FormattingError("user not found")
            entity["user"] = dict(found)
        elif kind == "pre":
            language = _str_field(item, "language", required=False)
            if language:
                entity["language"] = language
        elif kind == "custom_emoji":
            raw = _str_field(item, "custom_emoji_id", required=True) or ""
            if not re.fullmatch(r"-?\d+", raw.strip()):
                raise FormattingError("can't parse MessageEntity: Field \"custom_emoji_id\" must be a valid Number")
            if int(raw) == 0:
                raise FormattingError("invalid custom emoji identifier specified")
            entity["custom_emoji_id"] = str(int(raw))
        elif kind == "date_time":
            entity["unix_time"] = _int_field(item, "unix_time")
            date_time_format = _str_field(item, "date_time_format", required=False)
            if date_time_format:
                entity["date_time_format"] = date_time_format
        result.append(entity)
    return result


# --------------------------------------------------------------------------- fix_formatted_text

_CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f]")  # tab included, as in TDLib
_REMOVED = re.compile(r"[\r\u2028-\u202e\u0333\u033f\u030a]")


def _remove_intersecting(entities: list[Entity]) -> list[Entity]:
    """Keep only non-intersecting entities (TDLib ``remove_intersecting_entities``)."""
    kept: list[Entity] = []
    last_end = 0
    for entity in entities:
        if entity["offset"] >= last_end:
            kept.append(entity)
            last_end = entity["offset"] + entity["length"]
    return kept


def _fix_entities(entities: list[Entity]) -> list[Entity]:
    """Drop entities that may not overlap (continuous ones, block quotations)."""
    sort_entities(entities)
    splittable = [e for e in entities if e["type"] in _SPLITTABLE]
    quotes = _remove_intersecting([e for e in entities if e["type"] in _BLOCKQUOTES])
    continuous = _remove_intersecting([e for e in entities if e["type"] not in _SPLITTABLE | _BLOCKQUOTES])
    continuous = [e for e in continuous if not _crosses_any(e, quotes)]
    return sort_entities(continuous + quotes + splittable)


def _crosses_any(entity: Entity, others: list[Entity]) -> bool:
    """True if ``entity`` overlaps one of ``others`` without being nested inside it."""
    start, end = entity["offset"], entity["offset"] + entity["length"]
    for other in others:
        o_start, o_end = other["offset"], other["offset"] + other["length"]
        if start < o_end and o_start < end and not (o_start <= start and end <= o_end):
            return True
    return False


def _clean(text: str, entities: list[Entity]) -> str:
    """Replace control characters by spaces and remove ``\\r`` and a few invisible
    characters, shifting entities (TDLib ``clean_input_string_with_entities``)."""
    if _CONTROL.search(text):
        text = _CONTROL.sub(" ", text)
    if not _REMOVED.search(text):
        return text
    removed_u16: list[int] = []
    astral = _astral_positions(text)
    for match in _REMOVED.finditer(text):
        removed_u16.append(match.start() + bisect.bisect_left(astral, match.start()))
    for entity in entities:
        start, end = entity["offset"], entity["offset"] + entity["length"]
        new_start = start - bisect.bisect_left(removed_u16, start)
        new_end = end - bisect.bisect_left(removed_u16, end)
        entity["offset"], entity["length"] = new_start, new_end - new_start
    return _REMOVED.sub("", text)


def _check_ranges(text: str, entities: list[Entity]) -> None:
    """TDLib's range checks, with its messages (reported for the first offender)."""
    total = utf16_len(text)
    for entity in entities:
        if entity["offset"] > total:
            raise FormattingError(f"entity begins after the end of the text at UTF-16 offset {entity['offset']}")
    for entity in entities:
        start, end = entity["offset"], entity["offset"] + entity["length"]
        if end > total:
            raise FormattingError(
                f"entity beginning at UTF-16 offset {start} ends after the end of the text at UTF-16 offset {end}"
            )
    astral = _astral_positions(text)
    if not astral:
        return
    for entity in entities:
        start, end = entity["offset"], entity["offset"] + entity["length"]
        if _from_utf16(astral, len(text), start) is None:
            after = _from_utf16(astral, len(text), start + 1) or 0
            raise FormattingError(
                f"entity begins in a middle of a UTF-16 symbol at byte offset {_byte_offset(text, after)}"
            )
        if _from_utf16(astral, len(text), end) is None:
            after = _from_utf16(astral, len(text), end + 1) or 0
            raise FormattingError(
                f"entity beginning at UTF-16 offset {start} ends in a middle of a UTF-16 symbol at byte offset "
                f"{_byte_offset(text, after)}"
            )


def _drop_whitespace_entities(text: str, entities: list[Entity]) -> list[Entity]:
    """Remove entities over spaces/newlines only; trim leading whitespace off the rest."""
    if not entities:
        return entities
    ascii_text = text.isascii()
    kept: list[Entity] = []
    for entity in entities:
        if entity["type"] in _HIDDEN_DATA:
            kept.append(entity)
            continue
        covered = (
            text[entity["offset"] : entity["offset"] + entity["length"]]
            if ascii_text
            else utf16_slice(text, entity["offset"], entity["length"])
        )
        stripped = covered.lstrip(" \n")
        if not stripped.strip(" \n"):
            continue
        lead = len(covered) - len(stripped)
        if lead:
            entity["offset"] += lead
            entity["length"] -= lead
        kept.append(entity)
    return kept


def fix_formatted_text(
    text: str,
    entities: list[Entity],
    *,
    allow_empty: bool = False,
    detect_entities: bool = True,
) -> FormattedText:
    """Normalise text and entities the way TDLib does before a message is stored.

    Validates entity ranges (``entity beginning at UTF-16 offset ... ends after the end of
    the text ...``), cleans control characters, drops whitespace-only entities, trims
    leading and trailing spaces/newlines (so ``"Hi "`` is stored as ``"Hi"``), refuses
    whitespace-only text (``message must be non-empty``) unless ``allow_empty``, and adds
    the entities Telegram detects by itself (``url``, ``mention``, ``bot_command``, ...).
    """
    entities = [dict(e) for e in entities]
    for entity in entities:
        if not 0 <= entity["offset"] <= 1_000_000:
            raise FormattingError(f"receive an entity with incorrect offset {entity['offset']}")
        if not 0 <= entity["length"] <= 1_000_000:
            raise FormattingError(f"receive an entity with incorrect length {entity['length']}")
    entities = [e for e in entities if e["length"] > 0]
    if entities:
        entities = _fix_entities(entities)
        _check_ranges(text, entities)
    text = _clean(text, entities)
    entities = [e for e in entities if e["length"] > 0]
    entities = _drop_whitespace_entities(text, entities)

    stripped_right = text.rstrip(" \n")
    if not stripped_right:
        if allow_empty:
            return FormattedText("", [])
        raise FormattingError("message must be non-empty")
    if len(stripped_right) != len(text):
        end = utf16_len(stripped_right)
        trimmed: list[Entity] = []
        for entity in entities:
            if entity["offset"] >= end:
                continue
            if entity["offset"] + entity["length"] > end:
                entity["length"] = end - entity["offset"]
            trimmed.append(entity)
        entities = trimmed
        text = stripped_right
    first_entity = min((e["offset"] for e in entities), default=None)
    lead = len(text) - len(text.lstrip(" \n"))
    if first_entity is not None:
        lead = min(lead, first_entity)
    if lead:
        text = text[lead:]
        for entity in entities:
            entity["offset"] -= lead
    if detect_entities:
        found = find_entities(text)
        if found:
            blockers = [e for e in entities if e["type"] not in _SPLITTABLE]
            entities.extend(e for e in found if not _overlaps_any(e, blockers))
    return FormattedText(text, sort_entities(entities))


def _overlaps_any(entity: Entity, others: list[Entity]) -> bool:
    start, end = entity["offset"], entity["offset"] + entity["length"]
    for other in others:
        if other["type"] in _BLOCKQUOTES:
            if start < other["offset"] + other["length"] and other["offset"] < end and not (
                other["offset"] <= start and end <= other["offset"] + other["length"]
            ):
                return True
            continue
        if start < other["offset"] + other["length"] and other["offset"] < end:
            return True
    return False


def format_text(
    text: str,
    parse_mode: str | None = None,
    entities: Any = None,
    *,
    allow_empty: bool = False,
    find_user: UserLookup | None = None,
) -> FormattedText:
    """The whole pipeline the Bot API applies to a ``text`` parameter.

    ``parse_mode`` (case-insensitive ``MarkdownV2``/``Markdown``/``HTML``/``None``) wins
    over ``entities``; otherwise ``entities`` is read as the decoded JSON array. Raises
    :class:`FormattingError` with the Bot API description (sans ``Bad Request: ``). The
    4096-character limit is *not* checked here: its error text depends on the method.
    """
    if len(text.encode("utf-8", errors="surrogatepass")) > 1 << 15:
        raise FormattingError("text is too long")
    mode = (parse_mode or "").lower()
    if text and mode and mode != "none":
        parser = {"markdown": parse_markdown, "markdownv2": parse_markdown_v2, "html": parse_html}.get(mode)
        if parser is None:
            raise FormattingError("unsupported parse_mode")
        try:
            parsed = parser(text)
        except EntityParseError as exc:
            raise FormattingError(f"can't parse entities: {exc}") from None
        if find_user is not None:
            for entity in parsed.entities:
                if entity["type"] == "text_mention":
                    user = find_user(entity["user"]["id"])
                    if user is None:
                        raise FormattingError("user not found")
                    entity["user"] = dict(user)
        raw_text, raw_entities = parsed.text, parsed.entities
    else:
        raw_text, raw_entities = text, parse_entities_json(entities, find_user=find_user)
    try:
        return fix_formatted_text(raw_text, raw_entities, allow_empty=allow_empty)
    except FormattingError as exc:
        raise FormattingError(_lower_first(exc.description)) from None


# --------------------------------------------------------------------------- find_entities

# Scheme-less links are recognised only for these top-level domains (TDLib has the full
# IANA list; these cover what chat text and our tests contain).
_COMMON_TLDS = frozenset(
    "com org net io dev ai app me co ru de uk us info biz edu gov fr jp cn in br it es nl eu ca au ch se no "
    "pl tv xyz online site tech to ly gl gg sh cc ua by kz tr ir be at dk fi cz pt gr hu ro il kr tw hk sg "
    "mx ar cl id vn th my ph nz za ng ke pro mobi name travel museum jobs cloud page link blog shop store "
    "news live email space website club one top bot".split()
)
_WORD = re.compile(r"\w")
_URL = re.compile(
    r"(?<![\w.\-/#@:])"
    r"(?:(?P<scheme>https?|ftp)://)?"
    r"(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9\-_]{0,61}[A-Za-z0-9])?\.)+(?P<tld>[A-Za-z]{2,24}|xn--[A-Za-z0-9\-]{1,59})"
    r"|\d{1,3}(?:\.\d{1,3}){3})"
    r"(?::\d{1,5})?"
    r"(?:[/?#][^\s<>\"'`«»“”]*)?",
)
_TG_URL = re.compile(r"\b(?:tg|ton)://[A-Za-z0-9_\-]+(?:[/?][^\s<>\"'`]*)?", re.IGNORECASE)
_EMAIL = re.compile(
    r"[A-Za-z0-9_\-]+(?:[.+][A-Za-z0-9_\-]+)*@(?:[A-Za-z0-9](?:[A-Za-z0-9_\-]{0,28}[A-Za-z0-9])?\.){1,6}[A-Za-z]{2,8}"
)
_TRAILING = ".,:;!?'\""


def _is_word(ch: str) -> bool:
    return ch == "_" or ch.isalnum()


def _is_hashtag_char(ch: str) -> tuple[bool, bool]:
    """(may be part of a hashtag, is a letter)."""
    if ch in "_\u200c\u00b7" or "\u0d80" <= ch <= "\u0dff":
        return True, False
    category = unicodedata.category(ch)
    if category[0] == "L":
        return True, True
    return category == "Nd", False


def _find_mentions(text: str) -> list[tuple[int, int, str]]:
    result = []
    for match in re.finditer("@", text):
        start = match.start()
        if start and _is_word(text[start - 1]):
            continue
        end = start + 1
        while end < len(text) and text[end].isascii() and (text[end].isalnum() or text[end] == "_"):
            end += 1
        size = end - start - 1
        if not 4 <= size <= 32:
            continue
        if end < len(text) and _is_word(text[end]):
            continue
        result.append((start, end, "mention"))
    return result


def _find_bot_commands(text: str) -> list[tuple[int, int, str]]:
    result = []
    n = len(text)
    for match in re.finditer("/", text):
        start = match.start()
        if start and (_is_word(text[start - 1]) or text[start - 1] in "/<>"):
            continue
        end = start + 1
        while end < n and text[end].isascii() and (text[end].isalnum() or text[end] == "_"):
            end += 1
        if not 1 <= end - start - 1 <= 64:
            continue
        if end < n and text[end] == "@":
            mention_end = end + 1
            while mention_end < n and text[mention_end].isascii() and (
                text[mention_end].isalnum() or text[mention_end] == "_"
            ):
                mention_end += 1
            if not 3 <= mention_end - end - 1 <= 32:
                continue
            end = mention_end
        if end < n and (_is_word(text[end]) or text[end] in "/<>"):
            continue
        result.append((start, end, "bot_command"))
    return result


def _find_hashtags(text: str, mark: str, kind: str) -> list[tuple[int, int, str]]:
    result = []
    n = len(text)
    for match in re.finditer(re.escape(mark), text):
        start = match.start()
        if start and _is_hashtag_char(text[start - 1])[0]:
            continue
        end = start + 1
        letter = False
        while end < n:
            ok, is_letter = _is_hashtag_char(text[end])
            if not ok:
                break
            letter = letter or is_letter
            end += 1
        if end - start - 1 < 1 or end - start - 1 > 256:
            continue
        if end < n and text[end] == mark:
            continue
        if not letter:
            continue
        result.append((start, end, kind))
    return result


def _find_cashtags(text: str) -> list[tuple[int, int, str]]:
    result = []
    for match in re.finditer(r"\$(1INCH|[A-Z]{1,8})", text):
        start, end = match.span()
        if start and (_is_hashtag_char(text[start - 1])[0] or text[start - 1] == "$"):
            continue
        if end < len(text) and (_is_hashtag_char(text[end])[0] or text[end] == "$"):
            continue
        result.append((start, end, "cashtag"))
    return result


_SPACE = re.compile(r"\s")


def _token_spans(text: str, positions: list[int]) -> list[tuple[int, int]]:
    """The whitespace-delimited tokens containing the given positions (each once).

    Why: Python's regex engine costs ~30 ns per character tried, so running the URL
    pattern over every 4 KB edit of a benchmark would dominate the fake's CPU; cheap
    ``str.find`` scans pick the few tokens worth matching.
    """
    spans: list[tuple[int, int]] = []
    done = -1
    for pos in positions:
        if pos < done:
            continue
        start = max(text.rfind(" ", 0, pos), text.rfind("\n", 0, pos), text.rfind("\t", 0, pos)) + 1
        found = _SPACE.search(text, pos)
        end = found.start() if found else len(text)
        spans.append((start, end))
        done = end
    return spans


def _find_all(text: str, needle: str) -> list[int]:
    positions = []
    pos = text.find(needle)
    while pos != -1:
        positions.append(pos)
        pos = text.find(needle, pos + 1)
    return positions


def _find_urls(text: str) -> list[tuple[int, int, str]]:
    result: list[tuple[int, int, str]] = []
    n = len(text)
    emails: list[tuple[int, int, str]] = []
    if "@" in text:
        for start_tok, end_tok in _token_spans(text, _find_all(text, "@")):
            for match in _EMAIL.finditer(text, start_tok, end_tok):
                start, end = match.span()
                if start and (_is_word(text[start - 1]) or text[start - 1] in ".+-@"):
                    continue
                if end < n and _is_word(text[end]):
                    continue
                emails.append((start, end, "email"))
    result.extend(emails)
    dots = [p for p in _find_all(text, ".") if 0 < p < n - 1 and text[p - 1].isalnum() and text[p + 1].isalnum()]
    for start_tok, end_tok in _token_spans(text, dots):
        for match in _URL.finditer(text, start_tok, end_tok):
            start, end = match.span()
            if not match.group("scheme"):
                tld = (match.group("tld") or "").lower()
                if tld not in _COMMON_TLDS and not tld.startswith("xn--"):
                    continue
            while end > start and text[end - 1] in _TRAILING:
                end -= 1
            while end > start and text[end - 1] == ")" and text.count("(", start, end) < text.count(")", start, end):
                end -= 1
            if any(s < end and start < e for s, e, _ in emails):
                continue
            result.append((start, end, "url"))
    if "tg:" in text or "ton:" in text or "TG:" in text:
        for match in _TG_URL.finditer(text):
            start, end = match.span()
            while end > start and text[end - 1] in _TRAILING:
                end -= 1
            result.append((start, end, "url"))
    return result


def find_entities(text: str) -> list[Entity]:
    """Entities Telegram detects in plain text: ``mention``, ``bot_command``,
    ``hashtag``, ``cashtag``, ``url``, ``email`` (UTF-16 offsets, sorted).

    Used for incoming user messages (so PTB's ``CommandHandler`` sees ``bot_command``) and
    merged into the bot's own messages, exactly as Telegram returns them.
    """
    spans: list[tuple[int, int, str]] = []
    if "@" in text:
        spans += _find_mentions(text)
    if "/" in text:
        spans += _find_bot_commands(text)
    if "#" in text:
        spans += _find_hashtags(text, "#", "hashtag")
    if "$" in text:
        spans += _find_cashtags(text)
    if "." in text or "@" in text or ":" in text:
        spans += _find_urls(text)
    if not spans:
        return []
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    kept: list[tuple[int, int, str]] = []
    last_end = 0
    for start, end, kind in spans:
        if start >= last_end and end > start:
            kept.append((start, end, kind))
            last_end = end
    astral = _astral_positions(text)
    entities = []
    for start, end, kind in kept:
        u_start = start + bisect.bisect_left(astral, start)
        u_end = end + bisect.bisect_left(astral, end)
        entities.append(_entity(kind, u_start, u_end - u_start))
    return sort_entities(entities)
