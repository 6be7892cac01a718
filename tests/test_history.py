"""History trimming to a budget, and how cut-off turns are shown to the model."""

from __future__ import annotations

import pytest

from bots.history import (
    FAILED_NOTE,
    INTERRUPTED_NOTE,
    complete_tool_exchanges,
    estimate_tokens,
    render_interrupted,
    trim_history,
    turn_for_model,
)

SYSTEM = "You are a helpful bot."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def call(call_id: str, name: str = "search", arguments: str = '{"q":"x"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*ids: str, text: str | None = None) -> dict:
    return {"role": "assistant", "content": text, "tool_calls": [call(i) for i in ids]}


def result(call_id: str, text: str = "found it") -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def simple_turn(n: int) -> list[dict]:
    return [user(f"question {n}"), assistant(f"answer {n}")]


def tool_turn(n: int) -> list[dict]:
    return [user(f"look up {n}"), calls(f"c{n}"), result(f"c{n}"), assistant(f"done {n}")]


CURRENT = [user("the current question")]


# ----------------------------------------------------------------------------- trimming


def test_everything_fits_in_a_generous_budget() -> None:
    turns = [simple_turn(1), tool_turn(2), simple_turn(3)]
    sent = trim_history(SYSTEM, turns, CURRENT, max_messages=100, max_tokens=10_000)
    assert sent == [{"role": "system", "content": SYSTEM}, *turns[0], *turns[1], *turns[2], *CURRENT]


def test_message_budget_drops_the_oldest_turns_first() -> None:
    turns = [simple_turn(1), simple_turn(2), simple_turn(3)]
    # system + current = 2 messages; room for 2 turns of 2 messages each.
    sent = trim_history(SYSTEM, turns, CURRENT, max_messages=6, max_tokens=10_000)
    assert sent == [{"role": "system", "content": SYSTEM}, *turns[1], *turns[2], *CURRENT]


def test_token_budget_drops_the_oldest_turns_first() -> None:
    turns = [simple_turn(1), simple_turn(2), simple_turn(3)]
    fixed = estimate_tokens({"role": "system", "content": SYSTEM}) + estimate_tokens(CURRENT[0])
    one_turn = sum(map(estimate_tokens, turns[2]))
    sent = trim_history(SYSTEM, turns, CURRENT, max_messages=100, max_tokens=fixed + one_turn)
    assert sent == [{"role": "system", "content": SYSTEM}, *turns[2], *CURRENT]
    sent = trim_history(SYSTEM, turns, CURRENT, max_messages=100, max_tokens=fixed + one_turn - 1)
    assert sent == [{"role": "system", "content": SYSTEM}, *CURRENT]


def test_system_prompt_and_current_turn_are_kept_even_over_budget() -> None:
    current = [user("x" * 10_000), calls("c1"), result("c1", "y" * 10_000)]
    sent = trim_history(SYSTEM, [simple_turn(1)], current, max_messages=1, max_tokens=1)
    assert sent == [{"role": "system", "content": SYSTEM}, *current]


def test_without_a_system_prompt_no_system_message_is_invented() -> None:
    for prompt in (None, ""):
        assert trim_history(prompt, [simple_turn(1)], CURRENT, max_messages=10, max_tokens=1000) == [
            *simple_turn(1),
            *CURRENT,
        ]


def test_a_tool_turn_is_dropped_whole_never_split() -> None:
    turns = [simple_turn(1), tool_turn(2)]
    # Room for 3 more messages: the 4-message tool turn does not fit, and nothing older is
    # taken in its place (that would leave a gap in the conversation).
    sent = trim_history(SYSTEM, turns, CURRENT, max_messages=5, max_tokens=10_000)
    assert sent == [{"role": "system", "content": SYSTEM}, *CURRENT]
    assert not any(m["role"] == "tool" for m in sent)


def test_empty_turns_are_ignored_and_budgets_must_be_non_negative() -> None:
    assert trim_history(None, [[], simple_turn(1), []], CURRENT, max_messages=3, max_tokens=1000) == [
        *simple_turn(1),
        *CURRENT,
    ]
    with pytest.raises(ValueError):
        trim_history(None, [], CURRENT, max_messages=-1, max_tokens=10)


def test_token_estimate_grows_with_text_tool_calls_and_images() -> None:
    short, long = estimate_tokens(user("hi")), estimate_tokens(user("hi" * 400))
    assert short < long
    assert estimate_tokens(user("a" * 400)) == 4 + 100  # documented: chars / 4 plus overhead
    assert estimate_tokens(calls("c1")) > estimate_tokens({"role": "assistant", "content": None})
    with_image = {
        "role": "user",
        "content": [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:"}}],
    }
    assert estimate_tokens(with_image) > estimate_tokens(user("what is this")) + 100


# ----------------------------------------------------------------------------- cut-off turns


def test_interrupted_text_gets_the_note_appended() -> None:
    turn = [user("write a poem"), assistant("Roses are red,")]
    assert render_interrupted(turn) == [user("write a poem"), assistant(f"Roses are red,\n\n{INTERRUPTED_NOTE}")]
    assert turn[1] == assistant("Roses are red,")  # the stored turn is not modified


def test_interrupted_before_any_text_adds_a_note_message() -> None:
    assert render_interrupted([user("hi")]) == [user("hi"), assistant(INTERRUPTED_NOTE)]


def test_interrupted_mid_tool_drops_the_unanswered_call() -> None:
    turn = [
        user("compare a and b"),
        calls("c1"),
        result("c1"),
        calls("c2", "c3", text="Now the second one."),
        result("c2"),  # c3 never answered: the turn was stopped
    ]
    assert render_interrupted(turn) == [
        user("compare a and b"),
        calls("c1"),
        result("c1"),
        assistant(f"Now the second one.\n\n{INTERRUPTED_NOTE}"),
    ]


def test_complete_tool_exchanges_drops_orphans_and_keeps_complete_ones() -> None:
    turn = [user("q"), result("stray"), calls("a", "b"), result("b"), result("a"), calls("c"), assistant("x")]
    assert complete_tool_exchanges(turn) == [user("q"), calls("a", "b"), result("b"), result("a"), assistant("x")]


def test_turn_for_model_by_status() -> None:
    ok = tool_turn(1)
    assert turn_for_model(ok, "ok") == ok
    assert turn_for_model([user("q"), assistant("partial")], "interrupted")[-1] == assistant(
        f"partial\n\n{INTERRUPTED_NOTE}"
    )
    assert turn_for_model([user("q")], "error") == [user("q"), assistant(FAILED_NOTE)]
    assert turn_for_model([user("q")], "running") == [user("q")]
    assert turn_for_model(ok, "superseded") == []


def test_list_content_gets_the_note_as_a_text_part() -> None:
    partial = {"role": "assistant", "content": [{"type": "text", "text": "half"}]}
    assert render_interrupted([user("q"), partial])[-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "half"}, {"type": "text", "text": INTERRUPTED_NOTE}],
    }
