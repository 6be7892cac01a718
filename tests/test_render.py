"""Layout: cutting a growing reply into messages that fit, at good boundaries, fences intact."""

from __future__ import annotations

import random

import pytest

from bots.render import Layout, best_cut, open_fence, text_length


def plain_len(text: str) -> int:
    return len(text)


def make_layout(limit: int, final_len=plain_len) -> Layout:
    return Layout(limit, plain_len, final_len)


def test_text_length_counts_utf16_units() -> None:
    assert text_length("a😀", utf16=False) == 2
    assert text_length("a😀", utf16=True) == 3


def test_open_fence_tracks_language_and_closing() -> None:
    assert open_fence("hi\n```python\nx = 1\n") == ("```", "python")
    assert open_fence("```python\nx = 1\n```\n") is None
    assert open_fence("~~~~\ncode\n~~~\n") == ("~~~~", "")
    assert open_fence("inline ``` not a fence") is None


@pytest.mark.parametrize(
    "text,limit,expected",
    [
        ("aaaa bbbb\n\ncccc dddd eeee", 20, len("aaaa bbbb\n\n")),
        ("aaaa bbbb cc\ndddd eeee", 20, len("aaaa bbbb cc\n")),
        ("This is a sentence. Another one goes on", 30, len("This is a sentence. ")),
        ("word " * 10, 12, 10),
        ("x" * 50, 20, 20),
    ],
)
def test_best_cut_prefers_paragraph_line_sentence_word(text: str, limit: int, expected: int) -> None:
    assert best_cut(text, limit) == expected


def test_best_cut_ignores_a_boundary_that_would_leave_a_sliver() -> None:
    text = "a\n" + "b" * 30 + " " + "c" * 30
    cut = best_cut(text, 40)
    assert cut == len("a\n" + "b" * 30 + " ")


def test_short_document_is_one_live_piece() -> None:
    layout = make_layout(100)
    pieces = layout.pieces("hello world", final=False)
    assert [(p.text, p.committed) for p in pieces] == [("hello world", False)]
    assert layout.pieces("   ", final=False) == []


def test_growing_document_commits_and_keeps_earlier_pieces_stable() -> None:
    layout = make_layout(50)
    rng = random.Random(1)
    words = [rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(200)]
    doc = ""
    seen_committed: list[str] = []
    for w in words:
        doc += w + (" " if rng.random() > 0.1 else "\n")
        pieces = layout.pieces(doc, final=False)
        committed = [p.text for p in pieces if p.committed]
        assert committed[: len(seen_committed)] == seen_committed  # never moves
        seen_committed = committed
        for p in pieces:
            assert len(p.text) <= 50
        assert "".join(doc[p.start : p.end] for p in pieces) == doc.rstrip() or "".join(
            doc[p.start : p.end] for p in pieces
        ) == doc


def test_changed_prefix_uncommits_and_relayouts() -> None:
    layout = make_layout(30)
    doc = "first paragraph is long enough\n\nsecond paragraph also long\n\nthird"
    before = layout.pieces(doc, final=False)
    assert len(before) >= 2 and before[0].committed
    replaced = "⚙️ search…"
    after = layout.pieces(replaced, final=False)
    assert [p.text for p in after] == [replaced]


def test_fence_closed_at_cut_and_reopened_with_language() -> None:
    code = "\n".join(f"print({i})" for i in range(40))
    doc = "Here is code:\n```python\n" + code + "\n```\nDone."
    layout = make_layout(120)
    pieces = layout.pieces(doc, final=True)
    assert len(pieces) > 2
    for i, p in enumerate(pieces):
        assert len(p.text) <= 120
        assert open_fence(p.text) is None, p.text  # every message's fences are balanced
        if i > 0 and pieces[i - 1].reopen:
            assert p.text.startswith("```python\n")
    # Every line of the original appears exactly once, in order, across the pieces.
    shown_lines = [ln for p in pieces for ln in p.text.split("\n")]
    orig_lines = doc.split("\n")
    it = iter(shown_lines)
    assert all(any(ln == s for s in it) for ln in orig_lines)
    extra_fences = sum(1 for ln in shown_lines if ln.startswith("```")) - sum(
        1 for ln in orig_lines if ln.startswith("```")
    )
    assert extra_fences == 2 * sum(1 for p in pieces if p.reopen)


def test_final_measure_forces_smaller_pieces() -> None:
    # A renderer that doubles length (pessimistic markdown) must still yield pieces that fit.
    layout = Layout(100, plain_len, lambda t: 2 * len(t))
    doc = " ".join(["word"] * 100)
    pieces = layout.pieces(doc, final=True)
    assert all(2 * len(p.text) <= 100 for p in pieces)
    assert "".join(doc[p.start : p.end] for p in pieces) == doc


def test_utf16_measure_is_respected() -> None:
    layout = Layout(10, lambda t: text_length(t, utf16=True), lambda t: text_length(t, utf16=True))
    doc = "😀" * 12
    pieces = layout.pieces(doc, final=True)
    assert all(text_length(p.text, utf16=True) <= 10 for p in pieces)
    assert "".join(p.text for p in pieces) == doc


def test_shrink_and_uncommit() -> None:
    layout = make_layout(400)
    doc = "abc " * 300
    n = len(layout.pieces(doc, final=False))
    layout.uncommit(0)
    layout.shrink()
    assert layout.limit == 360
    assert len(layout.pieces(doc, final=False)) >= n
