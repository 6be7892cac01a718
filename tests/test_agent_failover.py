"""Several providers: fallback chains, the circuit breaker, images -- the real openai SDK
against two (or three) fake providers on 127.0.0.1, each with its own faults."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent import Agent, ProviderBadRequest, ProviderServerError, ProviderUnavailable, ToolRegistry
from agent.providers import Catalogue, ModelSpec, chain_problems
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents
from tests.support.fakeclock import FakeClock


@pytest.fixture
async def second_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(listed_models=("backup-model",)) as fake:
        yield fake


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens: connection refused


def catalogue(primary: Any, backup: Any, **kwargs: Any) -> Catalogue:
    return Catalogue(
        {"main": primary, "spare": backup},
        (
            ModelSpec("fake-model", "main", display_name="Main"),
            ModelSpec("backup", "spare", id="backup-model", display_name="Backup"),
        ),
        fallback=("backup",),
        **kwargs,
    )


async def test_primary_unreachable_second_answers_streamed(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    second_llm.script(Reply.text("Backup here.", chunk=3))
    primary = fake_llm.config(base_url=dead_url())
    events = RecordingEvents()
    async with Agent(catalogue(primary, second_llm.config()), tools=ToolRegistry()) as agent:
        result = await agent.run_turn([], "hi", events)
    assert result.text == "Backup here." and events.text == "Backup here."
    assert result.asked == "fake-model" and result.answered_by == "backup" and result.fallback_model == "backup"
    assert result.model == "backup-model"  # usage is booked to the model that answered
    (request,) = second_llm.requests
    assert request.model == "backup-model" and request.stream


@pytest.mark.parametrize("status", [500, 503, 429, 401])
async def test_primary_errors_another_provider_can_fix(fake_llm: FakeLLM, second_llm: FakeLLM, status: int) -> None:
    fake_llm.outage = status
    second_llm.script(Reply.text("Backup here."))
    async with Agent(catalogue(fake_llm.config(), second_llm.config()), tools=ToolRegistry()) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == "Backup here." and result.fallback_model == "backup"


async def test_a_bad_request_is_not_retried_on_another_model(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    fake_llm.outage = 400
    async with Agent(catalogue(fake_llm.config(), second_llm.config()), tools=ToolRegistry()) as agent:
        with pytest.raises(ProviderBadRequest):
            await agent.run_turn([], "hi", RecordingEvents())
    assert second_llm.requests == []
    assert agent.breaker.state("fake-model") == "closed"  # not the model's fault


async def test_a_stream_that_breaks_falls_back_then_fails_over_and_shows_one_answer(
    fake_llm: FakeLLM, second_llm: FakeLLM
) -> None:
    # The primary streams some words, the stream breaks, its non-streaming fallback gets 500.
    fake_llm.script(Reply.text("Partial answer from the primary that will", chunk=5))
    second_llm.script(Reply.text("Whole answer.", chunk=4))
    primary = fake_llm.config(model="fault:abort_midstream+nonstream_500")
    cat = Catalogue(
        {"main": primary, "spare": second_llm.config()},
        (ModelSpec("fault:abort_midstream+nonstream_500", "main"), ModelSpec("backup", "spare", id="backup-model")),
        fallback=("backup",),
    )
    events = RecordingEvents()
    async with Agent(cat, tools=ToolRegistry()) as agent:
        result = await agent.run_turn([], "hi", events)
    assert result.text == "Whole answer."
    assert events.fallbacks == [""]  # what the primary showed was withdrawn once
    assert events.text.endswith("Whole answer.")


async def test_breaker_opens_skips_and_probes_again(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    clock = FakeClock()
    fake_llm.outage = 503
    cat = catalogue(fake_llm.config(), second_llm.config(), breaker_failures=2, breaker_cooldown=30)
    async with Agent(cat, tools=ToolRegistry(), clock=clock.now) as agent:
        for _ in range(2):
            await agent.run_turn([], "hi", RecordingEvents())
        assert agent.breaker.state("fake-model") == "open"
        asked = len(fake_llm.requests)
        result = await agent.run_turn([], "hi", RecordingEvents())  # skipped: straight to the backup
        assert len(fake_llm.requests) == asked and result.answered_by == "backup"
        snapshot = agent.health()["breaker"]["fake-model"]
        assert snapshot["state"] == "open" and snapshot["retry_in"] == 30
        await clock.advance(31)
        fake_llm.outage = None
        fake_llm.script(Reply.text("Main is back."))
        result = await agent.run_turn([], "hi", RecordingEvents())  # the probe
        assert result.text == "Main is back." and result.fallback_model is None
        assert agent.breaker.state("fake-model") == "closed"


async def test_every_model_failing_raises_the_last_error(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    fake_llm.outage = 500
    second_llm.outage = 503
    async with Agent(catalogue(fake_llm.config(), second_llm.config()), tools=ToolRegistry()) as agent:
        with pytest.raises(ProviderServerError):
            await agent.run_turn([], "hi", RecordingEvents())
    # The primary is left at once for the backup; the last model of the chain gets the
    # usual non-streaming retry after its stream failed.
    assert len(fake_llm.requests) == 1 and len(second_llm.requests) == 2


async def test_a_turn_with_images_skips_models_that_cannot_see(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    from agent import image_part, text_part
    from tests.support.media import png

    second_llm.script(Reply.text("A red dot."))
    cat = Catalogue(
        {"main": fake_llm.config(), "spare": second_llm.config()},
        (ModelSpec("fake-model", "main", images=False), ModelSpec("backup", "spare", id="backup-model")),
    )
    async with Agent(cat, tools=ToolRegistry()) as agent:
        result = await agent.run_turn([], [text_part("what is this?"), image_part(png(), "image/png")], RecordingEvents())
    assert result.text == "A red dot." and result.answered_by == "backup"
    assert fake_llm.requests == []  # never asked: it cannot see


async def test_chains_follow_fallbacks_depth_first_once_each(fake_llm: FakeLLM) -> None:
    p = fake_llm.config()
    cat = Catalogue(
        {"p": p},
        (ModelSpec("a", "p", fallback=("b",)), ModelSpec("b", "p", fallback=("c",)), ModelSpec("c", "p"),
         ModelSpec("d", "p")),
        fallback=("d", "a"),
    )
    assert [m.name for m in cat.chain("a")] == ["a", "b", "c", "d"]
    assert [m.name for m in cat.chain("d")] == ["d", "a", "b", "c"]
    assert [m.name for m in cat.chain("renamed-long-ago")][1:] == ["d", "a", "b", "c"]


def test_chain_problems_name_the_key() -> None:
    models = [ModelSpec("a", "p", fallback=("b",)), ModelSpec("b", "p", fallback=("a",)), ModelSpec("c", "p", fallback=("zz",))]
    problems = chain_problems(models, ["nope"])
    assert "fallback: unknown model 'nope'" in problems
    assert "models.c.fallback: unknown model 'zz'" in problems
    assert any(p.startswith("models.b.fallback: a cycle: a -> b -> a") or "a cycle" in p for p in problems)
    with pytest.raises(ValueError, match="a cycle"):
        Catalogue({"p": None}, tuple(models[:2]))  # type: ignore[dict-item]


async def test_single_provider_config_is_unchanged(fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    fake_llm.outage = 500
    async with Agent(fake_llm.config(), tools=ToolRegistry()) as agent:
        for turn in range(5):  # the breaker never keeps a chat's only model from being asked
            before = len(fake_llm.requests)
            with pytest.raises(ProviderUnavailable):
                await agent.run_turn([], "hi", RecordingEvents())
            assert len(fake_llm.requests) > before, turn
        assert agent.breaker.state("fake-model") == "closed"
    assert "skipped" not in caplog.text
