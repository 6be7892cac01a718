"""From a photo in a chat to the model request: how much does parley add to the download?

Sends a 1 MB JPEG (default) through the same code a photo takes in a turn --
`bots.media_input.prepare` (download through the connector's `MediaSource`, check the bytes
are an image, base64 them into a `data:` URL, build the stored reference) and then
`Agent.run_turn` (the openai SDK builds the request, parley sends it) -- to the fake
provider running in its own process (`python -m tests.fakes.llm --port 0`), which stamps
each request with `time.monotonic()` once its whole body has arrived and parsed (one
system-wide clock on Linux, so the stamps compare with this process's).

The download is simulated: a `MediaSource` that answers after one `--rtt` (default 50 ms)
over an infinitely fast link, because the platform fakes' download endpoints live with the
connectors; what is measured around it is parley's own work. Per run:

- `download_ms`: the simulated link (one RTT; what the platform costs, not parley);
- `prepare_overhead_ms`: `prepare()` minus the download -- sniffing, base64, the stored JSON;
- `build_ms`: from the prepared input until the request leaves parley -- the turn setup and
  the SDK building the request (JSON-encoding ~1.4 MB of base64); stamped by the agent's
  request observer, which the transport calls as the request is handed to it;
- `transfer_ms`: from there until the provider holds the whole body (the loopback send and
  the fake reading it: the network's share, on a real link bandwidth-bound);
- `text_build_ms` / `text_transfer_ms`: the same for a text-only message, the baseline;
- `overhead_ms` = `prepare_overhead_ms + build_ms`: parley's own work between the bytes
  arriving and the request leaving; `to_request_ms`: the whole path, message to request.

Targets (issue 14): `to_request_ms` <= one download RTT + 20 ms; `pass` checks parley's own
part, `overhead_ms` <= 20 (the transfer of 1.4 MB is the link's, and on this loopback it
also includes the fake provider's CPU on the same cores).
Prints one JSON object; `image` holds this part (the split-message coalescing window's
added latency is a separate part of the same benchmark).

    .venv/bin/python bench/media.py [--runs 15] [--image-bytes 1000000] [--rtt 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from agent import Agent, NullEvents, ProviderConfig, Timeouts, ToolRegistry  # noqa: E402
from bench.common import Processes, machine_info, start_fake_llm, summary  # noqa: E402
from bots.media import Attachment  # noqa: E402
from bots.media_input import MediaOptions, prepare  # noqa: E402
from tests.fakes.llm import API_KEY  # noqa: E402
from tests.support.media import jpeg  # noqa: E402

MODEL = "bench:tokens=5,rate=0,ttft=0,chunk=1,seed=7"
TARGET_OVERHEAD_MS = 20.0


class SlowLink:
    """A `MediaSource` one round trip away: answers after `rtt` seconds, at infinite bandwidth."""

    def __init__(self, data: bytes, rtt: float) -> None:
        self.data = data
        self.rtt = rtt
        self.last = 0.0  # seconds the last download took

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        start = time.monotonic()
        await asyncio.sleep(self.rtt)
        self.last = time.monotonic() - start
        return self.data


class Streaming(NullEvents):
    """A consumer that wants deltas, as a chat's LiveReply does (so the request streams)."""

    wants_deltas = True


async def last_arrival(http: aiohttp.ClientSession, base_url: str) -> float:
    """When the fake had the newest request whole (its `t_received`)."""
    async with http.get(base_url.removesuffix("/v1") + "/_fake/requests", params={"brief": "1"}) as resp:
        records = (await resp.json())["requests"]
    return float(records[-1]["t_received"])


class Departures:
    """The agent's request observer: when each request was handed to the transport."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, kind: str, attempt: str) -> None:
        self.last = time.monotonic()


async def one_run(
    agent: Agent,
    http: aiohttp.ClientSession,
    base_url: str,
    link: SlowLink,
    attachment: Attachment,
    departures: Departures,
    *,
    image: bool,
) -> dict[str, float]:
    start = time.monotonic()
    prepared = await prepare(
        "what is in this picture?" if image else "",
        [attachment] if image else [],
        source=link,
        transcribe=_no_transcription,
        options=MediaOptions(),
    )
    content = prepared.content if image else "what is in this picture?"
    ready = time.monotonic()
    await agent.run_turn([], content, Streaming())
    arrived = await last_arrival(http, base_url)
    download = link.last if image else 0.0
    left = departures.last
    return {
        "download_ms": download * 1000,
        "prepare_overhead_ms": (ready - start - download) * 1000,
        "build_ms": (left - ready) * 1000,
        "transfer_ms": (arrived - left) * 1000,
        "to_request_ms": (arrived - start) * 1000,
    }


async def _no_transcription(audio: bytes, *, filename: str, mime: str | None = None) -> str:
    raise AssertionError("no audio in this benchmark")


async def run_image(runs: int, size: int, rtt: float) -> dict[str, Any]:
    data = jpeg(size)
    attachment = Attachment("image", "bench-photo", mime="image/jpeg", size=len(data))
    link = SlowLink(data, rtt)
    async with Processes() as procs:
        base_url = (await start_fake_llm(procs)).url
        timeouts = Timeouts(connect=10, first_token=60, idle=60, total=600)
        departures = Departures()
        agent = Agent(
            ProviderConfig(base_url=base_url, api_key=API_KEY, model=MODEL, timeouts=timeouts, max_retries=0),
            tools=ToolRegistry(),
            on_request=departures,
        )
        http = aiohttp.ClientSession()
        try:
            for _ in range(2):  # warm-up: connections, lazy imports
                await one_run(agent, http, base_url, link, attachment, departures, image=True)
                await one_run(agent, http, base_url, link, attachment, departures, image=False)
            images: list[dict[str, float]] = []
            texts: list[dict[str, float]] = []
            for _ in range(runs):
                images.append(await one_run(agent, http, base_url, link, attachment, departures, image=True))
                texts.append(await one_run(agent, http, base_url, link, attachment, departures, image=False))
        finally:
            await http.close()
            await agent.aclose()

    def column(rows: list[dict[str, float]], key: str) -> list[float]:
        return [row[key] for row in rows]

    overhead = [row["prepare_overhead_ms"] + row["build_ms"] for row in images]
    result = {
        "params": {"runs": runs, "image_bytes": size, "rtt_s": rtt, "model": MODEL},
        "download_ms": summary(column(images, "download_ms")),
        "prepare_overhead_ms": summary(column(images, "prepare_overhead_ms")),
        "build_ms": summary(column(images, "build_ms")),
        "transfer_ms": summary(column(images, "transfer_ms")),
        "text_build_ms": summary(column(texts, "build_ms")),
        "text_transfer_ms": summary(column(texts, "transfer_ms")),
        "overhead_ms": summary(overhead),
        "to_request_ms": summary(column(images, "to_request_ms")),
        "targets": {"overhead_ms": TARGET_OVERHEAD_MS, "to_request_ms": round(rtt * 1000 + TARGET_OVERHEAD_MS, 1)},
    }
    result["pass"] = result["overhead_ms"]["median"] <= TARGET_OVERHEAD_MS
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--image-bytes", type=int, default=1_000_000)
    parser.add_argument("--rtt", type=float, default=0.05, help="seconds the simulated download takes")
    args = parser.parse_args()
    image = asyncio.run(run_image(args.runs, args.image_bytes, args.rtt))
    print(json.dumps({"bench": "media", "image": image, "machine": machine_info()}))


if __name__ == "__main__":
    main()
