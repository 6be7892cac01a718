"""Provider timeouts and the "still working…" note: defaults a person accepts, and
coherent clocks -- each mistake named as `provider.timeouts.<key>: ...` (issue 12, point 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bots.app import chat_defaults
from bots.config import ConfigProblems, load_config

BASE_ENV = {"OPENAI_API_KEY": "sk-test-0123456789abcdefghijklmnop"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No stray ./parley.yaml or ./.env is read."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_yaml(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # noqa: ANN201
    path = tmp_path / "parley.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={**BASE_ENV, **(env or {})}, env_file=None)


def problems(tmp_path: Path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigProblems) as exc:
        load_yaml(tmp_path, text)
    return {p.key: p.message for p in exc.value.problems}


def test_defaults_bound_a_hung_provider_to_minutes_not_a_quarter_hour() -> None:
    settings = load_config(env=BASE_ENV, env_file=None)
    t = settings.provider.timeouts
    assert (t.connect, t.first_token, t.idle, t.total) == (10.0, 45.0, 30.0, 180.0)
    # A provider that never answers: the streaming attempt, then its one fallback.
    assert t.first_token + t.total <= 4 * 60  # was 90 + 600 s, about 11.5 minutes
    assert settings.chat.still_working_after == 15.0
    assert chat_defaults(settings).still_working_after == 15.0


def test_the_agent_gets_transport_timeouts_later_than_its_own_clocks() -> None:
    t = load_config(env=BASE_ENV, env_file=None).provider.agent_config().timeouts
    streamed, plain = t.transport_read(stream=True), t.transport_read(stream=False)
    assert t.first_token is not None and t.idle is not None and t.total is not None
    assert streamed is not None and streamed > max(t.first_token, t.idle)
    assert plain is not None and plain > t.total
    assert t.transport_total is not None and t.transport_total > t.total


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("provider: {timeouts: {connect: 45}}\n", {"provider.timeouts.connect": "must be less than first_token (45 s)"}),
        ("provider: {timeouts: {first_token: 300}}\n", {"provider.timeouts.first_token": "must not exceed total (180 s)"}),
        ("provider: {timeouts: {idle: 200, total: 120}}\n", {"provider.timeouts.idle": "must not exceed total (120 s)"}),
        (
            "provider: {timeouts: {connect: 5, first_token: 4, total: 3}}\n",
            {
                "provider.timeouts.connect": "must be less than first_token (4 s)",
                "provider.timeouts.first_token": "must not exceed total (3 s)",
                "provider.timeouts.idle": "must not exceed total (3 s)",
            },
        ),
    ],
    ids=["connect", "first_token", "idle", "several"],
)
def test_incoherent_timeouts_are_named_one_by_one(tmp_path: Path, yaml_text: str, expected: dict[str, str]) -> None:
    found = problems(tmp_path, yaml_text)
    assert set(found) == set(expected)
    for key, fragment in expected.items():
        assert fragment in found[key]


def test_coherent_custom_timeouts_pass(tmp_path: Path) -> None:
    t = load_yaml(tmp_path, "provider: {timeouts: {connect: 5, first_token: 120, idle: 120, total: 900}}\n").provider.timeouts
    assert (t.connect, t.first_token, t.idle, t.total) == (5.0, 120.0, 120.0, 900.0)


@pytest.mark.parametrize("value", ["off", "0", "false", "'off'"])
def test_still_working_can_be_switched_off(tmp_path: Path, value: str) -> None:
    settings = load_yaml(tmp_path, f"chat: {{still_working_after: {value}}}\n")
    assert settings.chat.still_working_after == 0.0
    assert chat_defaults(settings).still_working_after == 0.0


def test_still_working_from_the_environment(tmp_path: Path) -> None:
    assert load_yaml(tmp_path, "{}\n", env={"PARLEY_CHAT__STILL_WORKING_AFTER": "off"}).chat.still_working_after == 0.0
    assert load_yaml(tmp_path, "{}\n", env={"PARLEY_CHAT__STILL_WORKING_AFTER": "8"}).chat.still_working_after == 8.0


def test_a_negative_still_working_delay_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, "chat: {still_working_after: -1}\n")
    assert set(found) == {"chat.still_working_after"}
    assert "greater than or equal to 0" in found["chat.still_working_after"]
