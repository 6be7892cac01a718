"""Photos, voice notes and files through the gateway, to the model and back (issue 14, model side).

A real Store (SQLite), a real Agent driving the real openai SDK against the fake provider
(which records the image parts it received and serves `/v1/audio/transcriptions`), and a
connector serving files from memory through parley's own `MediaSource` protocol
(tests/support/media.py). The platform side of downloads is tested with the platform fakes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from bots import history as hist
from bots.access import Access, AccessPolicy
from bots.gateway import NO_VISION_TEXT, ChatDefaults, Gateway
from bots.inbound import Inbound
from bots.media import Attachment
from bots.media_input import CAN_READ, IMAGES_OFF_TEXT, NO_SPEECH_TEXT, TRANSCRIPTION_FAILED_TEXT, MediaOptions
from bots.outbox import ChatRef
from bots.store import BudgetHold, Store
from tests.fakes.llm import FakeLLM, Reply, TranscriptionFault
from tests.support.media import MediaConnector, jpeg, pdf, png

OWNER = "memory:1"
CHAT = ChatRef("memory", "1", is_private=True)
_ids = itertools.count(1)


class RecordingStore(Store):
    """A real store that remembers the budget hold of every turn it began."""

    holds: list[BudgetHold | None]

    async def begin_turn(self, session_id: int, **kwargs: Any) -> int:
        self.holds.append(kwargs.get("hold"))
        return await super().begin_turn(session_id, **kwargs)


def message(text: str = "", *attachments: Attachment, command: str | None = None) -> Inbound:
    n = next(_ids)
    return Inbound(CHAT, "1", text, message_id=str(n), update_id=f"u{n}", command=command,
                   attachments=tuple(attachments))  # fmt: skip


Stack = tuple[Gateway, MediaConnector, RecordingStore]


@pytest.fixture
async def make_stack(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """`await make_stack(media=MediaOptions(...), api=...)`: a gateway with files to serve."""
    opened: list[tuple[Gateway, Agent, Store]] = []

    async def make(*, media: MediaOptions | None = None, api: str = "chat_completions", streaming: bool = True) -> Stack:
        store = await RecordingStore.open(sqlite_url)
        store.holds = []
        agent = Agent(fake_llm.config(api=api), tools=ToolRegistry())
        gateway = Gateway(
            store=store,
            agent=agent,
            access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
            defaults=ChatDefaults(model="fake-model", streaming=streaming),
            media=media,
        )
        connector = MediaConnector()
        gateway.attach(connector)
        opened.append((gateway, agent, store))
        return gateway, connector, store

    try:
        yield make
    finally:
        for gateway, agent, store in opened:
            await gateway.shutdown(1)
            await agent.aclose()
            await store.close()


async def send(gateway: Gateway, inbound: Inbound) -> None:
    await gateway.handle(inbound)
    await gateway.settle(CHAT.key)


async def inbox_status(store: Store, inbox_id: int) -> str:
    row = await store.inbox_message(inbox_id)
    assert row is not None
    return row.status


async def stored_turns(store: Store) -> list[Any]:
    session = await store.current_session(CHAT.key)
    return await store.history(session, limit_turns=50)


def last_user(request: Any) -> Any:
    return [m for m in request.messages if m.get("role") == "user"][-1]


# ---- images ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_a_photo_with_a_caption_is_one_request_with_the_text_and_the_exact_image(
    make_stack: Any, fake_llm: FakeLLM, api: str
) -> None:
    gateway, connector, store = await make_stack(api=api)
    photo = jpeg(50_000)
    await send(gateway, message("what is in this picture?", connector.add("image", photo, mime="image/jpeg")))

    assert len(fake_llm.requests) == 1
    request = fake_llm.requests[0]
    assert request.image_bytes() == [photo]
    assert request.images[0].startswith("data:image/jpeg;base64,")
    content = last_user(request)["content"]
    if api == "chat_completions":
        assert content[0] == {"type": "text", "text": "what is in this picture?"}
        assert content[1]["type"] == "image_url"
    else:
        assert content[0] == {"type": "input_text", "text": "what is in this picture?"}
        assert content[1]["type"] == "input_image"
    assert connector.texts() == ["You said: what is in this picture?"]
    assert await inbox_status(store, 1) == "answered"


async def test_a_photo_without_a_caption_still_gets_an_answer(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack()
    photo = png(300)
    await send(gateway, message("", connector.add("image", photo, mime="image/png", name="chart.png")))
    assert fake_llm.requests[0].image_bytes() == [photo]
    assert last_user(fake_llm.requests[0])["content"][0]["type"] == "image_url"  # no empty text part
    assert len(connector.texts()) == 1


async def test_an_album_of_three_is_one_turn_with_three_images_in_order(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack()
    photos = [jpeg(10_000, seed=n) for n in range(3)]
    await send(gateway, message("compare these", *(connector.add("image", p, mime="image/jpeg") for p in photos)))
    assert len(fake_llm.requests) == 1
    assert fake_llm.requests[0].image_bytes() == photos
    assert len(connector.texts()) == 1


async def test_images_past_max_images_are_left_out_and_both_sides_are_told(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack(media=MediaOptions(max_images=2))
    photos = [jpeg(5_000, seed=n) for n in range(5)]
    await send(gateway, message("look", *(connector.add("image", p, mime="image/jpeg") for p in photos)))
    request = fake_llm.requests[0]
    assert request.image_bytes() == photos[:2]
    assert len(connector.downloads) == 2, "images that are left out are not downloaded"
    assert "[3 more images attached but not shown]" in last_user(request)["content"][0]["text"]
    (reply,) = connector.texts()
    assert reply.startswith("🖼️ I looked at the first 2 of your 5 images (my limit per message).\n\nYou said: look")


async def test_an_image_over_the_size_limit_gets_one_line_and_no_download_or_model_call(
    make_stack: Any, fake_llm: FakeLLM
) -> None:
    gateway, connector, store = await make_stack(media=MediaOptions(max_image_bytes=1_000_000))
    await send(gateway, message("hi", connector.add("image", jpeg(1_500_000), mime="image/jpeg", name="big.jpg")))
    assert connector.texts() == ["⚠️ big.jpg is too large (1.5 MB); I can take images up to 1.0 MB."]
    assert connector.downloads == []
    assert fake_llm.requests == []
    assert await inbox_status(store, 1) == "failed"
    assert await stored_turns(store) == [], "no turn begun, nothing stored half"


async def test_an_image_found_too_large_while_downloading_gets_the_same_line(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack(media=MediaOptions(max_image_bytes=1_000_000))
    await send(gateway, message("", connector.add("image", jpeg(1_200_000), mime="image/jpeg", size=None)))
    assert connector.texts() == ["⚠️ That image is too large; I can take images up to 1.0 MB."]
    assert connector.downloads[0][1] == 1_000_000, "the limit is handed to the connector"
    assert fake_llm.requests == []
    assert await inbox_status(store, 1) == "failed"


async def test_bytes_that_are_no_image_get_one_line_and_the_conversation_goes_on(
    make_stack: Any, fake_llm: FakeLLM
) -> None:
    gateway, connector, store = await make_stack()
    await send(gateway, message("see", connector.add("image", b"<html>not a picture</html>", mime="image/jpeg",
                                                     name="photo.jpg")))  # fmt: skip
    assert connector.texts() == ["⚠️ photo.jpg doesn't look like a JPEG, PNG, GIF or WEBP image, so I can't read it."]
    assert fake_llm.requests == []
    assert await inbox_status(store, 1) == "failed"
    await send(gateway, message("hello again"))
    assert connector.texts()[-1] == "You said: hello again"
    assert [m["role"] for m in fake_llm.requests[0].messages] == ["system", "user"], "the refused message left nothing"


async def test_a_file_the_platform_cannot_deliver_gets_one_line(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    attachment = connector.add("image", jpeg(), mime="image/jpeg")
    del connector.files[attachment.ref]
    await send(gateway, message("", attachment))
    assert connector.texts() == ["⚠️ I couldn't download that image. Please send it again."]
    assert fake_llm.requests == []


async def test_a_model_that_cannot_see_gets_the_vision_line_once_and_text_keeps_working(
    make_stack: Any, fake_llm: FakeLLM
) -> None:
    gateway, connector, store = await make_stack()
    fake_llm.blind_models.add("fake-model")
    await send(gateway, message("what is this?", connector.add("image", jpeg(), mime="image/jpeg", name="cat.jpg")))
    assert connector.texts() == [NO_VISION_TEXT]
    assert len(fake_llm.requests) == 1, "a refusal of images is not retried without streaming"
    await send(gateway, message("then just say hi"))
    assert connector.texts()[-1] == "You said: then just say hi"
    history = json.dumps(fake_llm.requests[-1].messages)
    assert "[image: cat.jpg, 2 KB]" in history and "data:image" not in history


async def test_images_turned_off_get_a_line_saying_so(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack(media=MediaOptions(images=False))
    await send(gateway, message("look", connector.add("image", jpeg(), mime="image/jpeg")))
    assert connector.texts() == [IMAGES_OFF_TEXT]
    assert connector.downloads == [] and fake_llm.requests == []
    assert await inbox_status(store, 1) == "failed"


# ---- history -----------------------------------------------------------------------------


async def test_history_keeps_a_reference_and_later_turns_see_a_placeholder(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    photo = jpeg(1_234_000)
    attachment = connector.add("image", photo, mime="image/jpeg", name="photo.jpg")
    await send(gateway, message("what is it?", attachment))
    await send(gateway, message("and its colour?"))

    stored = (await stored_turns(store))[0].messages[0]
    assert stored == {
        "role": "user",
        "content": "what is it?",
        "attachments": [{"kind": "image", "ref": attachment.ref, "mime": "image/jpeg", "size": 1_234_000,
                         "name": "photo.jpg"}],
    }  # fmt: skip
    second = fake_llm.requests[1]
    assert second.images == [], "an earlier image is not sent again"
    assert "base64" not in json.dumps(second.body)
    assert second.messages[1] == {"role": "user", "content": "what is it?\n\n[image: photo.jpg, 1.2 MB]"}
    assert len(connector.downloads) == 1


async def test_replay_images_fetches_earlier_images_again(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack(media=MediaOptions(replay_images=True))
    photo = jpeg(3_000)
    gone = connector.add("image", jpeg(4_000, seed=2), mime="image/jpeg", name="old.jpg")
    await send(gateway, message("first", gone))
    del connector.files[gone.ref]  # expired on the platform since
    await send(gateway, message("second", connector.add("image", photo, mime="image/jpeg")))
    await send(gateway, message("third"))
    third = fake_llm.requests[2]
    assert third.image_bytes() == [photo], "the newest image again; the expired one as a placeholder"
    assert "[image: old.jpg, 4 KB]" in json.dumps(third.messages)


async def test_the_budget_hold_counts_each_image(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    await send(gateway, message("describe"))
    await send(gateway, message("/new", command="new"))
    await send(gateway, message("describe", *(connector.add("image", jpeg(seed=n), mime="image/jpeg") for n in range(3))))
    plain, with_images = (h.tokens for h in store.holds if h is not None)
    assert with_images - plain >= 3 * hist.IMAGE_PART_TOKENS


async def test_retry_of_a_photo_message_fetches_the_photo_again(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    photo = jpeg(2_500)
    await send(gateway, message("what is it?", connector.add("image", photo, mime="image/jpeg")))
    await send(gateway, message("/retry", command="retry"))
    assert len(fake_llm.requests) == 2
    assert fake_llm.requests[1].image_bytes() == [photo]
    assert [m["role"] for m in fake_llm.requests[1].messages] == ["system", "user"], "the first attempt is superseded"


async def test_stop_while_a_file_downloads_ends_the_message_without_a_turn(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    connector.gate = asyncio.Event()
    await gateway.handle(message("look", connector.add("image", jpeg(), mime="image/jpeg")))
    await connector.waiting.wait()
    await send(gateway, message("/stop", command="stop"))
    assert fake_llm.requests == []
    assert await inbox_status(store, 1) == "stopped"
    assert await stored_turns(store) == []


# ---- voice -------------------------------------------------------------------------------


async def test_a_voice_note_is_transcribed_then_answered_as_if_typed(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    audio = b"OggS\x00\x02" + bytes(range(200))
    fake_llm.script_transcripts("Remind me to buy *milk* tomorrow morning, before work, because we ran out of it again")
    await send(gateway, message("", connector.add("audio", audio, mime="audio/ogg", duration=3.0)))

    (transcription,) = fake_llm.transcriptions
    assert (transcription.model, transcription.filename, transcription.data) == ("whisper-1", "voice.ogg", audio)
    assert transcription.t_received < fake_llm.requests[0].t_received
    said = "Remind me to buy *milk* tomorrow morning, before work, because we ran out of it again"
    assert last_user(fake_llm.requests[0])["content"] == said
    (reply,) = connector.texts()
    quoted = said[:80].rstrip().replace("*", "\\*")  # the first 80 characters, markup escaped
    assert reply == f"🎤 “{quoted}…”\n\nYou said: {said}"
    # History stays clean: the transcript is the user's text, the answer is the model's.
    await send(gateway, message("thanks"))
    assert fake_llm.requests[1].messages[1:3] == [
        {"role": "user", "content": said},
        {"role": "assistant", "content": f"You said: {said}"},
    ]
    stored = (await stored_turns(store))[0].messages[0]
    assert stored["attachments"][0]["transcript"] == said and stored["content"] == ""


async def test_a_short_transcript_is_quoted_whole_and_show_transcript_off_hides_it(
    make_stack: Any, fake_llm: FakeLLM
) -> None:
    gateway, connector, _ = await make_stack()
    fake_llm.script_transcripts("Hello there")
    await send(gateway, message("", connector.add("audio", b"OggS-1", mime="audio/ogg")))
    assert connector.texts() == ["🎤 “Hello there”\n\nYou said: Hello there"]

    gateway, connector, _ = await make_stack(media=MediaOptions(show_transcript=False))
    fake_llm.script_transcripts("Hello again")
    await send(gateway, message("", connector.add("audio", b"OggS-2", mime="audio/ogg")))
    assert connector.texts() == ["You said: Hello again"]


async def test_when_the_model_fails_after_a_voice_note_the_quote_stays_above_the_error_line(
    make_stack: Any, fake_llm: FakeLLM
) -> None:
    gateway, connector, store = await make_stack(streaming=False)
    fake_llm.script_transcripts("what's the weather")
    fake_llm.script(Reply.text("unused", fault="nonstream_500"))
    await send(gateway, message("", connector.add("audio", b"OggS-w", mime="audio/ogg")))
    assert connector.texts() == [
        "🎤 “what's the weather”\n\n⚠️ The model provider had an internal error. Please try again."
    ]
    (turn,) = await stored_turns(store)
    assert turn.status == "error" and turn.messages[0]["attachments"][0]["transcript"] == "what's the weather"


async def test_a_failed_transcription_gets_one_line_and_no_turn(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    fake_llm.script_transcripts(TranscriptionFault(500))
    await send(gateway, message("", connector.add("audio", b"OggS-x", mime="audio/ogg")))
    assert connector.texts() == [TRANSCRIPTION_FAILED_TEXT]
    assert fake_llm.requests == []
    assert await inbox_status(store, 1) == "failed"
    assert await stored_turns(store) == []


async def test_an_empty_or_silent_voice_note_gets_one_line(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack()
    await send(gateway, message("", connector.add("audio", b"", mime="audio/ogg")))
    fake_llm.script_transcripts("   ")
    await send(gateway, message("", connector.add("audio", b"OggS-silence", mime="audio/ogg")))
    assert connector.texts() == ["🎤 That voice note is empty.", NO_SPEECH_TEXT]
    assert len(fake_llm.transcriptions) == 1, "an empty file is not sent to be transcribed"
    assert fake_llm.requests == []


# ---- documents ---------------------------------------------------------------------------


async def test_a_pdf_is_read_into_the_turn(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    document = pdf("Quarterly revenue grew 12 percent.", "Costs stayed flat.")
    await send(gateway, message("summarise", connector.add("document", document, mime="application/pdf",
                                                           name="report.pdf")))  # fmt: skip
    content = last_user(fake_llm.requests[0])["content"]
    assert content == (
        "summarise\n\n[file: report.pdf]\nQuarterly revenue grew 12 percent.\n\nCosts stayed flat.\n[end of file]"
    )
    assert connector.texts() == [f"You said: {content}"]
    stored = (await stored_turns(store))[0].messages[0]["attachments"][0]
    assert stored["text"] == "Quarterly revenue grew 12 percent.\n\nCosts stayed flat."


async def test_a_password_protected_pdf_gets_one_line(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    locked = pdf("secret numbers", password="hunter2")
    await send(gateway, message("", connector.add("document", locked, mime="application/pdf", name="locked.pdf")))
    assert connector.texts() == [
        "🔒 locked.pdf is password-protected, so I can't read it. Please send a copy without the password."
    ]
    assert fake_llm.requests == []
    assert await inbox_status(store, 1) == "failed"


async def test_a_damaged_pdf_gets_one_line(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack()
    broken = pdf("fine")[:120]
    await send(gateway, message("", connector.add("document", broken, mime="application/pdf", name="cut.pdf")))
    assert connector.texts() == ["⚠️ I couldn't read cut.pdf: the PDF seems damaged."]
    assert fake_llm.requests == []


async def test_a_long_text_file_is_cut_with_a_note_to_the_model_and_the_person(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack(media=MediaOptions(max_document_chars=100))
    text = "".join(f"line {n}\n" for n in range(100))
    await send(gateway, message("", connector.add("document", text.encode(), mime="text/markdown", name="notes.md")))
    content = last_user(fake_llm.requests[0])["content"]
    assert content == f"[file: notes.md]\n{text[:100]}\n[end of file: cut after 100 characters; the rest was not included]"
    (reply,) = connector.texts()
    assert reply.startswith("📄 notes.md is long: I read only its first 100 characters.\n\nYou said: [file: notes.md]")


async def test_source_code_with_a_stray_byte_is_read_with_a_replacement(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, _ = await make_stack()
    code = b"def greet():\n    return 'h\xe9llo'\n"  # latin-1 in a UTF-8 world
    await send(gateway, message("review", connector.add("document", code, name="greet.py", mime=None)))
    assert "return 'h\ufffdllo'" in last_user(fake_llm.requests[0])["content"]


async def test_a_sticker_or_binary_file_gets_the_line_saying_what_parley_reads(make_stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make_stack()
    await send(gateway, message("", connector.add("other", b"webp", what="sticker")))
    await send(gateway, message("", connector.add("document", b"PK\x03\x04\x00\x00binary", name="archive.docx",
                                                  mime="application/vnd.openxmlformats-officedocument")))  # fmt: skip
    assert connector.texts() == [f"📎 {CAN_READ}; I can't open stickers.", f"📎 {CAN_READ}; I can't open archive.docx."]
    assert fake_llm.requests == []
    assert [await inbox_status(store, i) for i in (1, 2)] == ["failed", "failed"]
