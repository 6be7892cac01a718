"""The SSE decoder (agent/sse.py): WHATWG framing, any split of the bytes, and the SDK as oracle."""

from __future__ import annotations

import random

import pytest
from openai._streaming import SSEDecoder as SdkDecoder

from agent.sse import SSEDecoder

Events = list[tuple[str | None, bytes]]


def decode(*reads: bytes) -> tuple[Events, bool]:
    """Feed the reads in order; return the events and whether `close()` reported a cut event."""
    decoder = SSEDecoder()
    out: Events = []
    for read in reads:
        out.extend(decoder.feed(read))
    return out, decoder.close()


def every_split(stream: bytes) -> list[list[bytes]]:
    """The stream as two reads at every byte boundary, and as one read per byte."""
    splits = [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]
    splits.append([stream[i : i + 1] for i in range(len(stream))])
    return splits


# A stream with every framing rule in it: BOM, comments, event names, id/retry lines, CRLF,
# lone CR, multi-line data, `data:` without the space, empty-data events and an unknown field.
RICH = (
    b"\xef\xbb\xbfdata: {\"a\":1}\n"
    b": a comment\n\n"
    b"event: response.created\r\ndata: {\"b\":2}\r\n\r\n"
    b"id: 7\rretry: 3000\r\r"  # an empty-data event (only id and retry): skipped
    b"data:{\"c\":\r\ndata: 3}\n\n"
    b": keepalive\n\n"
    b"event: ping\n\n"  # no data: skipped
    b"error: {\"ignored\": true}\n"  # an unknown field
    b"data:  two spaces\n\n"
    b"data: [DONE]\n\n"
)
RICH_EVENTS: Events = [
    (None, b'{"a":1}'),
    ("response.created", b'{"b":2}'),
    (None, b'{"c":\n3}'),
    (None, b" two spaces"),
    (None, b"[DONE]"),
]


@pytest.mark.parametrize("reads", every_split(RICH), ids=lambda r: f"{len(r)}reads:{len(r[0])}")
def test_any_split_of_the_bytes_decodes_the_same(reads: list[bytes]) -> None:
    assert decode(*reads) == (RICH_EVENTS, False)


def test_several_events_in_one_read_and_one_event_over_many() -> None:
    assert decode(b"data: 1\n\ndata: 2\n\ndata: 3\n\n") == ([(None, b"1"), (None, b"2"), (None, b"3")], False)
    big = b"x" * 100_000
    reads = [b"data: "] + [big[i : i + 7] for i in range(0, len(big), 7)] + [b"\n", b"\n"]
    assert decode(*reads) == ([(None, big)], False)


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(nl: bytes) -> None:
    stream = b"event: e" + nl + b"data: a" + nl + b"data: b" + nl + nl + b"data: c" + nl + nl
    assert decode(stream) == ([("e", b"a\nb"), (None, b"c")], False)


def test_crlf_split_between_reads_is_one_line_end() -> None:
    # "a\r" | "\n" must not become a line end plus a blank line (which would dispatch "a" alone)
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == ([(None, b"a\nb")], False)
    # while a lone CR really is a line end, even when the next read starts a new line
    assert decode(b"data: a\r", b"\r") == ([(None, b"a")], False)


def test_event_name_is_reset_after_each_dispatch() -> None:
    events, _ = decode(b"event: error\ndata: {}\n\ndata: {}\n\n")
    assert events == [("error", b"{}"), (None, b"{}")]


@pytest.mark.parametrize(
    "stream",
    [b"event: ping\n\n", b"retry: 3000\n\n", b"id: 1\n\n", b"data:\n\n", b"data\n\n", b": only a comment\n\n", b"\n\n\n"],
)
def test_empty_data_events_are_skipped_not_errors(stream: bytes) -> None:
    assert decode(stream + b"data: x\n\n") == ([(None, b"x")], False)


def test_empty_data_after_an_id_line_is_skipped() -> None:
    """The SDK's decoder keeps the last id and dispatches an empty event on the next blank
    line, which `json.loads("")` turns into a JSONDecodeError (reference §2)."""
    assert decode(b"id: 1\ndata: a\n\n: ping\n\ndata: b\n\n")[0] == [(None, b"a"), (None, b"b")]


@pytest.mark.parametrize(
    ("reads", "events"),
    [
        ([b"data: a\n\ndata: b\n"], [(None, b"a")]),  # the last event lacks its blank line
        ([b"data: a\n\ndata: b"], [(None, b"a")]),  # ... or even its line end
        ([b"data: a\n\nda"], [(None, b"a")]),
    ],
)
def test_an_unterminated_last_event_is_dropped_and_reported(reads: list[bytes], events: Events) -> None:
    assert decode(*reads) == (events, True)


def test_a_clean_end_is_not_reported_as_cut() -> None:
    assert decode(b"data: a\n\n")[1] is False
    assert decode(b"data: a\n\n: trailing comment\n")[1] is False
    assert decode(b"")[1] is False


@pytest.mark.parametrize("reads", [[b"\xef\xbb\xbfdata: x\n\n"], [b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"], [b"\xef\xbb", b"\xbfdata: x\n\n"]])
def test_a_leading_bom_is_dropped(reads: list[bytes]) -> None:
    assert decode(*reads) == ([(None, b"x")], False)


def test_a_bom_later_in_the_stream_is_data() -> None:
    assert decode(b"data: a\n\n", b"\xef\xbb\xbfdata: b\n\n")[0] == [(None, b"a")]  # a field named "\ufeffdata"
    assert decode(b"data: \xef\xbb\xbfb\n\n")[0] == [(None, b"\xef\xbb\xbfb")]


def test_a_short_stream_that_only_looks_like_a_bom_start_is_kept() -> None:
    assert decode(b"d", b"ata: x\n\n") == ([(None, b"x")], False)
    assert decode(b"\xef", b"data: x\n\n")[1] is False  # not a BOM: a field named "\xefdata"


# -- the SDK's decoder as an oracle -----------------------------------------------------

_LINES = [
    b'data: {"k": 1}', b"data:x", b"data:  two", b"data", b"data:", b": comment", b"event: e1", b"event:",
    b"bogus: 1", b"id: 5", b"retry: 10", b"", b"", b"", "data: caf\u00e9".encode(),
]


def _random_stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 30)):
        parts.append(rng.choice(_LINES) + rng.choice([b"\n", b"\r\n", b"\r"]))
    return b"".join(parts) + b"\n"


def _sdk_events(stream: bytes) -> list[tuple[str | None, bytes]]:
    """What openai-python's decoder dispatches, minus the empty-data events we skip by design."""
    events = SdkDecoder().iter_bytes(iter([stream]))
    return [(e.event or None, e.data.encode()) for e in events if e.data]


@pytest.mark.parametrize("seed", range(200))
def test_agrees_with_the_sdk_decoder_on_random_streams_and_splits(seed: int) -> None:
    rng = random.Random(seed)
    stream = _random_stream(rng)
    cuts = sorted(rng.sample(range(len(stream) + 1), k=min(len(stream) + 1, rng.randint(0, 8))))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    events, _ = decode(*reads)
    assert [(e, d) for e, d in events] == _sdk_events(stream)
