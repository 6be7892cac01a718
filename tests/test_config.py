"""Configuration: sources and their precedence, env: secrets, and one clear message per mistake."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from bots.config import (
    NO_API_KEY,
    ConfigProblems,
    Listen,
    Settings,
    load_config,
    report_config_error,
)
from bots.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "parley.example.yaml"

OPENAI_KEY = "sk-test-0123456789abcdefghijklmnop"
TG_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
DC_TOKEN = "MTA0NDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123"
BASE_ENV = {"OPENAI_API_KEY": OPENAI_KEY}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in an empty directory: no stray ./parley.yaml or ./.env is read."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(exc: pytest.ExceptionInfo[ConfigProblems]) -> dict[str, str]:
    return {p.key: p.message for p in exc.value.problems}


def load_error(*args: object, **kwargs: object) -> pytest.ExceptionInfo[ConfigProblems]:
    with pytest.raises(ConfigProblems) as exc:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return exc


# --------------------------------------------------------------------------- sources


def test_no_file_and_tokens_in_env_is_enough() -> None:
    settings = load_config(env={**BASE_ENV, "TELEGRAM_BOT_TOKEN": TG_TOKEN})
    assert settings.config_file is None
    assert settings.telegram.enabled and not settings.discord.enabled
    assert settings.enabled_platforms() == ["telegram"]
    assert settings.telegram.token is not None and settings.telegram.token.get_secret_value() == TG_TOKEN
    assert settings.provider.api_key is not None and settings.provider.api_key.get_secret_value() == OPENAI_KEY
    assert settings.provider.model == "gpt-4.1-mini"
    assert settings.store.kind == "sqlite" and settings.store.database == "data/parley.db"
    assert settings.metrics.listen is None


def test_the_issue_example_keys_load_as_written(tmp_path: Path) -> None:
    path = write(
        tmp_path / "parley.yaml",
        """
provider:
  base_url: https://api.openai.com/v1
  api_key: env:OPENAI_API_KEY
  model: gpt-4.1-mini
  api: chat_completions        # or: responses
telegram:
  token: env:TELEGRAM_BOT_TOKEN
  api_base: https://api.telegram.org
discord:
  token: env:DISCORD_BOT_TOKEN
  api_base: https://discord.com/api/v10
  gateway_url: wss://gateway.discord.gg/
access:
  owners: ["telegram:123456", "discord:987654321"]   # platform:user_id
store: sqlite:///data/parley.db
""",
    )
    settings = load_config(path, env={**BASE_ENV, "TELEGRAM_BOT_TOKEN": TG_TOKEN, "DISCORD_BOT_TOKEN": DC_TOKEN})
    assert settings.config_file == path
    assert settings.enabled_platforms() == ["telegram", "discord"]
    assert settings.access.owners == ["telegram:123456", "discord:987654321"]
    assert settings.access.is_owner("discord", 987654321)
    assert settings.access.policy().owners == frozenset({"telegram:123456", "discord:987654321"})
    assert settings.discord.gateway_url == "wss://gateway.discord.gg/"
    assert settings.telegram.bot_base_url == "https://api.telegram.org/bot"
    assert settings.telegram.file_base_url == "https://api.telegram.org/file/bot"


def test_config_file_discovery_order(tmp_path: Path) -> None:
    write(tmp_path / "parley.yaml", "provider: {model: from-cwd}\n")
    write(tmp_path / "other.yaml", "provider: {model: from-env-var}\n")
    write(tmp_path / "explicit.yaml", "provider: {model: explicit}\n")

    assert load_config(env=BASE_ENV).provider.model == "from-cwd"
    env = {**BASE_ENV, "PARLEY_CONFIG": str(tmp_path / "other.yaml")}
    assert load_config(env=env).provider.model == "from-env-var"
    assert load_config(tmp_path / "explicit.yaml", env=env).provider.model == "explicit"


def test_explicit_config_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    exc = load_error(tmp_path / "missing.yaml", env=BASE_ENV)
    assert problems_of(exc) == {str(tmp_path / "missing.yaml"): "config file not found"}


def test_environment_beats_yaml_with_double_underscore_nesting(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "provider: {model: yaml-model, timeouts: {idle: 5, connect: 3}}\n")
    env = {**BASE_ENV, "PARLEY_PROVIDER__MODEL": "env-model", "parley_provider__timeouts__idle": "7"}
    settings = load_config(path, env=env)
    assert settings.provider.model == "env-model"
    assert settings.provider.timeouts.idle == 7.0  # names are case-insensitive
    assert settings.provider.timeouts.connect == 3.0  # untouched YAML siblings survive the merge


def test_dotenv_sits_between_environment_and_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "provider: {model: yaml-model}\nchat: {queue_max: 1}\n")
    write(
        tmp_path / ".env",
        "PARLEY_PROVIDER__MODEL=dotenv-model\nPARLEY_CHAT__QUEUE_MAX=2\nOPENAI_API_KEY=sk-from-dotenv-0123456789abcd\n",
    )
    settings = load_config(path, env={"PARLEY_CHAT__QUEUE_MAX": "3"})
    assert settings.provider.model == "dotenv-model"  # .env beats YAML
    assert settings.chat.queue_max == 3  # environment beats .env
    assert settings.provider.api_key is not None
    assert settings.provider.api_key.get_secret_value() == "sk-from-dotenv-0123456789abcd"  # env: reads .env too
    # The .env file can be switched off (or pointed elsewhere).
    assert "OPENAI_API_KEY" in problems_of(load_error(path, env={}, env_file=None))["provider.api_key"]


def test_init_kwargs_beat_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "parley.yaml", "provider: {model: yaml-model}\n")
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("PARLEY_PROVIDER__MODEL", "env-model")
    assert Settings().provider.model == "env-model"  # a bare Settings() reads the real environment
    assert Settings(provider={"model": "kwarg-model"}).provider.model == "kwarg-model"


def test_lists_and_listen_addresses_from_the_environment() -> None:
    env = {
        **BASE_ENV,
        "PARLEY_ACCESS__OWNERS": "telegram:1, discord:2",
        "PARLEY_ACCESS__ALLOWED_CHATS": '["telegram:-1001234"]',
        "PARLEY_PROVIDER__MODELS": "gpt-4.1,gpt-4.1-mini",
        "PARLEY_METRICS__LISTEN": "127.0.0.1:0",
        "PARLEY_TELEGRAM__PACING__GLOBAL__RATE": "5",
        "PARLEY_PROVIDER__EXTRA_PARAMS": '{"temperature": 0.2}',
    }
    settings = load_config(env=env)
    assert settings.access.owners == ["telegram:1", "discord:2"]
    assert settings.access.allowed_chats == ["telegram:-1001234"]
    assert settings.provider.allowed_models == ["gpt-4.1-mini", "gpt-4.1"]
    assert settings.metrics.listen == Listen("127.0.0.1", 0) and settings.metrics.enabled
    assert settings.telegram.pacing.global_.rate == 5.0
    assert settings.telegram.pacing.global_.burst == 25  # the rest of the default survives
    assert settings.provider.extra_params == {"temperature": 0.2}


def test_pacing_overrides_merge_with_the_platform_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "discord: {pacing: {group: {rate: 0.5}}}\n")
    pacing = load_config(path, env=BASE_ENV).discord.pacing
    assert (pacing.group.rate, pacing.group.burst) == (0.5, 3)
    assert (pacing.global_.rate, pacing.global_.burst) == (40.0, 40)
    policy = pacing.policy()  # what bots.pacing consumes
    assert (policy.group.rate, policy.platform.burst) == (0.5, 40)


def test_a_section_with_every_key_commented_out_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "discord:\n  # token: env:X\ntelegram:\n")
    settings = load_config(path, env=BASE_ENV)
    assert settings.discord.command_prefix == "!"
    assert settings.telegram.mode == "polling"


# --------------------------------------------------------------------------- env: secrets


def test_env_references_resolve_and_unset_platform_tokens_mean_not_configured(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "telegram: {token: env:MY_TG}\ndiscord: {token: env:MY_DC}\n")
    settings = load_config(path, env={**BASE_ENV, "MY_TG": TG_TOKEN, "MY_DC": ""})
    assert settings.telegram.enabled
    assert not settings.discord.enabled  # empty counts as unset: not started, not an error
    assert settings.discord.unset_env == {"token": "MY_DC"}  # so `parley check` can say why


def test_missing_provider_key_is_an_error_only_for_openai(tmp_path: Path) -> None:
    exc = load_error(write(tmp_path / "a.yaml", "provider: {api_key: env:NOPE}\n"), env={})
    message = problems_of(exc)["provider.api_key"]
    assert "NOPE" in message and "not set" in message

    local = write(tmp_path / "b.yaml", "provider: {base_url: 'http://127.0.0.1:11434/v1', api_key: env:NOPE}\n")
    assert load_config(local, env={}).provider.api_key is None


def test_provider_settings_become_the_agents_provider_config(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "provider: {model: m1, models: [m2], api: responses, extra_params: {temperature: 0.1},"
        " timeouts: {idle: 12}, max_retries: 0, stream: false, transport: httpx}\n",
    )
    cfg = load_config(path, env=BASE_ENV).provider.agent_config("m2")
    assert (cfg.model, cfg.api, cfg.api_key, cfg.max_retries, cfg.stream) == ("m2", "responses", OPENAI_KEY, 0, False)
    assert cfg.transport == "httpx"
    assert cfg.extra_params == {"temperature": 0.1}
    assert (cfg.timeouts.idle, cfg.timeouts.first_token) == (12.0, 45.0)
    assert OPENAI_KEY not in repr(cfg)

    local = write(tmp_path / "l.yaml", "provider: {base_url: 'http://127.0.0.1:8080/v1'}\n")
    keyless = load_config(local, env={}).provider.agent_config()
    assert keyless.api_key == NO_API_KEY and keyless.model == "gpt-4.1-mini"
    assert keyless.transport == "aiohttp"


def test_media_defaults_are_safe_and_on_off_reads_as_it_says(tmp_path: Path) -> None:
    media = load_config(env=BASE_ENV).media
    assert (media.images, media.max_images, media.max_image_bytes, media.max_download_bytes) == (True, 4, 10**7, 2 * 10**7)
    assert (media.transcription_model, media.show_transcript, media.replay_images) == ("whisper-1", True, False)
    assert media.max_document_chars == 20_000 and media.transcription.base_url is None

    path = write(tmp_path / "c.yaml", "media: {images: off, replay_images: on, max_images: 2}\n")
    media = load_config(path, env=BASE_ENV).media
    assert (media.images, media.replay_images, media.max_images) == (False, True, 2)
    assert load_config(env={**BASE_ENV, "PARLEY_MEDIA__IMAGES": "off"}).media.images is False
    options = media.options()
    assert (options.images, options.max_images, options.replay_images) == (False, 2, True)


def test_transcription_uses_the_providers_client_unless_it_has_its_own_endpoint(tmp_path: Path) -> None:
    settings = load_config(env=BASE_ENV)
    shared = settings.media.transcription_config(settings.provider)
    assert (shared.model, shared.base_url, shared.api_key, shared.timeout) == ("whisper-1", None, None, 60.0)

    path = write(
        tmp_path / "c.yaml",
        "provider: {base_url: 'http://localhost:8000/v1'}\n"
        "media: {transcription_model: whisper-large-v3, transcription: {base_url: 'https://api.openai.com/v1', "
        "api_key: env:WHISPER_KEY, timeout: 20}}\n",
    )
    settings = load_config(path, env={"WHISPER_KEY": "sk-whisper-0123456789abcdef"})
    own = settings.media.transcription_config(settings.provider)
    assert (own.model, own.base_url, own.api_key, own.timeout) == (
        "whisper-large-v3", "https://api.openai.com/v1", "sk-whisper-0123456789abcdef", 20.0,
    )  # fmt: skip
    assert "sk-whisper-0123456789abcdef" in settings.secrets()
    assert "sk-whisper" not in repr(own) and "sk-whisper" not in repr(settings.media)


def test_transcription_key_mistakes_name_their_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "media: {transcription: {api_key: 'sk-lonely-key-0123456789'}}\n")
    assert "only used with transcription.base_url" in problems_of(load_error(path, env=BASE_ENV))[
        "media.transcription.api_key"
    ]
    path = write(tmp_path / "c.yaml", "media: {transcription: {base_url: 'https://api.openai.com/v1', api_key: env:NOPE}}\n")
    assert problems_of(load_error(path, env=BASE_ENV))["media.transcription.api_key"] == (
        "environment variable NOPE is not set; https://api.openai.com/v1 requires an API key"
    )
    path = write(tmp_path / "c.yaml", "media: {max_images: 0, max_document_chars: 5}\n")
    assert set(problems_of(load_error(path, env=BASE_ENV))) == {"media.max_images", "media.max_document_chars"}


def test_an_unknown_transport_is_refused_with_the_choices(tmp_path: Path) -> None:
    exc = load_error(write(tmp_path / "t.yaml", "provider: {transport: requests}\n"), env=BASE_ENV)
    message = problems_of(exc)["provider.transport"]
    assert "aiohttp" in message and "httpx" in message


def test_missing_variable_for_the_store_is_an_error(tmp_path: Path) -> None:
    exc = load_error(write(tmp_path / "c.yaml", "store: env:DATABASE_URL\n"), env=BASE_ENV)
    assert problems_of(exc) == {
        "store": "environment variable DATABASE_URL is not set (referenced as env:DATABASE_URL)"
    }


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("mysql://parley:pw@db/parley", ["'mysql'", "sqlite:///", "postgresql://"], id="unknown-scheme"),
        pytest.param("sqlite:///:memory:", ["in-memory"], id="in-memory-sqlite"),
    ],
)
def test_store_urls_the_store_would_refuse_are_refused_at_load(tmp_path: Path, url: str, words: list[str]) -> None:
    exc = load_error(write(tmp_path / "c.yaml", f"store: '{url}'\n"), env=BASE_ENV)
    (key, message), *rest = problems_of(exc).items()
    assert key == "store" and not rest
    assert all(word in message for word in words), message
    assert "pw@" not in message  # the store's wording masks passwords


def test_store_url_from_env_reference_keeps_the_password_out_of_repr(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "store: env:DATABASE_URL\n")
    settings = load_config(path, env={**BASE_ENV, "DATABASE_URL": "postgres://parley:s3cr%40tpw@db:5432/parley"})
    assert settings.store.kind == "postgresql"
    assert settings.store.get_secret_value() == "postgres://parley:s3cr%40tpw@db:5432/parley"
    assert settings.store.database == "parley"
    assert str(settings.store) == "postgres://parley:***@db:5432/parley"
    assert {"s3cr@tpw", "s3cr%40tpw"} <= set(settings.secrets())


def test_secrets_never_appear_in_repr_str_or_dumps(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "telegram: {mode: webhook, webhook: {url: 'https://bot.example.com/telegram'}}\n"
        "store: postgresql://parley:db-password-123@db/parley\n",
    )
    env = {
        **BASE_ENV,
        "TELEGRAM_BOT_TOKEN": TG_TOKEN,
        "DISCORD_BOT_TOKEN": DC_TOKEN,
        "TELEGRAM_WEBHOOK_SECRET": "webhook-secret-value",
    }
    settings = load_config(path, env=env)
    secrets = [OPENAI_KEY, TG_TOKEN, DC_TOKEN, "webhook-secret-value", "db-password-123"]
    assert set(secrets) <= set(settings.secrets())
    renderings = [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())]
    for text in renderings:
        for secret in secrets:
            assert secret not in text


def test_env_reference_must_name_a_variable(tmp_path: Path) -> None:
    exc = load_error(write(tmp_path / "c.yaml", "telegram: {token: 'env:not a name'}\n"), env=BASE_ENV)
    assert "must name a variable" in problems_of(exc)["telegram.token"]


# --------------------------------------------------------------------------- one message per mistake


@pytest.mark.parametrize(
    ("yaml_text", "key", "expected"),
    [
        pytest.param(
            "provider: {timeouts: {idle: abc}}\n",
            "provider.timeouts.idle",
            "Input should be a valid number, unable to parse string as a number (got 'abc')",
            id="wrong-type",
        ),
        pytest.param(
            "telegram: {pacing: {private: {rate: 0}}}\n",
            "telegram.pacing.private.rate",
            "Input should be greater than 0 (got 0)",
            id="out-of-range",
        ),
        pytest.param(
            "provider: {api: chat}\n",
            "provider.api",
            "Input should be 'chat_completions' or 'responses' (got 'chat')",
            id="bad-enum",
        ),
        pytest.param(
            "access: {owners: ['123456']}\n",
            "access.owners[0]",
            "must be 'platform:user_id' with platform telegram or discord, e.g. 'telegram:123456' "
            "(to find yours, message the bot: it answers anyone without access with their id)",
            id="malformed-owner",
        ),
        pytest.param(
            "access: {owners: [123456]}\n",
            "access.owners[0]",
            "must be 'platform:user_id' as a quoted string, e.g. 'telegram:123456' "
            "(to find yours, message the bot: it answers anyone without access with their id)",
            id="owner-not-a-string",
        ),
        pytest.param("telegram: {tokn: x}\n", "telegram.tokn", "unknown key (did you mean 'token'?)", id="unknown-key"),
        pytest.param("flavour: vanilla\n", "flavour", "unknown key", id="unknown-top-level-key"),
        pytest.param(
            "cluster: {enabled: true, redis_url: 'redis://127.0.0.1:6379/0'}\n",
            "cluster.enabled",
            "needs a PostgreSQL store (store: postgresql://...): the replicas share their message queue, locks and "
            "history through it, and a SQLite file belongs to one process",
            id="cluster-on-sqlite",
        ),
        pytest.param(
            "store: postgresql://parley@db/parley\ncluster: {enabled: true}\n",
            "cluster.redis_url",
            "required when cluster.enabled is true: the replicas share the platforms' rate budgets through Redis "
            "(e.g. redis://127.0.0.1:6379/0)",
            id="cluster-without-redis",
        ),
        pytest.param(
            "store: postgresql://parley@db/parley\ncluster: {lease_timeout: 1}\n",
            "cluster.lease_timeout",
            "Input should be greater than or equal to 3 (got 1)",
            id="cluster-lease-too-short",
        ),
        pytest.param(
            "metrics: {listen: '9464'}\n",
            "metrics.listen",
            "must be host:port, e.g. 127.0.0.1:9464 (0.0.0.0 listens on every interface), got '9464'",
            id="listen-not-host-port",
        ),
        pytest.param(
            "telegram: {mode: webhook}\n",
            "telegram.webhook.url",
            "required when telegram.mode is webhook (the public URL Telegram posts to)",
            id="webhook-without-url",
        ),
        pytest.param(
            "telegram: {mode: webhook, webhook: {url: 'http://bot.example.com/tg'}}\n",
            "telegram.webhook.url",
            "Telegram's cloud API only delivers webhooks to https URLs",
            id="webhook-http-to-cloud",
        ),
        pytest.param(
            "telegram: {api_base: 'https://api.telegram.org/bot'}\n",
            "telegram.api_base",
            "drop the trailing /bot: parley appends /bot<token> itself",
            id="api-base-with-bot",
        ),
        pytest.param(
            "logging: {level: LOUD}\n",
            "logging.level",
            "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
            id="log-level",
        ),
        pytest.param("telegram: [a, b]\n", "telegram", "must be a mapping of keys", id="section-not-a-mapping"),
    ],
)
def test_each_mistake_names_its_key_and_what_is_wrong(tmp_path: Path, yaml_text: str, key: str, expected: str) -> None:
    path = write(tmp_path / "c.yaml", yaml_text)
    exc = load_error(path, env={**BASE_ENV, "TELEGRAM_BOT_TOKEN": TG_TOKEN, "TELEGRAM_WEBHOOK_SECRET": "s3cret"})
    assert problems_of(exc) == {key: expected}
    assert isinstance(exc.value, ConfigError)
    assert str(exc.value) == f"{key}: {expected}"


def test_webhook_mode_needs_a_secret_token_naming_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "telegram: {mode: webhook, webhook: {url: 'https://bot.example.com/tg'}}\n")
    exc = load_error(path, env={**BASE_ENV, "TELEGRAM_BOT_TOKEN": TG_TOKEN})
    message = problems_of(exc)["telegram.webhook.secret_token"]
    assert "TELEGRAM_WEBHOOK_SECRET" in message and "required when telegram.mode is webhook" in message
    # A webhook configured for a platform that is not started is not an error.
    assert not load_config(path, env=BASE_ENV).telegram.enabled


def test_local_bot_api_server_may_take_plain_http_webhooks(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "telegram: {api_base: 'http://127.0.0.1:8081', mode: webhook, webhook: {url: 'http://127.0.0.1:8443/tg'}}\n",
    )
    env = {**BASE_ENV, "TELEGRAM_BOT_TOKEN": TG_TOKEN, "TELEGRAM_WEBHOOK_SECRET": "s3cret"}
    telegram = load_config(path, env=env).telegram
    assert telegram.bot_base_url == "http://127.0.0.1:8081/bot" and not telegram.uses_cloud_api


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "provider:\n  model: a\n   api: b\n")
    exc = load_error(path, env=BASE_ENV)
    (message,) = problems_of(exc).values()
    assert message.startswith("malformed YAML at line 3, column 7: ")
    assert exc.value.source == path


@pytest.mark.parametrize("text", ["- provider\n- telegram\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    exc = load_error(write(tmp_path / "c.yaml", text), env=BASE_ENV)
    (message,) = problems_of(exc).values()
    assert message.startswith("the file must be a mapping of keys")


def test_every_problem_is_listed_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "provider: {api: chat}\nchat: {queue_max: -1}\ntelegram: {tokn: x}\n")
    exc = load_error(path, env={**BASE_ENV, "PARLEY_AGENT__MAX_STEPS": "many"})
    lines = str(exc.value).splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "provider.api",
        "agent.max_steps",
        "chat.queue_max",
        "telegram.tokn",
    ]
    assert lines[1].endswith("[set by environment variable PARLEY_AGENT__MAX_STEPS]")


def test_single_underscore_environment_typo_is_not_silently_ignored() -> None:
    exc = load_error(env={**BASE_ENV, "PARLEY_TELEGRAM_TOKEN": TG_TOKEN, "PARLEY_REQUIRE_POSTGRES": "1"})
    assert problems_of(exc) == {
        "telegram.token": "environment variable PARLEY_TELEGRAM_TOKEN is ignored: "
        "nesting uses two underscores, PARLEY_TELEGRAM__TOKEN"
    }


def test_mapping_from_the_environment_that_is_not_json_names_the_variable() -> None:
    env = {**BASE_ENV, "PARLEY_PROVIDER__EXTRA_PARAMS": "temperature=0.2", "PARLEY_PROVIDER__MODEL": "m"}
    exc = load_error(env=env)
    assert problems_of(exc) == {
        "provider.extra_params": "environment variable PARLEY_PROVIDER__EXTRA_PARAMS must be JSON here, "
        "e.g. '{\"temperature\": 0.2}'"
    }


def test_unknown_nested_environment_key_is_an_error() -> None:
    exc = load_error(env={**BASE_ENV, "PARLEY_DISCORD__TOKN": "x"})
    assert problems_of(exc) == {
        "discord.tokn": "unknown key (did you mean 'token'?) [set by environment variable PARLEY_DISCORD__TOKN]"
    }


def test_every_parley_variable_that_sets_nothing_is_an_error_like_an_unknown_yaml_key(tmp_path: Path) -> None:
    """pydantic-settings dropped these without a word; a YAML file with the same keys fails."""
    write(tmp_path / ".env", "PARLEY_LOG_LEVEL=debug\n")
    env = {
        **BASE_ENV,
        "PARLEY_PROVIDR__MODEL": "gpt-4.1",  # no such section
        "PARLEY_PROVIDER__MODLE": "gpt-4.1",  # no such key (pydantic caught this one already)
        "PARLEY_STORE__URL": "sqlite:///x.db",  # below a plain value
        "PARLEY_FLAVOUR": "vanilla",  # nothing close
    }
    exc = load_error(env=env, env_file=tmp_path / ".env")
    assert problems_of(exc) == {
        "providr": "unknown key (did you mean 'provider'?) [set by environment variable PARLEY_PROVIDR__MODEL]",
        "provider.modle": "unknown key (did you mean 'model'?) [set by environment variable PARLEY_PROVIDER__MODLE]",
        "store.url": "unknown key: store is a value, it has no keys (did you mean PARLEY_STORE?) "
        "[set by environment variable PARLEY_STORE__URL]",
        "flavour": "unknown key [set by environment variable PARLEY_FLAVOUR]",
        "log_level": f"unknown key (did you mean PARLEY_LOGGING__LEVEL?) [set by {tmp_path / '.env'} variable "
        "PARLEY_LOG_LEVEL]",
    }
    assert len(exc.value.problems) == 5  # each once, not again in pydantic's words


def test_parley_variables_that_are_not_settings_and_keys_of_mappings_are_accepted() -> None:
    env = {
        **BASE_ENV,
        # parley's own documented non-setting variables
        "PARLEY_CONFIG": "",
        "PARLEY_REQUIRE_POSTGRES": "1",
        "PARLEY_TEST_POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/test",
        "PARLEY_CRASH_REPLY_TIMEOUT": "45",
        # a variable the configuration reads through env:
        "PARLEY_MY_TELEGRAM_TOKEN": TG_TOKEN,
        "PARLEY_TELEGRAM__TOKEN": "env:PARLEY_MY_TELEGRAM_TOKEN",
        # mappings take the operator's own keys
        "PARLEY_PROVIDER__EXTRA_PARAMS__TEMPERATURE": "0.2",
        "PARLEY_TELEGRAM__GROUP_TRIGGERS__-1001234": "all",
        "PARLEY_LOGGING__LOGGERS__AIOHTTP": "warning",
        # an alias, a top-level value, a whole section as JSON
        "PARLEY_TELEGRAM__PACING__GLOBAL__RATE": "10",
        "PARLEY_SHUTDOWN_TIMEOUT": "7",
        "PARLEY_HEALTH": '{"unready_after": 12}',
    }
    settings = load_config(env=env)
    assert settings.telegram.token is not None and settings.telegram.token.get_secret_value() == TG_TOKEN
    assert settings.provider.extra_params == {"temperature": "0.2"}
    assert settings.telegram.group_triggers == {"-1001234": "all"}
    assert settings.logging.loggers == {"aiohttp": "WARNING"}
    assert settings.telegram.pacing.global_.rate == 10
    assert (settings.shutdown_timeout, settings.health.unready_after) == (7, 12)


def test_every_parley_variable_the_project_uses_is_a_setting_or_listed_as_none() -> None:
    """A new switch (a test knob, a deployment variable) must be added to NON_SETTING_ENV_VARS,
    or every run that sets it would stop at "unknown key"."""
    import re

    from bots.config import _unknown_env_vars

    users = [
        *(path for path in REPO.glob("bots/**/*.py") if path.name != "config.py"),  # config.py quotes mistakes
        *REPO.glob("agent/**/*.py"), *REPO.glob("bench/**/*.py"), *REPO.glob("tests/support/*.py"),
        REPO / "tests" / "store_fixtures.py", REPO / "tests" / "redis_fixtures.py", REPO / "tests" / "conftest.py",
        REPO / ".ci" / "run",
        REPO / "Dockerfile", REPO / "docker-compose.yml", *REPO.glob("deploy/*"), REPO / ".env.example",
    ]
    names = set()
    for path in users:
        names |= set(re.findall(r"\bPARLEY_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    assert {"PARLEY_CONFIG", "PARLEY_REQUIRE_POSTGRES", "PARLEY_STORE"} <= names  # the scan sees them
    assert sorted(n for n in names if _unknown_env_vars({n: "x"}, "variable", frozenset())) == []


def test_the_readme_lists_every_non_setting_variable() -> None:
    from bots.config import NON_SETTING_ENV_VARS

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert [name for name in sorted(NON_SETTING_ENV_VARS) if f"`{name}`" not in readme] == []


def test_secret_values_are_not_echoed_in_error_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", f"telegram: {{token: ['{TG_TOKEN}'], tokn: '{TG_TOKEN}'}}\n")
    exc = load_error(path, env=BASE_ENV)
    assert TG_TOKEN not in str(exc.value)
    assert set(problems_of(exc)) == {"telegram.token", "telegram.tokn"}


def test_report_config_error_prints_every_problem_and_returns_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "provider: {api: chat}\nbogus: 1\n")
    exc = load_error(path, env=BASE_ENV)
    out = io.StringIO()
    assert report_config_error(exc.value, out) == 2
    assert out.getvalue().splitlines() == [
        f"parley: invalid configuration in {path}:",
        "  provider.api: Input should be 'chat_completions' or 'responses' (got 'chat')",
        "  bogus: unknown key",
    ]


# --------------------------------------------------------------------------- the example file


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        if info.exclude:  # read for old files only (agent.tools), not documented as a key
            continue
        key = f"{prefix}{info.alias or name}"
        keys.add(key)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _keys(annotation, key + ".")
    return keys


def _yaml_keys(data: dict[str, object], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict) and value:
            keys |= _yaml_keys(value, f"{prefix}{name}.")  # type: ignore[arg-type]
    return keys


def test_example_file_documents_every_key() -> None:
    documented = _yaml_keys(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    assert _keys(Settings) == documented


def test_example_file_is_exactly_the_defaults() -> None:
    env = {**BASE_ENV, "TELEGRAM_BOT_TOKEN": TG_TOKEN}
    from_example = load_config(EXAMPLE, env=env)
    from_defaults = load_config(env=env)
    assert from_example.model_dump() == from_defaults.model_dump()


# --------------------------------------------------------------------------- several providers


def _load_yaml(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "parley.yaml"
    path.write_text(text)
    return load_config(path, env={**BASE_ENV, **(env or {})})


def test_several_providers_models_and_fallback_make_a_catalogue(tmp_path: Path) -> None:
    settings = _load_yaml(tmp_path, """
providers:
  openai: {base_url: https://api.openai.com/v1, api_key: env:OPENAI_API_KEY, headers: {OpenAI-Organization: env:ORG}}
  local: {base_url: "http://127.0.0.1:11434/v1", api: responses}
models:
  - {name: gpt-4.1-mini, provider: openai, display_name: GPT-4.1 mini, fallback: [llama], price: {prompt: 0.4, completion: 1.6}}
  - {name: llama, provider: local, id: "llama3.1:8b", images: false}
fallback: [llama]
breaker_failures: 2
breaker_cooldown: 15
""", env={"OPENAI_API_KEY": "sk-test-key-123", "ORG": "org-secret-123"})
    cat = settings.catalogue()
    assert cat.default == "gpt-4.1-mini" and [m.name for m in cat.chain("gpt-4.1-mini")] == ["gpt-4.1-mini", "llama"]
    assert cat.providers["local"].api == "responses" and cat.providers["local"].api_key == "no-key"
    assert cat.providers["openai"].headers == {"OpenAI-Organization": "org-secret-123"}
    assert cat.get("GPT-4.1 MINI").name == "gpt-4.1-mini"  # display names work, any case
    assert cat.get("llama").id == "llama3.1:8b" and not cat.get("llama").images
    assert (cat.breaker_failures, cat.breaker_cooldown) == (2, 15)
    assert settings.model_names() == ["gpt-4.1-mini", "llama"]
    assert settings.prices()["gpt-4.1-mini"] == (0.4, 1.6)
    assert {"sk-test-key-123", "org-secret-123"} <= set(settings.secrets())


def test_models_take_other_spellings(tmp_path: Path) -> None:
    settings = _load_yaml(tmp_path, """
providers:
  local: {base_url: "http://127.0.0.1:11434/v1"}
models:
  - llama
  - {name: vision, model: "llava:7b", capabilities: [images]}
""")
    cat = settings.catalogue()
    assert cat.get("llama").provider == "local" and cat.get("llama").id == "llama"
    vision = cat.get("vision")
    assert (vision.id, vision.images, vision.tools, vision.reasoning) == ("llava:7b", True, False, False)


def test_an_old_single_provider_config_still_loads(tmp_path: Path) -> None:
    settings = _load_yaml(tmp_path, """
provider:
  base_url: "http://127.0.0.1:8080/v1"
  model: fake-model
  models: [other-model]
agent:
  tools: {datetime: false}
""")
    cat = settings.catalogue()
    assert list(cat.providers) == ["default"] and cat.names() == ["fake-model", "other-model"]
    assert cat.providers["default"].base_url == "http://127.0.0.1:8080/v1"
    assert settings.tools.datetime is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("providers: {a: {base_url: 'http://127.0.0.1:1/v1'}}\nmodels: [{name: m, provider: b}]\n",
         "models[0].provider: no provider named 'b' (providers: a)"),
        ("providers: {a: {base_url: 'http://127.0.0.1:1/v1'}}\nmodels: [m]\nfallback: [nope]\n",
         "fallback[0]: unknown model 'nope' (models: m)"),
        ("providers: {a: {base_url: 'http://127.0.0.1:1/v1'}}\nmodels: [{name: m, fallback: [x]}, {name: x, fallback: [m]}]\n",
         "models[1].fallback: a cycle: m -> x -> m"),
        ("providers: {a: {base_url: 'http://127.0.0.1:1/v1'}}\n",
         "models: list the models the providers serve, each with a name and a provider"),
        ("provider: {model: m}\nproviders: {a: {base_url: 'http://127.0.0.1:1/v1'}}\nmodels: [m]\n",
         "provider: set either provider (one provider) or providers + models, not both"),
        ("providers: {o: {base_url: 'https://api.openai.com/v1'}}\nmodels: [m]\n",
         "providers.o.api_key: is empty; https://api.openai.com/v1 requires an API key"),
    ],
    ids=["unknown-provider", "unknown-fallback", "cycle", "no-models", "both-forms", "openai-without-key"],
)
def test_bad_provider_configs_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_yaml(tmp_path, text)
    assert expected in str(caught.value)


async def test_a_bad_chain_exits_2_naming_the_key(tmp_path: Path) -> None:
    from tests.support.process import run_cli

    path = tmp_path / "parley.yaml"
    path.write_text("providers: {a: {base_url: 'http://127.0.0.1:1/v1'}}\nmodels: [m]\nfallback: [ghost]\n")
    result = await run_cli(["check", "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 2
    assert "fallback[0]: unknown model 'ghost'" in result.stderr


def test_cluster_mode_reads_its_section_and_keeps_the_redis_password_out_of_logs(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "store: postgresql://parley:dbpass1234@db/parley\n"
        "cluster: {enabled: true, redis_url: env:REDIS_URL, replica_id: web-1, lease_timeout: 10, concurrency: 50}\n",
    )
    settings = load_config(path, env={**BASE_ENV, "REDIS_URL": "redis://:r3disPassw0rd@cache:6379/2"}, env_file=None)
    cluster = settings.cluster
    assert (cluster.enabled, cluster.replica_id, cluster.lease_timeout, cluster.concurrency) == (True, "web-1", 10, 50)
    assert cluster.redis_url is not None and cluster.redis_url.get_secret_value().endswith("@cache:6379/2")
    assert "r3disPassw0rd" in settings.secrets() and "r3disPassw0rd" not in repr(settings)
    default = load_config(write(tmp_path / "d.yaml", "provider: {api_key: x}\n"), env={}, env_file=None).cluster
    assert (default.enabled, default.redis_url, default.lease_timeout, default.concurrency) == (False, None, 30, 500)
