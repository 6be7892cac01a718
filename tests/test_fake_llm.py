"""The fake provider itself: auth, scripting bookkeeping, records, bench mode, standalone run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.fakes.llm import API_KEY, FakeLLM, Reply, bench_text

ROOT = Path(__file__).resolve().parent.parent


def client(fake: FakeLLM, **kwargs: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0, **kwargs)  # type: ignore[arg-type]


async def stream_text(c: openai.AsyncOpenAI, model: str = "fake-model", **kwargs: object) -> str:
    stream = await c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, **kwargs  # type: ignore[call-overload]
    )
    parts = []
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def plain_text(c: openai.AsyncOpenAI, model: str = "fake-model") -> str:
    completion = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return completion.choices[0].message.content or ""


async def test_wrong_key_gets_openais_401(fake_llm: FakeLLM) -> None:
    c = openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="sk-wrong-000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await plain_text(c)
    assert info.value.code == "invalid_api_key"
    assert "sk-wrong-000000000000" not in str(info.value)  # masked like OpenAI does
    assert fake_llm.requests[0].status == 401


async def test_stream_options_without_stream_is_rejected_like_openai(fake_llm: FakeLLM) -> None:
    with pytest.raises(openai.BadRequestError, match="only allowed when 'stream' is enabled"):
        await client(fake_llm).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}], stream_options={"include_usage": True}
        )


async def test_default_reply_echoes_and_records(fake_llm: FakeLLM) -> None:
    assert await stream_text(client(fake_llm), stream_options={"include_usage": True}) == "You said: hi"
    (record,) = fake_llm.requests
    assert record.stream and record.stream_options and record.source == "default"
    assert record.messages == [{"role": "user", "content": "hi"}]
    assert record.t_received <= (record.t_first_token_sent or 0) <= (record.t_done or 0)


async def test_script_is_consumed_in_order_by_either_request_kind(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text("one"), Reply.text("two"))
    c = client(fake_llm)
    assert await stream_text(c) == "one"
    assert await plain_text(c) == "two"
    assert await plain_text(c) == "You said: hi"
    assert fake_llm.pending == 0


async def test_a_faulted_stream_leaves_its_reply_for_the_fallback(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text("complete reply", fault="abort_midstream"), Reply.text("next"))
    c = client(fake_llm)
    with pytest.raises(openai.APIConnectionError):
        await stream_text(c)
    assert fake_llm.pending == 2
    assert await plain_text(c) == "complete reply"
    assert await stream_text(c) == "next"


async def test_an_abandoned_stream_reply_is_skipped_by_the_next_stream(fake_llm: FakeLLM) -> None:
    hold = asyncio.Event()
    fake_llm.script(Reply.text("interrupted reply", hold=hold, hold_at=1), Reply.text("next turn"))
    c = client(fake_llm)
    stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    iterator = stream.__aiter__()
    while not (await iterator.__anext__()).choices[0].delta.content:
        pass
    await stream.close()
    await fake_llm.wait_for(lambda: fake_llm.requests[0].disconnected)
    assert await stream_text(c) == "next turn"


async def test_a_429_entry_is_served_again_to_the_sdk_retry(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text("patience", fault="429"))
    assert await stream_text(client(fake_llm).with_options(max_retries=1)) == "patience"
    assert [r.status for r in fake_llm.requests] == [429, 200]


async def test_unknown_fault_mode_is_a_loud_400(fake_llm: FakeLLM) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown fault mode"):
        await stream_text(client(fake_llm), model="fault:no_such_mode")
    fake_llm.script(Reply.text("x", fault="failed"))  # a Responses-only mode on the chat endpoint
    with pytest.raises(openai.BadRequestError, match="unknown fault mode"):
        await stream_text(client(fake_llm))


async def test_tool_results_get_a_deterministic_default_answer(fake_llm: FakeLLM) -> None:
    completion = await client(fake_llm).chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
    )
    assert completion.choices[0].message.content == "Tool results: 42"


async def test_responses_events_are_numbered_and_complete(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.tool_calls([("t", {"a": 1})], text_before="Hi", reasoning="hm"))
    stream = await client(fake_llm).responses.create(model="m", input="x", stream=True)
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    completed = events[-1].response
    assert [item.type for item in completed.output] == ["reasoning", "message", "function_call"]
    assert completed.usage is not None and completed.usage.total_tokens > 0


async def test_wait_for_times_out_with_an_assertion(fake_llm: FakeLLM) -> None:
    with pytest.raises(AssertionError, match="timed out"):
        await fake_llm.wait_for(lambda: len(fake_llm.requests) > 0, timeout=0.05)


async def test_hold_blocks_the_reply_until_released(fake_llm: FakeLLM) -> None:
    hold = asyncio.Event()
    fake_llm.script(Reply.text("held", hold=hold))
    task = asyncio.create_task(plain_text(client(fake_llm)))
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 1)
    assert not task.done() and fake_llm.requests[0].t_done is None
    hold.set()
    assert await asyncio.wait_for(task, 5) == "held"


@pytest.mark.parametrize("rate", [0, 400])
async def test_bench_mode_streams_the_deterministic_text(fake_llm: FakeLLM, rate: int) -> None:
    model = f"bench:tokens=40,rate={rate},ttft=0,chunk=3,seed=7,tick=0.01"
    chunks = []
    stream = await client(fake_llm).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
    assert "".join(chunks) == bench_text(40, 7)
    assert len(chunks) == 14  # ceil(40 / 3)
    assert [len(c.split()) for c in chunks] == [3] * 13 + [1]
    assert fake_llm.requests[0].t_first_token_sent is not None
    assert bench_text(40, 7) != bench_text(40, 8)
    assert set(bench_text(200, 1)) <= set("abcdefghijklmnopqrstuvwxyz ")


async def test_records_over_http_and_reset(fake_llm: FakeLLM) -> None:
    await plain_text(client(fake_llm))
    base = fake_llm.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/_fake/requests?brief=1") as resp:
            data = await resp.json()
        assert [r["model"] for r in data["requests"]] == ["fake-model"]
        assert "messages" not in data["requests"][0]
        async with session.post(f"{base}/_fake/reset") as resp:
            assert resp.status == 200
    assert fake_llm.requests == []


async def test_models_endpoint(fake_llm: FakeLLM) -> None:
    page = await client(fake_llm).models.list()
    assert [m.id for m in page.data] == ["fake-model", "other-model"]
    fake_llm.listed_models = ["only-this"]
    page = await client(fake_llm).models.list()
    assert [m.id for m in page.data] == ["only-this"]


async def test_no_models_endpoint_is_a_404(fake_llm: FakeLLM) -> None:
    fake_llm.listed_models = None
    with pytest.raises(openai.NotFoundError):
        await client(fake_llm).models.list()


def test_standalone_process_serves_the_api() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.llm", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        base_url = line.strip().rsplit(" ", 1)[-1]
        sync = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        completion = sync.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "ping"}])
        assert completion.choices[0].message.content == "You said: ping"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
