"""The benchmarks still run, and what they measure is measured right.

Benchmarks are not tests: nothing here judges a number. Each script runs once with tiny
parameters (so it cannot rot) and must print one JSON object with the fields
bench/README.md documents. The pure measurement code -- when a word became visible,
quantiles of a Prometheus histogram, the moment the Pacer says a call was allowed -- is
unit-tested, because a benchmark that measures the wrong thing is worse than none.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.scale import bucket_of, histogram_quantile, median_of, parse_metrics
from bench.visibility import Change, changes_from_fake, final_words, lags, visible_times

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- visibility


def test_a_word_is_visible_from_the_first_version_that_shows_it() -> None:
    changes = [Change(10.0, 1, "alpha"), Change(11.0, 1, "alpha bravo charlie"), Change(12.0, 1, "alpha bravo charlie delta")]
    assert visible_times(changes, "alpha bravo charlie delta") == [10.0, 11.0, 11.0, 12.0]


def test_a_wrong_or_partial_word_is_not_visible() -> None:
    changes = [Change(1.0, 1, "alpha brav"), Change(2.0, 1, "alpha bravo oops")]
    assert visible_times(changes, "alpha bravo charlie") == [1.0, 2.0, None]


def test_words_are_read_across_messages_in_order_and_deleted_messages_vanish() -> None:
    changes = changes_from_fake(
        [
            {"from_bot": False, "message_id": 1, "edits": [[0.5, "go", []]], "deleted": False},
            {"from_bot": True, "message_id": 2, "edits": [[1.0, "alpha", []], [2.0, "alpha bravo", []]],
             "deleted": False},
            {"from_bot": True, "message_id": 3, "edits": [[3.0, "charlie", []]], "deleted": True, "deleted_at": 4.0},
        ]
    )  # fmt: skip
    assert visible_times(changes, "alpha bravo charlie") == [1.0, 2.0, 3.0]
    assert final_words(changes) == "alpha bravo"


def test_a_light_fake_is_refused_rather_than_misread() -> None:
    with pytest.raises(ValueError, match="light"):
        changes_from_fake([{"from_bot": True, "message_id": 2, "edits": [[1.0, None, None]], "deleted": False}])


def test_lag_is_visible_minus_generated_and_lost_words_count_until_the_end() -> None:
    # Words generated at 100.0, 100.5, 101.0 (rate 2/s); the last never became visible.
    assert lags([100.2, 101.0, None], t_first=100.0, rate=2.0, t_end=105.0) == pytest.approx([0.2, 0.5, 4.0])


# ---------------------------------------------------------------------------- histogram


METRICS_BEFORE = """\
# TYPE parley_edit_lateness_seconds histogram
parley_edit_lateness_seconds_bucket{le="0.001",platform="telegram"} 10.0
parley_edit_lateness_seconds_bucket{le="0.01",platform="telegram"} 10.0
parley_edit_lateness_seconds_bucket{le="0.1",platform="telegram"} 10.0
parley_edit_lateness_seconds_bucket{le="+Inf",platform="telegram"} 10.0
parley_edit_lateness_seconds_count{platform="telegram"} 10.0
parley_edit_lateness_seconds_sum{platform="telegram"} 0.001
# TYPE parley_turns_total counter
parley_turns_total{outcome="ok",platform="telegram"} 1.0
"""

METRICS_AFTER = """\
# TYPE parley_edit_lateness_seconds histogram
parley_edit_lateness_seconds_bucket{le="0.001",platform="telegram"} 60.0
parley_edit_lateness_seconds_bucket{le="0.01",platform="telegram"} 100.0
parley_edit_lateness_seconds_bucket{le="0.1",platform="telegram"} 110.0
parley_edit_lateness_seconds_bucket{le="+Inf",platform="telegram"} 110.0
parley_edit_lateness_seconds_count{platform="telegram"} 110.0
parley_edit_lateness_seconds_sum{platform="telegram"} 0.5
# TYPE parley_turns_total counter
parley_turns_total{outcome="ok",platform="telegram"} 90.0
parley_turns_total{outcome="error",platform="telegram"} 2.0
"""


def test_quantiles_count_only_what_happened_between_two_scrapes() -> None:
    before, after = parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER)
    assert after.turns_done == 92
    # 100 new observations: 50 in (0, 1 ms], 40 in (1, 10 ms], 10 in (10, 100 ms].
    assert histogram_quantile(0.50, before.lateness, after.lateness) == pytest.approx(0.001)
    assert histogram_quantile(0.70, before.lateness, after.lateness) == pytest.approx(0.001 + 0.009 * 20 / 40)
    assert histogram_quantile(0.99, before.lateness, after.lateness) == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert histogram_quantile(0.99, after.lateness, after.lateness) is None  # nothing new


def test_runs_of_one_size_combine_into_medians_and_totals() -> None:
    runs = [
        {"wall_s": 10.0, "delivery_s": {"p50": 1.0, "max": 4.0}, "replies_exact": True, "http_429": 0,
         "turns_unfinished": 0, "turns": {"ok": 3}},
        {"wall_s": 30.0, "delivery_s": {"p50": 3.0, "max": 2.0}, "replies_exact": False, "http_429": 2,
         "turns_unfinished": 1, "turns": {"ok": 2}},
        {"wall_s": 20.0, "delivery_s": {"p50": 2.0, "max": 9.0}, "replies_exact": True, "http_429": 1,
         "turns_unfinished": 0, "turns": {"ok": 3}},
    ]  # fmt: skip
    combined = median_of(runs)
    assert combined["wall_s"] == 20.0 and combined["delivery_s"] == {"p50": 2.0, "max": 4.0}
    assert combined["replies_exact"] is False  # exact only if every run was
    assert combined["http_429"] == 3 and combined["turns_unfinished"] == 1  # totals, not medians
    assert bucket_of(0.0047, [0.001, 0.005, 0.01]) == [0.001, 0.005]


# ---------------------------------------------------------------------------- the scripts


async def run_script(*argv: str, timeout: float = 90.0) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {len(lines)}"
    return json.loads(lines[0])


def has_fields(obj: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in obj]
    assert not missing, f"missing fields {missing} in {sorted(obj)}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MACHINE = ("cpus", "cpu_model", "python", "packages", "loadavg_at_start")


async def test_latency_benchmark_runs() -> None:
    result = await run_script(
        "bench/latency.py", "--tokens", "12", "--rate", "60", "--ttft", "0.05", "--rtt", "0.01", "--runs", "1"
    )
    has_fields(result, "bench", "params", "rtt_measured_ms", "targets", "strategies", "runs", "machine")
    has_fields(result["machine"], *MACHINE)
    assert set(result["strategies"]) == {"parley", "every_delta", "fixed_1s"}
    for name, s in result["strategies"].items():
        has_fields(
            s, "ttfv_overhead_ms", "staleness_ratio", "lag_mean_ms", "lag_p95_ms", "tail_ms", "edits_per_reply",
            "calls_per_reply", "typing_per_reply", "http_429", "http_429_per_reply", "replies_exact",
            "tokens_never_visible",
        )  # fmt: skip
        assert is_number(s["staleness_ratio"]["median"]) and is_number(s["lag_mean_ms"]["p95"]), name
        if name != "parley":
            has_fields(s, "staleness_vs_parley")
    assert result["strategies"]["parley"]["replies_exact"] == "1/1"
    assert is_number(result["strategies"]["parley"]["ttfv_overhead_ms"]["median"])


async def test_latency_benchmark_runs_on_discord() -> None:
    result = await run_script(
        "bench/latency.py", "--platform", "discord", "--tokens", "12", "--rate", "60", "--ttft", "0.05",
        "--rtt", "0.01", "--runs", "1", "--strategies", "parley,fixed_1s",
    )
    assert result["params"]["platform"] == "discord" and result["params"]["chat"] == "group"
    assert result["params"]["min_edit_interval_s"] == 1.0  # 5 edits per 5 s per channel
    parley = result["strategies"]["parley"]
    assert parley["replies_exact"] == "1/1" and parley["http_429"] == 0
    assert is_number(parley["tail_ms"]["median"]) and is_number(parley["staleness_ratio"]["median"])


async def test_scale_benchmark_runs() -> None:
    result = await run_script("bench/scale.py", "--chats", "2", "--tokens", "20", "--rate", "50", "--ttft", "0.1")
    has_fields(result, "bench", "params", "targets", "results", "machine")
    has_fields(result["machine"], *MACHINE)
    (one,) = result["results"]
    has_fields(
        one, "chats", "cpu_s", "cpu_s_per_1k_tokens", "parley_cores_mean", "parley_cores_peak", "idle_rss_mb",
        "peak_rss_mb", "rss_per_active_turn_kb", "p50_edit_lateness_ms", "p99_edit_lateness_ms",
        "p99_edit_lateness_bucket_ms", "replies_exact",
        "replies_exact_count", "http_429", "first_visible_s", "delivery_s", "turns", "turns_unfinished",
        "parley_errors", "fakes_cpu_s", "provider_asked_s", "fake_peak_calls_per_s", "fake_lag_ms",
    )  # fmt: skip
    for name in ("cpu_s_per_1k_tokens", "peak_rss_mb", "rss_per_active_turn_kb", "p99_edit_lateness_ms"):
        assert is_number(one[name]), name
    assert one["chats"] == 2
    assert one["replies_exact"] is True and one["turns"] == {"ok": 2}


async def test_stream_cost_benchmark_runs() -> None:
    result = await run_script("bench/stream_cost.py", "--streams", "2", "--tokens", "20", "--rate", "200", "--runs", "1")
    has_fields(result, "bench", "params", "agent", "sdk", "floor", "agent_over_sdk", "agent_over_floor", "machine")
    for reader in ("agent", "sdk", "floor"):
        has_fields(result[reader], "cpu_us_per_token", "cores", "cpu_s_runs")
        assert is_number(result[reader]["cpu_us_per_token"])


async def test_pacing_stall_benchmark_runs() -> None:
    result = await run_script("bench/pacing_stall.py", "--chats", "3", "--seconds", "1", "--stalls", "0.2")
    has_fields(result, "bench", "params", "rounds", "machine")
    assert [r["mode"] for r in result["rounds"]] == ["acquire", "sending"]
    for r in result["rounds"]:
        has_fields(r, "stall_max_s", "calls", "calls_per_s", "release_peak_per_s", "fake_peak_per_s", "http_429", "errors")
        assert r["calls"] > 0


async def test_agent_overhead_benchmark_runs() -> None:
    result = await run_script("bench/agent_overhead.py", "--tokens", "50", "--runs", "1")
    has_fields(result, "bench", "raw_median_s", "run_turn_median_s", "overhead_ratio", "python", "openai", "cpus")
    assert is_number(result["overhead_ratio"])


async def test_soak_benchmark_runs() -> None:
    result = await run_script(
        "bench/soak.py", "--chats", "3", "--rounds", "3", "--kills", "2", "--kill-min", "1", "--kill-max", "2",
        "--think", "0.1", "--answer-timeout", "40", "--timeout", "150",
        timeout=180.0,
    )  # fmt: skip
    has_fields(
        result, "bench", "params", "targets", "messages_sent", "answered_exactly_once", "duplicated", "lost",
        "failed", "expired", "left_partial", "left_partial_examples", "placeholder_left", "lost_examples",
        "chats_out_of_order",
        "answers_taken_back", "kills", "interrupted_then_answered", "restart_to_recovered_reply_s",
        "model_calls_extra", "model_calls_max_per_question", "parley_processes", "parley_exit_codes",
        "parley_unexpected_exits", "parley_errors", "parley_tracebacks", "wall_s", "machine",
    )  # fmt: skip
    has_fields(result["machine"], *MACHINE)
    has_fields(result["restart_to_recovered_reply_s"], "p50", "p99", "max", "n")
    assert result["messages_sent"] == 9
    assert result["kills"] <= 2


async def test_media_benchmark_runs() -> None:
    result = await run_script("bench/media.py", "--runs", "1", "--image-bytes", "20000", "--rtt", "0.01")
    has_fields(result, "bench", "image", "machine")
    image = result["image"]
    has_fields(
        image, "params", "download_ms", "prepare_overhead_ms", "build_ms", "transfer_ms", "text_build_ms",
        "text_transfer_ms", "overhead_ms", "to_request_ms", "targets", "pass",
    )  # fmt: skip
    has_fields(result["machine"], *MACHINE)
    assert image["params"]["image_bytes"] == 20000
    assert all(is_number(image[key]["median"]) for key in ("download_ms", "overhead_ms", "to_request_ms"))
    assert image["params"]["rtt_s"] == 0.01


async def test_coalesce_benchmark_runs() -> None:
    result = await run_script("bench/coalesce.py", "--runs", "1", "--rounds", "1", "--window", "0.2")
    has_fields(result, "bench", "params", "targets", "short", "long", "machine")
    has_fields(result["machine"], *MACHINE)
    for kind in ("short", "long"):
        has_fields(
            result[kind], "chars", "added_ms", "added_ms_max", "e2e_ms_window_on", "e2e_ms_window_off", "e2e_added_ms"
        )
        assert is_number(result[kind]["added_ms"]["median"]), kind
    # The seam measures the hold itself: a long message is held at least the window (a clock
    # lower bound, not a judgement of speed).
    assert result["long"]["added_ms"]["median"] >= 200


async def test_tools_benchmark_runs() -> None:
    result = await run_script("bench/tools.py", "--calls", "20", "--warmup", "5", "--tools", "20")
    has_fields(
        result, "bench", "params", "targets", "in_process", "mcp_stdio", "mcp_http", "sdk_stdio",
        "overhead_stdio_p50_ms", "overhead_http_p50_ms", "parley_share_stdio_p50_ms", "pass", "per_turn", "machine",
    )  # fmt: skip
    has_fields(result["machine"], *MACHINE)
    for variant in ("in_process", "mcp_stdio", "mcp_http", "sdk_stdio"):
        has_fields(result[variant], "p50_ms", "p90_ms", "p99_ms")
        assert is_number(result[variant]["p50_ms"]), variant
    # An MCP round trip through a child process cannot beat a Python function call.
    assert result["mcp_stdio"]["p50_ms"] > result["in_process"]["p50_ms"]
    assert result["per_turn"]["tools"] == 20 + 11  # the numbered tools and the fake's own
    assert is_number(result["per_turn"]["schemas_us"]) and result["per_turn"]["json_bytes"] > 0


async def test_failover_benchmark_runs() -> None:
    result = await run_script("bench/failover.py", "--runs", "1", "--streams", "2", "--tokens", "20", "--cpu-runs", "1")
    has_fields(result, "bench", "params", "failover", "steady", "targets", "machine")
    for scenario in ("connection_refused", "http_500", "stall_30s_timeout_5s"):
        has_fields(result["failover"][scenario], "first_token_ms", "added_ms", "skipped_ms", "runs")
    # The stall is only left after the 5 s first-token clock (a lower bound, not a speed judgement).
    assert result["failover"]["stall_30s_timeout_5s"]["first_token_ms"] >= 5000
    has_fields(result["steady"], "single_cpu_us_per_token", "chain_cpu_us_per_token", "chain_over_single")


async def test_cluster_benchmark_runs(postgres_url: str, redis_url: str) -> None:
    from sqlalchemy.engine import make_url

    # The test's Redis, not a private redis-server the benchmark would start (not every
    # machine has the binary): the smoke test checks the fields, not the command counts.
    base = make_url(postgres_url)
    base = base.set(query={k: v for k, v in base.query.items() if k != "schema"}).render_as_string(hide_password=False)
    result = await run_script(
        "bench/cluster.py", "--chats", "3", "--replicas", "1,2", "--single", "sqlite,postgres", "--words", "12",
        "--postgres-url", base, "--redis-url", redis_url, "--timeout", "60",
        timeout=240.0,
    )  # fmt: skip
    has_fields(result, "bench", "params", "targets", "results", "wall_s", "machine")
    has_fields(result["machine"], *MACHINE)
    assert [r["config"] for r in result["results"]] == ["single-sqlite", "single-postgres", "cluster-1", "cluster-2"]
    for one in result["results"]:
        has_fields(
            one, "config", "mode", "store", "replicas", "chats", "timed_out", "wall_s", "lost", "duplicated",
            "http_429", "queue_wait_s", "tokens", "cpu_s", "cpu_s_per_1k_tokens", "cpu_s_per_1k_tokens_per_replica",
            "pg_round_trips_per_turn", "redis_commands_per_turn", "replica_exit_codes", "parley_errors",
        )  # fmt: skip
        has_fields(one["queue_wait_s"], "p50", "p99", "p99_bucket_ms")
        assert one["chats"] == 3 and one["timed_out"] is False
        assert is_number(one["cpu_s_per_1k_tokens"])
        assert len(one["cpu_s_per_1k_tokens_per_replica"]) == one["replicas"]
    by = {r["config"]: r for r in result["results"]}
    assert by["single-sqlite"]["pg_round_trips_per_turn"] is None
    assert is_number(by["single-postgres"]["pg_round_trips_per_turn"]) and by["single-postgres"]["pg_round_trips"] > 0
    assert is_number(by["cluster-2"]["redis_commands_per_turn"])
    assert is_number(by["cluster-2"]["cpu_ratio_vs_single_postgres"])


def test_postgres_round_trips_are_counted_from_sync_and_query_messages() -> None:
    """The counting proxy of bench/cluster.py reads the frontend protocol right."""
    from bench.cluster import PgRoundTrips

    async def scenario() -> tuple[int, int]:
        received = bytearray()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                received.extend(data)
            writer.close()

        upstream = await asyncio.start_server(server, "127.0.0.1", 0)
        proxy = await PgRoundTrips("127.0.0.1", upstream.sockets[0].getsockname()[1]).start()
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

        def msg(kind: bytes, body: bytes) -> bytes:
            return kind + (len(body) + 4).to_bytes(4, "big") + body

        ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
        startup = b"\x00\x03\x00\x00user\x00postgres\x00\x00"
        payload = (
            ssl_request + (len(startup) + 4).to_bytes(4, "big") + startup
            + msg(b"Q", b"SELECT 1\x00")                                     # simple query: 1
            + msg(b"P", b"\x00SELECT $1\x00\x00\x00") + msg(b"B", b"\x00" * 10) + msg(b"E", b"\x00\x00\x00\x00\x00")
            + msg(b"S", b"")                                                 # extended: 1
            + msg(b"X", b"")
        )  # fmt: skip
        writer.write(payload)
        await writer.drain()
        writer.close()
        for _ in range(200):
            if len(received) == len(payload):
                break
            await asyncio.sleep(0.01)
        trips = proxy.round_trips
        await proxy.aclose()
        upstream.close()
        return trips, len(received) - len(payload)

    trips, missing = asyncio.run(scenario())
    assert trips == 2
    assert missing == 0, "the proxy must forward every byte"
