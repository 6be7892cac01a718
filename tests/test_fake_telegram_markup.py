"""The fake Telegram's formatting rules: parsers, entity validation, normalisation.

Error texts are TDLib's (test/message_entities.cpp and the reference §10); offsets in
parser errors are UTF-8 byte offsets, entity offsets are UTF-16 code units.
"""

from __future__ import annotations

import pytest

from tests.fakes.telegram_markup import (
    EntityParseError,
    FormattingError,
    LinkError,
    check_link,
    find_entities,
    fix_formatted_text,
    format_text,
    from_utf16_offset,
    parse_html,
    parse_markdown,
    parse_markdown_v2,
    to_utf16_offset,
    utf16_len,
    utf16_slice,
)

RESERVED = "Character '{}' is reserved and must be escaped with the preceding '\\'"


# --------------------------------------------------------------------------- UTF-16


def test_utf16_helpers_count_astral_characters_twice() -> None:
    text = "a😀b"
    assert utf16_len(text) == 4
    assert to_utf16_offset(text, 2) == 3
    assert from_utf16_offset(text, 3) == 2
    assert from_utf16_offset(text, 2) is None  # the middle of the surrogate pair
    assert utf16_slice(text, 1, 2) == "😀"


# --------------------------------------------------------------------------- MarkdownV2


@pytest.mark.parametrize(
    ("source", "text", "entities"),
    [
        ("*bold* _it_ __u__ ~s~ ||sp||", "bold it u s sp", [
            {"offset": 0, "length": 4, "type": "bold"},
            {"offset": 5, "length": 2, "type": "italic"},
            {"offset": 8, "length": 1, "type": "underline"},
            {"offset": 10, "length": 1, "type": "strikethrough"},
            {"offset": 12, "length": 2, "type": "spoiler"},
        ]),
        ("*a _b_ c*", "a b c", [
            {"offset": 0, "length": 5, "type": "bold"},
            {"offset": 2, "length": 1, "type": "italic"},
        ]),
        ("`x \\` y`", "x ` y", [{"offset": 0, "length": 5, "type": "code"}]),
        ("```python\nprint(1)\n```", "print(1)\n", [{"offset": 0, "length": 9, "type": "pre", "language": "python"}]),
        ("[site](https://example.com)", "site", [
            {"offset": 0, "length": 4, "type": "text_link", "url": "https://example.com/"},
        ]),
        ("[Ann](tg://user?id=77)", "Ann", [{"offset": 0, "length": 3, "type": "text_mention", "user": {"id": 77}}]),
        ("[x](not a url)", "x", []),  # an invalid link is dropped, not an error
        ("a\\.b\\!", "a.b!", []),
        ("😀 *b*", "😀 b", [{"offset": 3, "length": 1, "type": "bold"}]),
        (">quote\n>more\nafter", "quote\nmore\nafter", [{"offset": 0, "length": 11, "type": "blockquote"}]),
        ("**", "", []),
    ],
)  # fmt: skip
def test_markdown_v2_parses_to_text_and_utf16_entities(source: str, text: str, entities: list[dict]) -> None:
    parsed = parse_markdown_v2(source)
    assert parsed.text == text
    assert parsed.entities == entities


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("Hello.", RESERVED.format(".")),
        ("1+1=2", RESERVED.format("+")),
        ("a-b", RESERVED.format("-")),
        ("(x)", RESERVED.format("(")),
        ("#tag", RESERVED.format("#")),
        ("x > y", RESERVED.format(">")),
        ("🏟 🏟!", RESERVED.format("!")),
        ("*unclosed", "Can't find end of Bold entity at byte offset 0"),
        ("🏟 🏟_abacaba", "Can't find end of Italic entity at byte offset 9"),
        ("🏟 🏟`", "Can't find end of Code entity at byte offset 9"),
        ("🏟 🏟```", "Can't find end of Pre entity at byte offset 9"),
        ("🏟 🏟```a ", "Can't find end of PreCode entity at byte offset 9"),
        ("🏟 🏟_🏟 🏟__", "Can't find end of Underline entity at byte offset 19"),
        ("🏟 🏟||test\\|", "Can't find end of Spoiler entity at byte offset 9"),
        ("~strike", "Can't find end of Strikethrough entity at byte offset 0"),
        ("[link", "Can't find end of TextUrl entity at byte offset 0"),
        ("[telegram\\.org](asd", "Can't find end of a URL at byte offset 16"),
        ("🏟 🏟![👍]", "Custom emoji entity must contain a tg://emoji URL"),
        ("*a\nb", "Can't find end of Bold entity at byte offset 0"),
        (">q *b\nc*", "Can't find end of Bold entity at byte offset 3"),  # a quote line ends inside bold
        ("Here is *partial", "Can't find end of Bold entity at byte offset 8"),  # LLM text mid-stream
    ],
)
def test_markdown_v2_errors_are_tdlib_texts(source: str, error: str) -> None:
    with pytest.raises(EntityParseError) as info:
        parse_markdown_v2(source)
    assert str(info.value) == error


def test_ptb_escape_markdown_output_always_parses() -> None:
    from telegram.helpers import escape_markdown

    nasty = "_*[]()~`>#+-=|{}.!\\ 😀 end."
    parsed = parse_markdown_v2(escape_markdown(nasty, version=2))
    assert parsed.text == nasty
    assert parsed.entities == []


# --------------------------------------------------------------------------- legacy Markdown


def test_legacy_markdown() -> None:
    parsed = parse_markdown("*b* _i_ `c` [l](http://x.com) a\\_b")
    assert parsed.text == "b i c l a_b"
    assert [e["type"] for e in parsed.entities] == ["bold", "italic", "code", "text_link"]
    with pytest.raises(EntityParseError, match=r"^Can't find end of the entity starting at byte offset 6$"):
        parse_markdown("Hello *world")


# --------------------------------------------------------------------------- HTML


def test_html_tags_and_character_references() -> None:
    parsed = parse_html('<b>b</b> <i>i</i> <a href="https://t.me">t</a> &lt;&amp;&gt;&quot; &#128512; &#x41;')
    assert parsed.text == 'b i t <&>" 😀 A'
    assert parsed.entities == [
        {"offset": 0, "length": 1, "type": "bold"},
        {"offset": 2, "length": 1, "type": "italic"},
        {"offset": 4, "length": 1, "type": "text_link", "url": "https://t.me/"},
    ]
    pre = parse_html('<pre><code class="language-py">x = 1</code></pre>')
    assert pre.entities == [{"offset": 0, "length": 5, "type": "pre", "language": "py"}]
    quote = parse_html("<blockquote expandable>q</blockquote><tg-spoiler>s</tg-spoiler>")
    assert [e["type"] for e in quote.entities] == ["expandable_blockquote", "spoiler"]


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("<x>y</x>", 'Unsupported start tag "x" at byte offset 0'),
        ("a <email@example.com>", 'Unsupported start tag "email@example.com" at byte offset 2'),
        ("<b>bold", "Can't find end tag corresponding to start tag b"),
        ("<b>a</i>", 'Unmatched end tag at byte offset 4, expected "</b>", found "</i>"'),
        ("</b>", "Unexpected end tag at byte offset 0"),
        ("<b", "Unclosed start tag at byte offset 0"),
        ("<b>x</b", "Unclosed end tag at byte offset 4"),
        ("<span>s</span>", 'Tag "span" must have class "tg-spoiler" at byte offset 0'),
        ('<a href="x" =y>t</a>', 'Empty attribute name in the tag "a" at byte offset 0'),
        ("<tg-emoji emoji-id=0>x</tg-emoji>", "Invalid custom emoji identifier specified"),
    ],
)
def test_html_errors_are_tdlib_texts(source: str, error: str) -> None:
    with pytest.raises(EntityParseError) as info:
        parse_html(source)
    assert str(info.value) == error


# --------------------------------------------------------------------------- the pipeline


def test_format_text_wraps_parser_errors_like_the_bot_api() -> None:
    with pytest.raises(FormattingError) as info:
        format_text("a.b", "MarkdownV2")
    assert info.value.description == "can't parse entities: " + RESERVED.format(".")
    with pytest.raises(FormattingError, match="^unsupported parse_mode$"):
        format_text("hi", "XML")
    assert format_text("*b*", "markdownv2").entities == [{"offset": 0, "length": 1, "type": "bold"}]
    assert format_text("*b*", "None").text == "*b*"  # parse_mode none = plain text


def test_parse_mode_wins_over_entities() -> None:
    result = format_text("*b*", "MarkdownV2", [{"type": "italic", "offset": 0, "length": 3}])
    assert result.entities == [{"offset": 0, "length": 1, "type": "bold"}]


@pytest.mark.parametrize(
    ("entities", "error"),
    [
        ([{"type": "zzz", "offset": 0, "length": 1}], "can't parse MessageEntity: Unsupported type specified"),
        ([{"offset": 0, "length": 1}], "can't parse MessageEntity: Can't find field \"type\""),
        ([{"type": "bold", "length": 1}], "can't parse MessageEntity: Can't find field \"offset\""),
        ([{"type": "text_link", "offset": 0, "length": 1}], "can't parse MessageEntity: Can't find field \"url\""),
        ([{"type": "bold", "offset": 0, "length": 100}],
         "entity beginning at UTF-16 offset 0 ends after the end of the text at UTF-16 offset 100"),
        ([{"type": "bold", "offset": 9, "length": 1}], "entity begins after the end of the text at UTF-16 offset 9"),
        ([{"type": "text_link", "offset": 0, "length": 1, "url": "localhost"}],
         "entity URL 'localhost' is invalid: Wrong HTTP URL"),
        (["bold"], "can't parse MessageEntity: expected an Object"),
    ],
)  # fmt: skip
def test_entities_are_validated(entities: list, error: str) -> None:
    with pytest.raises(FormattingError) as info:
        format_text("hello", None, entities)
    assert info.value.description == error


def test_entity_offsets_are_utf16_code_units() -> None:
    ok = format_text("😀 bold", None, [{"type": "bold", "offset": 3, "length": 4}])
    assert ok.entities == [{"offset": 3, "length": 4, "type": "bold"}]
    with pytest.raises(FormattingError, match="^entity begins in a middle of a UTF-16 symbol at byte offset 4$"):
        format_text("😀 bold", None, [{"type": "bold", "offset": 1, "length": 2}])


def test_detected_entity_types_in_explicit_entities_are_ignored() -> None:
    assert format_text("hello", None, [{"type": "url", "offset": 0, "length": 5}]).entities == []


def test_text_is_trimmed_and_whitespace_only_text_refused() -> None:
    assert format_text("  hi there \n\n").text == "hi there"
    with pytest.raises(FormattingError, match="^message must be non-empty$"):
        format_text(" \n ")
    with pytest.raises(FormattingError, match="^message must be non-empty$"):
        format_text("**", "MarkdownV2")
    assert format_text(" ", allow_empty=True).text == ""


def test_cleaning_shifts_entities_and_drops_whitespace_only_ones() -> None:
    result = fix_formatted_text(
        "a\r\nb\tc", [{"type": "bold", "offset": 3, "length": 1}, {"type": "italic", "offset": 1, "length": 1}]
    )
    assert result.text == "a\nb c"  # \r removed, tab -> space
    assert result.entities == [{"offset": 2, "length": 1, "type": "bold"}]


def test_raw_text_over_32_kib_is_refused() -> None:
    with pytest.raises(FormattingError, match="^text is too long$"):
        format_text("x" * 32769)


# --------------------------------------------------------------------------- detection


def test_find_entities_like_telegram() -> None:
    text = "/start@parley_bot hi @someone see https://example.com/x. and example.org, #tag $USD a.b@c.com"
    found = [(e["type"], utf16_slice(text, e["offset"], e["length"])) for e in find_entities(text)]
    assert found == [
        ("bot_command", "/start@parley_bot"),
        ("mention", "@someone"),
        ("url", "https://example.com/x"),
        ("url", "example.org"),
        ("hashtag", "#tag"),
        ("cashtag", "$USD"),
        ("email", "a.b@c.com"),
    ]


@pytest.mark.parametrize("text", ["a/start", "/start/x", "3.14", "file.txt", "#123", "x@ab"])
def test_find_entities_ignores_lookalikes(text: str) -> None:
    assert find_entities(text) == []


def test_bot_messages_get_detected_entities_merged() -> None:
    result = format_text("see https://t.me now", None, [{"type": "bold", "offset": 0, "length": 3}])
    assert result.entities == [
        {"offset": 0, "length": 3, "type": "bold"},
        {"offset": 4, "length": 12, "type": "url"},
    ]


def test_check_link() -> None:
    assert check_link("example.com") == "http://example.com/"
    assert check_link("https://a.b/c?d") == "https://a.b/c?d"
    assert check_link("tg://resolve?domain=x") == "tg://resolve?domain=x"
    for bad, reason in [("nodot", "Wrong HTTP URL"), ("ftp://a.com", "Unsupported URL protocol")]:
        with pytest.raises(LinkError, match=reason):
            check_link(bad)
