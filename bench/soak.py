"""Soak: many chats talking while parley is SIGKILLed at random moments and restarted.

`--chats` people each hold a conversation of `--rounds` questions with parley (a question,
wait for its answer -- or for a clear failure or "please resend" note -- think a moment,
the next question). Meanwhile parley, a real `python -m bots.cli run` child process, is
killed with SIGKILL every `--kill-min`..`--kill-max` seconds (wherever it happens to be:
streaming, queuing, fetching, saving, starting up, recovering) and started again at once,
`--kills` times. The fakes run in this process on 127.0.0.1: the fake Telegram (generous
flood limits, parley with fast pacing: this measures recovery, not pacing) and the fake
provider (`tests.support.crash.CrashLLM`: each question's reply is the deterministic
`answer_for(question)`, streamed slowly so kills land mid-reply).

When every conversation is over, parley is stopped gracefully and every chat is read
as a person sees it. Prints one JSON object (fields: bench/README.md):

    .venv/bin/python bench/soak.py [--chats 50] [--rounds 20] [--kills 20]
        [--store sqlite|postgres] [--kill-min 1] [--kill-max 5] [--max-attempts N] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import BenchError, machine_info, percentile  # noqa: E402
from tests.fakes.telegram import FakeTelegram, TelegramLimits  # noqa: E402
from tests.support.crash import (  # noqa: E402
    FAILURE_LINE,
    INTERRUPTED_MARKER,
    LOST_TRACK,
    QUEUED_TEXT,
    RESTART_PLACEHOLDER,
    CrashLLM,
    Rig,
    answer_for,
)
from tests.support.stack import FAST_PACING  # noqa: E402

TARGETS = {"lost": 0, "duplicated": 0, "left_partial": 0, "placeholder_left": 0}
FIRST_USER = 100_000
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Question:
    chat_id: int
    text: str
    message_id: int
    t_sent: float
    t_settled: float | None = None  # when the driver saw an outcome (None: gave up waiting)


@dataclass
class Kill:
    t_kill: float
    t_restart: float
    pid: int


@dataclass
class Soak:
    args: argparse.Namespace
    tg: FakeTelegram
    llm: CrashLLM
    rig: Rig
    rng: random.Random
    questions: list[Question] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    unexpected_exits: list[int] = field(default_factory=list)
    done_chats: int = 0

    # ---- the people ---------------------------------------------------------------------

    def settled(self, q: Question) -> bool:
        """The person sees an outcome: the complete answer, or a note that ends the message."""
        answer = answer_for(q.text)
        for m in self.tg.messages(q.chat_id):
            if not m.from_bot or m.deleted:
                continue
            if m.text == answer:
                return True
            if m.reply_to == q.message_id and not RESTART_PLACEHOLDER.search(m.text) and (
                LOST_TRACK.search(m.text) or INTERRUPTED_MARKER.search(m.text) or FAILURE_LINE.search(m.text)
            ):
                return True
        return False

    async def person(self, index: int) -> None:
        user = self.tg.user(FIRST_USER + index, f"Person{index}")
        chat = self.tg.private_chat(user)
        for r in range(self.args.rounds):
            text = f"chat {index} round {r}: what now"
            payload = self.tg.user_says(chat, user, text)
            q = Question(chat.id, text, int(payload["message_id"]), time.monotonic())
            self.questions.append(q)
            try:
                await self.tg.wait_for(lambda q=q: self.settled(q), timeout=self.args.answer_timeout)
                q.t_settled = time.monotonic()
            except TimeoutError:
                pass  # counted as lost (or partial) below
            await asyncio.sleep(self.rng.uniform(0, self.args.think))
        self.done_chats += 1

    # ---- the killer -----------------------------------------------------------------------

    async def killer(self) -> None:
        """SIGKILL parley `--kills` times at random moments, restarting it at once each time.

        Also a watchdog: a process that exits on its own is counted and started again.
        """
        kills_left = self.args.kills
        while self.done_chats < self.args.chats:
            proc = self.rig.current
            wait = self.rng.uniform(self.args.kill_min, self.args.kill_max)
            try:
                code = await asyncio.wait_for(asyncio.shield(proc.proc.wait()), wait if kills_left else 1.0)
            except TimeoutError:
                code = None
            if code is not None:  # died by itself
                await proc.wait_exit(10)
                self.unexpected_exits.append(code)
                await self.rig.start(ready=False)
                continue
            if not kills_left or self.done_chats == self.args.chats:
                continue
            kills_left -= 1
            answered = sum(1 for q in self.questions if q.t_settled is not None)
            print(
                f"soak: kill {len(self.kills) + 1}/{self.args.kills} (pid {proc.proc.pid}); "
                f"{answered}/{len(self.questions)} questions settled so far",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            t_kill = time.monotonic()
            await self.rig.kill()
            self.exit_codes.append(proc.returncode)
            t_restart = time.monotonic()
            await self.rig.start(ready=False)
            self.kills.append(Kill(t_kill, t_restart, proc.proc.pid))

    # ---- what the chats show ------------------------------------------------------------

    def report(self, wall_s: float) -> dict[str, Any]:
        by_chat: dict[int, list[Question]] = {}
        for q in self.questions:
            by_chat.setdefault(q.chat_id, []).append(q)
        outcomes = {"answered_once": 0, "duplicated": 0, "failed": 0, "expired": 0, "lost": 0}
        left_partial: list[str] = []
        placeholder_left: list[str] = []
        unanswered: list[str] = []
        recovery: list[float] = []
        interrupted = 0
        taken_back = 0
        out_of_order = 0
        for chat_id, asked in by_chat.items():
            shown = [m for m in self.tg.messages(chat_id) if m.from_bot and not m.deleted]
            answers = {answer_for(q.text): q for q in asked}
            positions = []
            for q in asked:
                answer = answer_for(q.text)
                complete = [m for m in shown if m.text == answer]
                notes = [m for m in shown if m.reply_to == q.message_id and m.text != answer]
                if len(complete) == 1:
                    outcomes["answered_once"] += 1
                    positions.append(complete[0].message_id)
                elif len(complete) > 1:
                    outcomes["duplicated"] += 1
                elif any(LOST_TRACK.search(m.text) or INTERRUPTED_MARKER.search(m.text) for m in notes):
                    outcomes["expired"] += 1
                elif any(FAILURE_LINE.search(m.text) for m in notes):
                    outcomes["failed"] += 1
                else:
                    outcomes["lost"] += 1
                    unanswered.append(q.text)
                # When did the person first see the complete answer, and was it interrupted before?
                first_seen = min(
                    (t for m in complete for (t, text, _) in m.edits if text == answer), default=None
                )
                if first_seen is None:
                    continue
                restarts = [k.t_restart for k in self.kills if q.t_sent < k.t_kill < first_seen and k.t_restart < first_seen]
                # (A kill between the last edit leaving and the fake recording it is no interruption.)
                if restarts:
                    interrupted += 1
                    recovery.append(first_seen - max(restarts))
                for m in complete:
                    versions = [text for (_, text, _) in m.edits]
                    if answer in versions and versions.index(answer) < len(versions) - 1:
                        taken_back += 1
            if positions != sorted(positions):
                out_of_order += 1
            for m in shown:
                if m.text in answers or m.text == QUEUED_TEXT:
                    continue
                if RESTART_PLACEHOLDER.search(m.text):
                    placeholder_left.append(m.text)
                    continue
                if LOST_TRACK.search(m.text) or INTERRUPTED_MARKER.search(m.text) or FAILURE_LINE.search(m.text):
                    continue
                left_partial.append(m.text)
        starts = [self.llm.turn_starts(q.text) for q in self.questions]
        log_lines = [line for proc in self.rig.procs for line in proc.stderr]
        return {
            "messages_sent": len(self.questions),
            "answered_exactly_once": outcomes["answered_once"],
            "duplicated": outcomes["duplicated"],
            "lost": outcomes["lost"],
            "failed": outcomes["failed"],
            "expired": outcomes["expired"],
            "left_partial": len(left_partial),
            "left_partial_examples": [t[:120] for t in left_partial[:5]],
            "placeholder_left": len(placeholder_left),
            "placeholder_left_examples": [t[:120] for t in placeholder_left[:3]],
            "lost_examples": unanswered[:5],
            "chats_out_of_order": out_of_order,
            "answers_taken_back": taken_back,
            "kills": len(self.kills),
            "interrupted_then_answered": interrupted,
            "restart_to_recovered_reply_s": {
                "p50": _round(percentile(recovery, 50)),
                "p99": _round(percentile(recovery, 99)),
                "max": _round(max(recovery, default=float("nan"))),
                "n": len(recovery),
            },
            "model_calls_extra": sum(max(0, s - 1) for s in starts),
            "model_calls_max_per_question": max(starts, default=0),
            "parley_processes": len(self.rig.procs),
            "parley_exit_codes": self.exit_codes,
            "parley_unexpected_exits": self.unexpected_exits,
            "parley_errors": sum(1 for line in log_lines if " ERROR " in line),
            "parley_tracebacks": sum(1 for line in log_lines if line.startswith("Traceback")),
            "wall_s": round(wall_s, 1),
        }


def _round(value: float) -> float | None:
    return None if value != value else round(value, 3)  # NaN -> null


# ---------------------------------------------------------------------------- the store


async def _postgres_schema(base: str) -> tuple[str, Any]:
    import asyncpg
    from sqlalchemy.engine import make_url

    schema = f"parley_soak_{uuid.uuid4().hex[:12]}"
    dsn = make_url(base).set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn, timeout=10)
    url = make_url(base).update_query_dict({"schema": schema}).render_as_string(hide_password=False)

    async def drop() -> None:
        try:
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await admin.close()

    return url, drop


# ---------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    drop = None
    with tempfile.TemporaryDirectory(prefix="parley-soak-") as tmp_name:
        tmp = Path(tmp_name)
        if args.store == "postgres":
            store_url, drop = await _postgres_schema(args.postgres_url)
        else:
            store_url = f"sqlite:///{tmp / 'parley.db'}"
        limits = TelegramLimits(per_chat_rate=50.0, per_chat_burst=20, group_per_minute=3000, global_rate=500.0,
                                global_burst=200)  # fmt: skip
        tg = FakeTelegram(limits=limits, max_calls=50_000)
        await tg.start()
        llm = CrashLLM(chunk=args.chunk, delay=args.delay, words=args.words)
        await llm.start()
        config = {
            "provider": {
                "base_url": llm.base_url,
                "api_key": llm.api_key,
                "model": "fake-model",
                "timeouts": {"connect": 10, "first_token": 60, "idle": 60, "total": 300},
                "max_retries": 0,
            },
            "store": store_url,
            "access": {"allow_everyone": True, "user_rate": "off"},  # every question must count
            "telegram": {"token": tg.token, "api_base": tg.url, "pacing": FAST_PACING},
            "chat": {"queue_max": 5, **({"max_attempts": args.max_attempts} if args.max_attempts else {})},
            "shutdown_timeout": 10,
            "logging": {"level": "INFO"},
        }
        rig = Rig(tmp, config)
        soak = Soak(args, tg, llm, rig, rng)
        started = time.monotonic()
        try:
            await rig.start(timeout=120)
            people = [asyncio.create_task(soak.person(i)) for i in range(args.chats)]
            killer = asyncio.create_task(soak.killer())
            try:
                async with asyncio.timeout(args.timeout):
                    await asyncio.gather(*people)
                    await killer
            except TimeoutError:
                raise BenchError(f"the soak did not finish within {args.timeout}s") from None
            finally:
                killer.cancel()
                for task in people:
                    task.cancel()
                await asyncio.gather(killer, *people, return_exceptions=True)
            if rig.current.returncode is None:
                rig.current.signal(15)
                soak.exit_codes.append(await rig.current.wait_exit(60))
            wall = time.monotonic() - started
            result = soak.report(wall)
        finally:
            if args.dump:
                dump = Path(args.dump)
                dump.mkdir(parents=True, exist_ok=True)
                for i, proc in enumerate(rig.procs, 1):
                    (dump / f"parley-{i}.log").write_text("\n".join(proc.stderr) + "\n")
                chats = {
                    str(chat_id): [
                        {"id": m.message_id, "from_bot": m.from_bot, "text": m.text, "reply_to": m.reply_to,
                         "deleted": m.deleted, "versions": [[round(t, 3), text] for (t, text, _) in m.edits]}
                        for m in tg.messages(chat_id)
                    ]
                    for chat_id in sorted({q.chat_id for q in soak.questions})
                }  # fmt: skip
                kills = [{"t_kill": round(k.t_kill, 3), "t_restart": round(k.t_restart, 3), "pid": k.pid}
                         for k in soak.kills]  # fmt: skip
                (dump / "chats.json").write_text(json.dumps({"kills": kills, "chats": chats}, indent=1))
            await rig.aclose()
            await tg.stop()
            await llm.stop()
            if drop is not None:
                await drop()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20, help="questions per chat")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (each followed by a restart)")
    parser.add_argument("--kill-min", type=float, default=1.0, help="seconds between restart and next kill: at least")
    parser.add_argument("--kill-max", type=float, default=5.0, help="... at most (uniformly random)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", default=os.environ.get("PARLEY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="a fresh schema is created in it and dropped afterwards")  # fmt: skip
    parser.add_argument("--words", type=int, default=40, help="words per reply")
    parser.add_argument("--chunk", type=int, default=12, help="characters per streamed chunk")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument("--think", type=float, default=0.5, help="a person waits up to this long before asking again")
    parser.add_argument("--answer-timeout", type=float, default=120.0, help="a person gives up on a question after")
    parser.add_argument("--timeout", type=float, default=1800.0, help="the whole soak, at most")
    parser.add_argument("--max-attempts", type=int, default=None,
                        help="parley's chat.max_attempts (default: parley's own default)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dump", default=None, help="directory for every parley process's log")
    args = parser.parse_args(argv)
    machine = machine_info()
    result = asyncio.run(run(args))
    print(
        json.dumps(
            {
                "bench": "soak",
                "params": {k: v for k, v in vars(args).items() if k not in ("postgres_url", "dump")},
                "targets": TARGETS,
                **result,
                "machine": machine,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
