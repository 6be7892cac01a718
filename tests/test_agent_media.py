"""The agent's side of media: image parts on both APIs, vision refusals, transcription.

The real openai SDK against the fake provider (tests/fakes/llm.py), which records the image
parts it received, refuses images for `blind_models` the way OpenAI does, and serves
`/v1/audio/transcriptions`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import pytest

from agent import (
    Agent,
    ProviderBadRequest,
    ProviderNoVision,
    ToolRegistry,
    TranscriptionConfig,
    TranscriptionFailed,
    image_part,
    text_part,
)
from agent.provider import to_provider_error
from bots.gateway import NO_VISION_TEXT, friendly_error
from tests.fakes.llm import API_KEY, FakeLLM, Reply, TranscriptionFault
from tests.fakes.llm_fixtures import RecordingEvents
from tests.support.media import jpeg, png

APIS = ["chat_completions", "responses"]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("api", APIS)
async def test_content_parts_reach_the_model_with_the_exact_bytes(fake_llm: FakeLLM, api: str, stream: bool) -> None:
    photo, chart = jpeg(4000), png(500)
    async with Agent(fake_llm.config(api=api), tools=ToolRegistry()) as agent:
        result = await agent.run_turn(
            [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}],
            [text_part("compare"), image_part(photo, "image/jpeg"), image_part(chart, "image/png")],
            RecordingEvents(wants_deltas=stream),
        )
    (request,) = fake_llm.requests
    assert request.stream is stream
    assert request.image_bytes() == [photo, chart]
    assert result.text == "You said: compare"
    user = request.messages[-1]
    if api == "responses":
        assert user["content"][0] == {"type": "input_text", "text": "compare"}
        assert {k: v for k, v in user["content"][1].items() if k != "image_url"} == {"type": "input_image", "detail": "auto"}
    else:
        assert user["content"][1]["image_url"]["detail"] == "auto"
    assert result.messages == [{"role": "assistant", "content": "You said: compare"}], "the user message is the caller's"


async def test_a_malformed_content_part_is_refused_before_any_request(fake_llm: FakeLLM) -> None:
    async with Agent(fake_llm.config(), tools=ToolRegistry()) as agent:
        with pytest.raises(TypeError):
            await agent.run_turn([], [{"text": "no type"}])
        with pytest.raises(ValueError):
            await agent.run_turn([], [])
    assert fake_llm.requests == []


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("api", APIS)
async def test_a_model_that_cannot_see_raises_no_vision_after_one_request(fake_llm: FakeLLM, api: str, stream: bool) -> None:
    fake_llm.blind_models.add("fake-model")
    fake_llm.script(Reply.text("never sent"))
    async with Agent(fake_llm.config(api=api), tools=ToolRegistry()) as agent:
        with pytest.raises(ProviderNoVision) as raised:
            await agent.run_turn([], [text_part("what?"), image_part(jpeg(), "image/jpeg")], RecordingEvents(stream))
    assert len(fake_llm.requests) == 1, "no non-streaming fallback: the same images would be refused again"
    assert raised.value.status_code == 400
    assert friendly_error(raised.value) == NO_VISION_TEXT
    assert fake_llm.pending == 1


async def test_text_to_a_model_that_cannot_see_works(fake_llm: FakeLLM) -> None:
    fake_llm.blind_models.add("fake-model")
    async with Agent(fake_llm.config(), tools=ToolRegistry()) as agent:
        result = await agent.run_turn([{"role": "user", "content": "[image: cat.jpg, 2 KB]"}], "hi", RecordingEvents())
    assert result.text == "You said: hi"


async def test_bytes_the_provider_cannot_decode_are_a_bad_request_not_a_blind_model(fake_llm: FakeLLM) -> None:
    async with Agent(fake_llm.config(), tools=ToolRegistry()) as agent:
        with pytest.raises(ProviderBadRequest) as raised:
            await agent.run_turn([], [image_part(b"not an image", "image/jpeg")], RecordingEvents(wants_deltas=False))
    assert not isinstance(raised.value, ProviderNoVision)
    assert friendly_error(raised.value) == "⚠️ The model couldn't read this image. Please try a smaller JPEG or PNG."


def _status_error(status: int, message: str) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx2.Response(status, request=request, json={"error": {"message": message}})
    return openai.APIStatusError(message, response=response, body={"error": {"message": message}})


@pytest.mark.parametrize(
    ("status", "message", "images", "blind"),
    [
        (400, "Invalid content type. image_url is only supported by certain models.", True, True),  # OpenAI
        (404, "No endpoints found that support image input", True, True),  # OpenRouter
        (422, "Failed to deserialize the JSON body into the target type: messages[0]: unknown variant `image_url`, "
              "expected `text`", True, True),  # DeepSeek
        (400, "Qwen/Qwen2.5-7B-Instruct is not a multimodal model", True, True),  # vLLM
        (400, "image exceeds 5 MB maximum: 6291456 bytes > 5242880 bytes", True, False),  # the model sees; too big
        (400, "You uploaded an unsupported image. Please make sure your image is valid.", True, False),
        (400, "Invalid content type. image_url is only supported by certain models.", False, False),  # no images sent
        (400, "This model's maximum context length is 128000 tokens.", True, False),
        (404, "The model `gpt-image-1` does not exist or you do not have access to it.", True, False),
    ],
)
def test_which_refusals_mean_the_model_cannot_see(status: int, message: str, images: bool, blind: bool) -> None:
    error = to_provider_error(_status_error(status, message), images=images)
    assert isinstance(error, ProviderBadRequest)
    assert isinstance(error, ProviderNoVision) is blind


# ---- transcription -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_transcription_goes_through_the_providers_client_by_default(fake_llm: FakeLLM, transport: str) -> None:
    fake_llm.script_transcripts("hello from the voice note")
    audio = b"OggS" + bytes(100)
    seen: list[tuple[str, str]] = []
    agent = Agent(fake_llm.config(transport=transport), tools=ToolRegistry(),
                  on_request=lambda kind, attempt: seen.append((kind, attempt)))  # fmt: skip
    async with agent:
        text = await agent.transcribe(audio, filename="voice.ogg", mime="audio/ogg")
    assert text == "hello from the voice note"
    (record,) = fake_llm.transcriptions
    assert (record.model, record.filename, record.content_type, record.data) == ("whisper-1", "voice.ogg", "audio/ogg", audio)
    assert seen == [("transcription", "first")], "counted like every other request a provider may bill"


async def test_transcription_with_its_own_endpoint_uses_its_own_key_and_model(fake_llm: FakeLLM) -> None:
    async with FakeLLM(api_key="sk-whisper-elsewhere-0123456789") as whisper:
        whisper.script_transcripts("elsewhere")
        config = TranscriptionConfig(model="whisper-large-v3", base_url=whisper.base_url, api_key=whisper.api_key)
        async with Agent(fake_llm.config(), tools=ToolRegistry(), transcription=config) as agent:
            assert await agent.transcribe(b"RIFF-wav", filename="note.wav") == "elsewhere"
        assert [r.model for r in whisper.transcriptions] == ["whisper-large-v3"]
    assert fake_llm.transcriptions == []


@pytest.mark.parametrize(
    ("item", "filename", "audio", "reason", "code"),
    [
        (TranscriptionFault(500), "voice.ogg", b"OggS", "unavailable", None),
        (TranscriptionFault(429, "Rate limit reached"), "voice.ogg", b"OggS", "rate_limited", None),
        (None, "voice.ogg", b"", "rejected", "audio_too_short"),
        (None, "voice.aiff", b"FORM", "rejected", None),
    ],
)
async def test_transcription_failures_are_one_typed_error(
    fake_llm: FakeLLM, item: Any, filename: str, audio: bytes, reason: str, code: str | None
) -> None:
    if item is not None:
        fake_llm.script_transcripts(item)
    async with Agent(fake_llm.config(), tools=ToolRegistry()) as agent:
        with pytest.raises(TranscriptionFailed) as raised:
            await agent.transcribe(audio, filename=filename)
    assert raised.value.reason == reason
    assert raised.value.code == code


async def test_a_wrong_transcription_key_is_an_auth_failure_that_never_shows_the_key(fake_llm: FakeLLM) -> None:
    secret = "sk-wrong-key-for-whisper-0123456789"
    config = TranscriptionConfig(base_url=fake_llm.base_url, api_key=secret, max_retries=0)
    async with Agent(fake_llm.config(), tools=ToolRegistry(), transcription=config) as agent:
        with pytest.raises(TranscriptionFailed) as raised:
            await agent.transcribe(b"OggS", filename="voice.ogg")
    assert raised.value.reason == "auth" and raised.value.status_code == 401
    assert secret not in str(raised.value) and secret not in raised.value.provider_message  # OpenAI masks it: sk-***6789


async def test_a_transcription_that_never_ends_times_out(fake_llm: FakeLLM) -> None:
    never = asyncio.Event()
    fake_llm.script_transcripts(TranscriptionFault(500, hold=never))
    config = TranscriptionConfig(timeout=0.2)
    async with Agent(fake_llm.config(), tools=ToolRegistry(), transcription=config) as agent:
        with pytest.raises(TranscriptionFailed) as raised:
            await agent.transcribe(b"OggS", filename="voice.ogg")
    assert raised.value.reason == "timeout"
    await fake_llm.wait_for(lambda: len(fake_llm.transcriptions) == 1)
    assert API_KEY not in str(raised.value)
