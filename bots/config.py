"""parley's settings: one YAML file, environment overrides, a `.env` file, validated once.

Operators run parley from a YAML file (`parley.yaml`), from environment variables only
(`pip install` + tokens in the environment = running), or from both. Everything is
checked at start-up, before any connection is made, and *every* problem is reported at
once as `key.path: what is wrong` -- a typo must never be silently ignored, and a bad
value must never surface an hour later as a confusing runtime error.

Where values come from, highest priority first:

1. keyword arguments to `Settings(...)` (tests, programmatic use);
2. environment variables `PARLEY_<SECTION>__<KEY>` (`__` separates nesting levels,
   names are case-insensitive), e.g. `PARLEY_TELEGRAM__TOKEN`, `PARLEY_PROVIDER__MODEL`;
   one that names no setting is an error like an unknown YAML key, except parley's own
   non-setting variables (`NON_SETTING_ENV_VARS`);
3. the same variables in a `.env` file **in the current working directory** (where Docker
   Compose reads its `.env` too, and where systemd's `WorkingDirectory=` points);
4. the YAML file: the explicit path (the CLI's `--config`), else `PARLEY_CONFIG`, else
   `./parley.yaml` if it exists, else none (defaults + environment only);
5. the defaults below -- each one safe to run with.

Secrets (platform tokens, the provider API key, the webhook secret, the store URL) may be
written `env:NAME`: the value is read from the environment (or the `.env` file) at load
time, so the YAML file can be committed without secrets. A platform whose token resolves
to nothing is simply not configured (not started); a missing provider key is an error only
when `provider.base_url` is OpenAI's (local servers usually need none). Secrets are
`SecretStr` (or `StoreUrl`, which masks the password), so `repr`, `str` and logs never
show them; `Settings.secrets()` lists their values for the log redactor.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple, TextIO, get_origin
from urllib.parse import quote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_core import core_schema
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from bots.errors import ConfigError

if TYPE_CHECKING:
    from agent.config import ProviderConfig
    from agent.providers import Catalogue, ModelSpec
    from agent.media import TranscriptionConfig
    from agent.tools.mcp import McpServerConfig
    from bots.media_input import MediaOptions
    from bots.access import AccessPolicy
    from bots.pacing import Budget, PacingPolicy

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "NON_SETTING_ENV_VARS",
    "NO_API_KEY",
    "AccessSettings",
    "AgentSettings",
    "ChatSettings",
    "ConfigProblems",
    "DiscordPacing",
    "DiscordSettings",
    "Listen",
    "LoggingSettings",
    "MediaSettings",
    "MetricsSettings",
    "Problem",
    "ProviderSettings",
    "PacingSettings",
    "Rate",
    "Settings",
    "StoreUrl",
    "TelegramPacing",
    "TelegramSettings",
    "TranscriptionSettings",
    "WebhookSettings",
    "env_ref",
    "find_config_file",
    "load_config",
    "report_config_error",
]

ENV_PREFIX = "PARLEY_"
ENV_DELIMITER = "__"
CONFIG_ENV_VAR = "PARLEY_CONFIG"
# parley's own `PARLEY_*` variables that are not settings (the README lists them). Every
# other `PARLEY_*` variable must name a setting: a misspelt one is an error, like a
# misspelt YAML key, instead of a value silently ignored.
NON_SETTING_ENV_VARS = frozenset(
    {
        CONFIG_ENV_VAR,  # the YAML file to read
        "PARLEY_TEST_POSTGRES_URL",  # the test suite's PostgreSQL server
        "PARLEY_REQUIRE_POSTGRES",  # the test suite fails, rather than skips, without it (CI)
        "PARLEY_CRASH_REPLY_TIMEOUT",  # how long the crash tests wait for a reply
        "PARLEY_TEST_REDIS_URL",  # the test suite's Redis server
        "PARLEY_REQUIRE_REDIS",  # the test suite fails, rather than skips, without it (CI)
    }
)
DEFAULT_CONFIG_FILE = "parley.yaml"
DEFAULT_ENV_FILE = ".env"
ENV_REF = "env:"

PLATFORMS = ("telegram", "discord")
OPENAI_HOSTS = frozenset({"api.openai.com"})
# Sent to keyless local servers: the openai SDK refuses to start without some key.
NO_API_KEY = "no-key"
TELEGRAM_CLOUD_HOSTS = frozenset({"api.telegram.org"})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration: where (`key`) and what."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigProblems(ConfigError):
    """The configuration is invalid; `str()` lists every problem, one `key: what` per line.

    `problems` keeps them structured (for `parley check`'s table); `source` is the YAML
    file that was read, if any, so the CLI can say which file to fix.
    """

    def __init__(self, problems: Sequence[Problem], source: Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(str(p) for p in self.problems))


def report_config_error(error: ConfigError, stream: TextIO | None = None) -> int:
    """Print `error` for an operator and return the exit code the CLI should use (2).

    Kept here so every entry point (`parley run`, `chat`, `check`) words it the same way:
    which file, then one problem per line.
    """
    out = stream if stream is not None else sys.stderr
    source = getattr(error, "source", None)
    where = f" in {source}" if source else ""
    lines = str(error).splitlines() or ["(no details)"]
    print(f"parley: invalid configuration{where}:", file=out)
    for line in lines:
        print(f"  {line}", file=out)
    return 2


class _SectionProblems(ValueError):
    """Raised by a section's cross-field checks; carries keys *relative to the section*.

    Pydantic reports it at the section's location; `_problems_from_validation` appends
    each relative key, so the operator reads `telegram.webhook.url: ...`, not `telegram`.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))


# --------------------------------------------------------------------------- load context


@dataclass(frozen=True, slots=True)
class _LoadOptions:
    """What one load reads: the environment it sees, the `.env` values, the YAML data."""

    environ: Mapping[str, str]
    dotenv: Mapping[str, str]
    yaml_data: Mapping[str, Any]
    yaml_path: Path | None
    # Variables already reported as naming no setting: the settings sources skip them, so
    # pydantic does not report them a second time in its own words.
    unknown: frozenset[str] = frozenset()

    @property
    def lookup(self) -> dict[str, str]:
        """Where `env:NAME` is resolved: the environment wins over the `.env` file."""
        return {**self.dotenv, **self.environ}


# `Settings()` runs pydantic-settings' sources and validators; they read the load's
# options from here, so `load_config(env=...)` never has to touch `os.environ`.
_LOAD: ContextVar[_LoadOptions | None] = ContextVar("parley_config_load", default=None)


def _read_dotenv(path: Path | None) -> dict[str, str]:
    if path is None or not path.is_file():
        return {}
    from dotenv import dotenv_values  # a pydantic-settings dependency

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _default_options(*, with_yaml: bool) -> _LoadOptions:
    """Options outside `load_config`: the real environment, `./.env`, file discovery."""
    environ = dict(os.environ)
    dotenv = _read_dotenv(Path(DEFAULT_ENV_FILE))
    path = find_config_file(None, {**dotenv, **environ}) if with_yaml else None
    return _LoadOptions(environ, dotenv, _read_yaml(path) if path else {}, path)


def _options() -> _LoadOptions:
    opts = _LOAD.get()
    # A section built on its own (e.g. `TelegramSettings()` in a test) still resolves env:.
    return opts if opts is not None else _default_options(with_yaml=False)


@contextmanager
def _loading(opts: _LoadOptions) -> Iterator[None]:
    token = _LOAD.set(opts)
    try:
        yield
    finally:
        _LOAD.reset(token)


# --------------------------------------------------------------------------- secrets


def env_ref(value: Any) -> str | None:
    """The variable name of an `env:NAME` reference, or None if `value` is not one."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str) and value.strip().startswith(ENV_REF):
        return value.strip()[len(ENV_REF) :].strip()
    return None


def _resolve_secret_text(value: Any) -> str | None:
    """Plain text of a secret setting, with `env:NAME` resolved; None when it is empty/unset."""
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise ValueError("must be a string (or env:NAME to read it from the environment)")
    value = value.strip()
    name = env_ref(value)
    if name is not None:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"env: reference {value!r} must name a variable, like env:OPENAI_API_KEY")
        value = _options().lookup.get(name, "").strip()
    return value or None


def _optional_secret(value: Any) -> SecretStr | None:
    text = _resolve_secret_text(value)
    return SecretStr(text) if text else None


class _SecretField:
    """Marks a field as a secret: `env:` is resolved and an unset variable is remembered."""

    __slots__ = ()


OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_optional_secret), _SecretField()]
"""A secret that may be absent: an unset `env:` variable gives None (the section decides)."""


class StoreUrl:
    """The store's database URL: behaves like a secret, but shows where data lives.

    `str()`/`repr()` mask only the password (`postgresql://parley:***@db/parley`), which
    keeps logs useful; `get_secret_value()` returns the full URL, which is what
    `bots.store` takes. Parsing is the store's own (`bots.store.resolve_url`), so a URL
    the store would refuse is refused here, at start-up, under the key `store`.
    """

    __slots__ = ("_url", "_resolved")

    def __init__(self, url: str) -> None:
        from bots.store import resolve_url

        try:
            self._resolved = resolve_url(url)
        except ConfigError as exc:
            message = str(exc)
            raise ValueError(message[len("store: ") :] if message.startswith("store: ") else message) from None
        self._url = url

    @property
    def kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self._resolved.get_backend_name() == "sqlite" else "postgresql"

    @property
    def password(self) -> str | None:
        return self._resolved.password or None

    @property
    def database(self) -> str | None:
        """The database name, or for SQLite the file path (relative to the working directory)."""
        return self._resolved.database

    def get_secret_value(self) -> str:
        return self._url

    def masked(self) -> str:
        from bots.store import redact_url

        return redact_url(self._url)

    def __str__(self) -> str:
        return self.masked()

    def __repr__(self) -> str:
        return f"StoreUrl({self.masked()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreUrl) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    @classmethod
    def _validate(cls, value: Any) -> StoreUrl:
        if isinstance(value, StoreUrl):
            return value
        name = env_ref(value)
        text = _resolve_secret_text(value)
        if text is None:
            if name:
                raise ValueError(f"environment variable {name} is not set (referenced as env:{name})")
            raise ValueError("must not be empty; e.g. sqlite:///data/parley.db")
        return cls(text)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="always"),
        )


# --------------------------------------------------------------------------- small types


class Listen(NamedTuple):
    """A `host:port` to listen on. Port 0 asks the OS for a free port (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, value: Any) -> Listen | None:
        """`"127.0.0.1:9464"`, `"[::1]:9464"`, `"0.0.0.0:80"`; `off`/`none`/empty give None."""
        if value is None or isinstance(value, Listen):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2:
            value = f"{value[0]}:{value[1]}"
        if not isinstance(value, str):
            raise ValueError("must be host:port, e.g. 127.0.0.1:9464")
        text = value.strip()
        if text.lower() in ("", "off", "none", "null", "false"):
            return None
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            sep = ""  # an unbracketed IPv6 address is ambiguous
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"must be host:port, e.g. 127.0.0.1:9464 (0.0.0.0 listens on every interface), got {value!r}"
            )
        return cls(host, int(port))


ListenAddr = Annotated[Listen, NoDecode, BeforeValidator(Listen.parse), PlainSerializer(str)]


def _split_list(value: Any) -> Any:
    """Lists from the environment: JSON (`["a","b"]`) or comma-separated (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a valid JSON list: {exc.msg}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


def _platform_id(value: str, *, what: str, allow_negative: bool) -> str:
    platform, sep, ident = value.strip().partition(":")
    platform = platform.strip().lower()
    ident = ident.strip()
    number = ident[1:] if allow_negative and ident.startswith("-") else ident
    if not sep or platform not in PLATFORMS or not number.isdigit():
        example = "telegram:-1001234567890" if allow_negative else "telegram:123456"
        raise ValueError(f"must be 'platform:{what}' with platform {' or '.join(PLATFORMS)}, e.g. {example!r}")
    from bots.ids import chat_id_problem, user_id_problem

    problem = (chat_id_problem if allow_negative else user_id_problem)(platform, ident)
    if problem:
        raise ValueError(f"{ident[:24]!r} is not a {what}: {problem}")
    return f"{platform}:{ident}"


# A new operator rarely knows their numeric id; the bot tells anyone without access theirs.
_FIND_YOUR_ID = "to find yours, message the bot: it answers anyone without access with their id"


def _owner(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be 'platform:user_id' as a quoted string, e.g. 'telegram:123456' ({_FIND_YOUR_ID})")
    try:
        return _platform_id(value, what="user_id", allow_negative=False)
    except ValueError as exc:
        raise ValueError(f"{exc} ({_FIND_YOUR_ID})") from None


def _chat(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be 'platform:chat_id' as a quoted string, e.g. 'telegram:-1001234567890'")
    return _platform_id(value, what="chat_id", allow_negative=True)


def _http_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value.strip().rstrip("/")


def _ws_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"must be a ws:// or wss:// URL, got {value!r}")
    return value.strip()


def _log_level(value: Any) -> str:
    text = str(value).strip().upper()
    if text == "WARN":
        text = "WARNING"
    if text not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return text


HttpUrl = Annotated[str, AfterValidator(_http_url)]
WsUrl = Annotated[str, AfterValidator(_ws_url)]
LogLevel = Annotated[str, BeforeValidator(_log_level)]
Seconds = Annotated[float, Field(gt=0)]


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, defaults are validated.

    It also remembers which `env:` references resolved to nothing (`unset_env`), so a
    cross-check can name the variable, and `parley check` can say why a platform is off.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_by_name=True, serialize_by_alias=True)

    _unset_env: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def unset_env(self) -> dict[str, str]:
        """Secret fields whose `env:NAME` variable was unset: field name -> variable name."""
        return dict(self._unset_env)

    @model_validator(mode="wrap")
    @classmethod
    def _validate_section(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        if isinstance(data, cls):
            return handler(data)
        if data is None:  # `telegram:` with every key commented out
            data = {}
        model = handler(data)
        if isinstance(data, Mapping):
            for name, info in cls.model_fields.items():
                if any(isinstance(m, _SecretField) for m in info.metadata):
                    raw = data.get(name, info.default)
                    var = env_ref(raw)
                    if var and getattr(model, name) is None:
                        model._unset_env[name] = var
        problems = model._cross_check()
        if problems:
            raise _SectionProblems(problems)
        return model

    def _cross_check(self) -> list[tuple[str, str]]:
        """Checks spanning several keys of this section: (relative key, message) pairs."""
        return []


class Rate(_Section):
    """A token bucket: `rate` operations per second sustained, `burst` at once."""

    rate: float = Field(gt=0)
    burst: int = Field(ge=1)

    def budget(self) -> Budget:
        """This rate as a `bots.pacing.Budget`."""
        from bots.pacing import Budget

        return Budget(rate=self.rate, burst=self.burst)


class PacingSettings(_Section):
    """Outbound budgets of one platform: per private chat, per group chat, for the whole bot.

    Subclasses set `DEFAULTS`; what the operator writes is merged over them, so
    `pacing: {group: {rate: 0.2}}` changes one number and keeps the rest.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}

    private: Rate
    group: Rate
    global_: Rate = Field(alias="global")
    in_flight: int = Field(default=5, ge=1, le=100)

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            return data
        merged: dict[str, Any] = {k: dict(v) for k, v in cls.DEFAULTS.items()}
        for key, value in data.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return merged

    def policy(self) -> PacingPolicy:
        """These budgets as a `bots.pacing.PacingPolicy`."""
        from bots.pacing import PacingPolicy

        return PacingPolicy(
            private=self.private.budget(),
            group=self.group.budget(),
            platform=self.global_.budget(),
            in_flight=self.in_flight,
        )


class Timeouts(_Section):
    """The provider's clocks (`agent.config.Timeouts` says what each one measures).

    Defaults a person waiting in a chat accepts: a hung provider ends the turn after about
    `first_token + total` (the streaming attempt, then one non-streaming fallback) ≈ 4 min,
    not 11.5; the live message says "still working…" long before (`chat.still_working_after`).
    """

    connect: Seconds = 10.0
    first_token: Seconds = 45.0
    idle: Seconds = 30.0
    total: Seconds = 180.0

    def _cross_check(self) -> list[tuple[str, str]]:
        problems = []
        if self.connect >= self.first_token:
            problems.append((
                "connect",
                f"must be less than first_token ({self.first_token:g} s): connecting is part of the wait "
                "for the first token, and a failed connect is the retry that must fit inside it",
            ))
        for name in ("first_token", "idle"):
            if getattr(self, name) > self.total:
                problems.append((name, f"must not exceed total ({self.total:g} s), the wall clock of one request"))
        return problems


def _off_is_zero(value: Any) -> Any:
    """`off` (YAML reads it as false), `false`, `no` or `none` mean 0: the feature is off."""
    if value is False or value is None:
        return 0.0
    if isinstance(value, str) and value.strip().lower() in ("off", "false", "no", "none"):
        return 0.0
    return value


SecondsOrOff = Annotated[float, BeforeValidator(_off_is_zero), Field(ge=0)]


class Price(_Section):
    prompt: float = Field(ge=0)
    completion: float = Field(ge=0)


_LONG_FORM: ContextVar[bool] = ContextVar("parley_config_long_form", default=False)
"""True while a `Settings` with `providers` is validated (see `Settings._note_long_form`)."""

_REF_IN_TEXT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _secret_refs(value: Any) -> Any:
    """Values of an MCP server's `env`/`headers`: `env:NAME` (the whole value) or text with
    `${NAME}` in it ("Bearer ${GITHUB_TOKEN}"), resolved now; an unset variable is an error
    naming it, so a server is never started with a credential silently missing."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of names to values")
    lookup = _options().lookup
    out: dict[str, SecretStr] = {}
    for key, raw in value.items():
        if isinstance(raw, SecretStr):
            raw = raw.get_secret_value()
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueError(f"{key}: must be a string (or env:NAME / ${{NAME}})")
        text = str(raw)
        name = env_ref(text)
        names = [name] if name is not None else _REF_IN_TEXT.findall(text)
        missing = [n for n in names if not lookup.get(n, "").strip()]
        if missing:
            raise ValueError(f"{key}: environment variable {missing[0]} is not set")
        if name is not None:
            text = lookup[name].strip()
        else:
            text = _REF_IN_TEXT.sub(lambda m: lookup[m.group(1)].strip(), text)
        out[str(key)] = SecretStr(text)
    return out


SecretMap = Annotated[dict[str, SecretStr], BeforeValidator(_secret_refs)]


class EndpointSettings(_Section):
    """One OpenAI-compatible endpoint and how to talk to it (`providers.<name>`)."""

    base_url: HttpUrl = "https://api.openai.com/v1"
    # No default key for a named provider: an OpenAI key must never go to another host.
    api_key: OptionalSecret = None
    api: Literal["chat_completions", "responses"] = "chat_completions"
    extra_params: dict[str, Any] = Field(default_factory=dict)
    headers: SecretMap = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=dict)
    max_retries: int = Field(default=2, ge=0, le=10)
    stream: bool = True
    stream_failure_threshold: int = Field(default=3, ge=1)
    stream_cooldown: float = Field(default=300.0, ge=0)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"

    @property
    def is_openai(self) -> bool:
        return (urlsplit(self.base_url).hostname or "").lower() in OPENAI_HOSTS

    def agent_config(self, model: str) -> ProviderConfig:
        """The agent's `ProviderConfig` with `model` as its default, key resolved.

        Without a key (a local server) the placeholder `NO_API_KEY` is sent, because the
        openai SDK will not construct a client without one.
        """
        from agent.config import ProviderConfig
        from agent.config import Timeouts as AgentTimeouts

        t = self.timeouts
        return ProviderConfig(
            base_url=self.base_url,
            api_key=self.api_key.get_secret_value() if self.api_key is not None else NO_API_KEY,
            model=model,
            api=self.api,
            extra_params=dict(self.extra_params),
            timeouts=AgentTimeouts(connect=t.connect, first_token=t.first_token, idle=t.idle, total=t.total),
            max_retries=self.max_retries,
            stream=self.stream,
            stream_failure_threshold=self.stream_failure_threshold,
            stream_cooldown=self.stream_cooldown,
            transport=self.transport,
            headers={k: v.get_secret_value() for k, v in self.headers.items()},
        )

    def key_problem(self) -> str | None:
        """Why this endpoint cannot work without a key (OpenAI's needs one), if so."""
        if self.api_key is None and self.is_openai:
            var = self._unset_env.get("api_key")
            why = f"environment variable {var} is not set" if var else "is empty"
            return f"{why}; {self.base_url} requires an API key"
        return None

    def _cross_check(self) -> list[tuple[str, str]]:
        problem = self.key_problem()
        return [("api_key", problem)] if problem else []


class ProviderSettings(EndpointSettings):
    """The single provider of the short form (`provider:`): one endpoint, its models, prices."""

    api_key: OptionalSecret = Field(default=f"{ENV_REF}OPENAI_API_KEY")
    model: str = Field(default="gpt-4.1-mini", min_length=1)
    models: StrList = Field(default_factory=list)
    prices: dict[str, Price] = Field(default_factory=dict)

    @property
    def allowed_models(self) -> list[str]:
        """Models `/model` may switch to: `model` first, then `models`, without duplicates."""
        return list(dict.fromkeys([self.model, *self.models]))

    def agent_config(self, model: str | None = None) -> ProviderConfig:
        return super().agent_config(model or self.model)

    def _cross_check(self) -> list[tuple[str, str]]:
        if _LONG_FORM.get():
            return []  # `providers` is in use: this section's defaults are not
        return super()._cross_check()


class ModelSettings(_Section):
    """One model people may pick (`models[]`): who serves it and what it can do."""

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^\S(.*\S)?$")]
    provider: str | None = None  # default: the only provider, when there is one
    id: str | None = None  # the provider's model id (default: name)
    display_name: str | None = None
    images: bool = True
    tools: bool = True
    reasoning: bool = False
    fallback: StrList = Field(default_factory=list)
    price: Price | None = None
    allow: Literal["user", "admin", "owner"] = "user"  # the least role that may pick it

    @model_validator(mode="before")
    @classmethod
    def _other_spellings(cls, data: Any) -> Any:
        """`- gpt-4.1-mini` (just a name); `model:` for `id:`; `capabilities: [images, tools]`
        for the three flags (those listed on, the others off)."""
        if isinstance(data, str):
            return {"name": data}
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "model" in data and "id" not in data:
            data["id"] = data.pop("model")
        caps = data.pop("capabilities", None)
        if caps is not None:
            if isinstance(caps, str):
                caps = [c.strip() for c in caps.split(",") if c.strip()]
            if not isinstance(caps, (list, tuple)) or not set(caps) <= {"images", "tools", "reasoning"}:
                raise ValueError(f"capabilities: a list of images, tools, reasoning (got {caps!r})")
            for flag in ("images", "tools", "reasoning"):
                data.setdefault(flag, flag in caps)
        return data


class FetchUrlTool(_Section):
    enabled: bool = False
    max_bytes: int = Field(default=200_000, ge=1)
    timeout: Seconds = 10.0
    allow_private: bool = False




class McpServerSettings(_Section):
    """One MCP server (`tools.mcp_servers[]`): a program over stdio, or a streamable HTTP URL."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: SecretMap = Field(default_factory=dict)
    cwd: str | None = None
    url: Annotated[str, AfterValidator(_http_url)] | None = None
    headers: SecretMap = Field(default_factory=dict)
    call_timeout: Seconds = 60.0
    startup_timeout: Seconds = 20.0
    restart_max: Seconds = 300.0
    enabled: bool = True

    def _cross_check(self) -> list[tuple[str, str]]:
        if bool(self.command) == bool(self.url):
            return [("command", "set either command (a program over stdio) or url (streamable HTTP), not both")]
        if self.url and (self.args or self.env or self.cwd):
            return [("url", "args, env and cwd are for a command; an HTTP server takes headers")]
        if self.command and self.headers:
            return [("headers", "headers are for a url; a command takes env")]
        return []

    def server_config(self) -> "McpServerConfig":
        from agent.tools.mcp import McpServerConfig

        return McpServerConfig(
            name=self.name,
            command=self.command,
            args=tuple(self.args),
            env={k: v.get_secret_value() for k, v in self.env.items()},
            cwd=self.cwd,
            url=self.url,
            headers={k: v.get_secret_value() for k, v in self.headers.items()},
            call_timeout=self.call_timeout,
            startup_timeout=self.startup_timeout,
            restart_max=self.restart_max,
        )


ToolRole = Literal["user", "admin", "owner", "off"]


def _least_role(value: Any) -> Any:
    """`allow: admin` or `allow: [admin, owner]`: the least role listed may use the tool
    (roles are a ladder: whoever is above a role may do what it may)."""
    if isinstance(value, (list, tuple)):
        order = ["user", "admin", "owner"]
        listed = [str(v).strip().lower() for v in value]
        unknown = [v for v in listed if v not in order]
        if unknown or not listed:
            raise ValueError(f"roles are user, admin, owner (or off), got {value!r}")
        return min(listed, key=order.index)
    return value.strip().lower() if isinstance(value, str) else value


class ToolRule(_Section):
    """Who may trigger a tool and whether someone must approve each use (`tools.policy`)."""

    allow: Annotated[ToolRole, BeforeValidator(_least_role)] | None = None
    approval: Literal["never", "always", "ask_once_per_chat"] | None = None


class ToolsSettings(_Section):
    """The tools the model may call (top-level `tools:`; `agent.tools` is read too, for old files)."""

    datetime: bool = True
    fetch_url: FetchUrlTool = Field(default_factory=dict)
    # Python modules whose module-level `Tool`s (functions decorated with @tool) are added.
    modules: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]] = Field(
        default_factory=list
    )
    # Tools from installed packages' `parley.tools` entry points.
    entry_points: bool = True
    mcp_servers: list[McpServerSettings] = Field(default_factory=list)
    # Per tool name or glob ("github__*"): `allow` (least role) and `approval`. Unlisted:
    # built-ins that read nothing private are for users, everything else for admins; no approval.
    policy: dict[str, ToolRule] = Field(default_factory=dict)
    # Seconds an approval waits for a press before it counts as "deny".
    approval_timeout: Seconds = 120.0

    def _cross_check(self) -> list[tuple[str, str]]:
        problems = []
        seen: set[str] = set()
        for i, server in enumerate(self.mcp_servers):
            if server.name in seen:
                problems.append((f"mcp_servers.{i}.name", f"{server.name!r} is used by another server"))
            seen.add(server.name)
        if len(set(self.modules)) != len(self.modules):
            problems.append(("modules", "a module is listed twice"))
        return problems


class HistorySettings(_Section):
    max_messages: int = Field(default=40, ge=1)
    max_tokens: int = Field(default=12_000, ge=1)


class AgentSettings(_Section):
    system_prompt: str = "You are a helpful assistant."
    max_steps: int = Field(default=8, ge=1)
    history: HistorySettings = Field(default_factory=dict)
    # auto: count token estimates with tiktoken for the OpenAI models it knows (loaded in
    # the background, from TIKTOKEN_CACHE_DIR or a download); off: characters / 4 for all
    # models, and tiktoken never touches the disk or the network (`agent.tokens`).
    tokenizer: Literal["auto", "off"] = "auto"
    # Where tools were configured before they got their own section: still read (into
    # `Settings.tools`) so older files keep working; setting both is an error.
    tools: ToolsSettings | None = Field(default=None, exclude=True)


class CoalesceWindow(_Section):
    """Seconds to wait for the rest of a message a platform may have split, per platform.

    Telegram clients split a paste over 4096 characters into several messages; parley
    waits this long after one that may be such a part (3000+ characters, or an album
    item) and answers the parts as one turn. Discord clients never split: over 2000
    characters they offer to send the text as a file. 0 or off: no waiting (albums are
    still merged). One number for every platform also works: `coalesce_window: 1.5`.
    """

    telegram: SecondsOrOff = 1.0
    discord: SecondsOrOff = 0.0

    @model_validator(mode="before")
    @classmethod
    def _one_for_all(cls, data: Any) -> Any:
        if data is None or isinstance(data, Mapping):
            return data or {}
        return {"telegram": data, "discord": data}

    def windows(self) -> dict[str, float]:
        return {"telegram": self.telegram, "discord": self.discord}


class ChatSettings(_Section):
    """Defaults for every chat; admins override some per chat (/model /system /mode /stream)."""

    busy_policy: Literal["queue", "interrupt"] = "queue"
    queue_max: int = Field(default=5, ge=0)
    streaming: bool = True
    pre_tool_text: Literal["hide", "keep"] = "hide"
    show_reasoning: bool = False
    sessions_per_user_in_groups: bool = False
    error_cooldown: float = Field(default=60.0, ge=0)
    max_redelivery_age: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=2, ge=1, le=10)
    # Groups: who may stop someone else's reply or reset the shared conversation
    # (a member may always stop their own turn). Per chat: /control.
    group_control: Literal["admins", "everyone"] = "admins"
    # Budgets: what a turn reserves for the answer when provider.extra_params sets no
    # max_tokens / max_completion_tokens / max_output_tokens, and how long a reservation
    # counts at most (a process that died mid-turn must not block its user).
    reserve_completion_tokens: int = Field(default=1024, ge=0)
    budget_hold_ttl: Seconds = 3600.0
    # Seconds without anything new in a reply (model thinking, provider slow) before its live
    # message shows "still working…"; 0 or off: never.
    still_working_after: SecondsOrOff = 15.0
    # Split messages become one turn (see CoalesceWindow).
    coalesce_window: CoalesceWindow = Field(default_factory=dict)
    # Who picks the model (/model, its buttons): per_user -- each person for themselves in
    # that chat; per_chat -- anyone, for the whole chat; admins_only -- admins, for the
    # whole chat; auto -- per_user in private chats, admins_only in groups.
    model_choice: Literal["auto", "per_user", "per_chat", "admins_only"] = "auto"
    # When another model answered because the chosen one failed, say which, in small print.
    show_fallback_model: bool = True


MB = 1_000_000


class TranscriptionSettings(_Section):
    """Where voice notes are transcribed: the provider's endpoint unless `base_url` is set."""

    base_url: HttpUrl | None = None
    api_key: OptionalSecret = None
    timeout: Seconds = 60.0

    @property
    def is_openai(self) -> bool:
        return self.base_url is not None and (urlsplit(self.base_url).hostname or "").lower() in OPENAI_HOSTS

    def _cross_check(self) -> list[tuple[str, str]]:
        if self.base_url is None and self.api_key is not None:
            return [("api_key", "is only used with transcription.base_url (without it, the provider's key is used)")]
        if self.api_key is None and self.is_openai:
            var = self._unset_env.get("api_key")
            why = f"environment variable {var} is not set" if var else "is empty"
            return [("api_key", f"{why}; {self.base_url} requires an API key")]
        return []


class MediaSettings(_Section):
    """What parley does with photos, voice notes and files people send (`bots.media_input`).

    Every limit bounds work a stranger can cause: bytes downloaded, images sent to a paid
    model, characters of a document put into the prompt.
    """

    images: bool = True
    max_images: int = Field(default=4, ge=1, le=20)
    max_image_bytes: int = Field(default=10 * MB, ge=1)
    max_download_bytes: int = Field(default=20 * MB, ge=1)
    download_timeout: Seconds = 30.0
    transcription_model: str = Field(default="whisper-1", min_length=1)
    transcription: TranscriptionSettings = Field(default_factory=dict)
    show_transcript: bool = True
    max_document_chars: int = Field(default=20_000, ge=100)
    replay_images: bool = False

    def options(self) -> MediaOptions:
        """These settings as the gateway's `bots.media_input.MediaOptions`."""
        from bots.media_input import MediaOptions

        return MediaOptions(
            images=self.images,
            max_images=self.max_images,
            max_image_bytes=self.max_image_bytes,
            max_download_bytes=self.max_download_bytes,
            download_timeout=self.download_timeout,
            show_transcript=self.show_transcript,
            max_document_chars=self.max_document_chars,
            replay_images=self.replay_images,
        )

    def transcription_config(self, provider: ProviderSettings) -> TranscriptionConfig:
        """The agent's `TranscriptionConfig`: the provider's client unless `transcription.base_url`."""
        from agent.media import TranscriptionConfig

        t = self.transcription
        if t.base_url is None:
            return TranscriptionConfig(model=self.transcription_model, timeout=t.timeout, max_retries=provider.max_retries)
        return TranscriptionConfig(
            model=self.transcription_model,
            base_url=t.base_url,
            api_key=t.api_key.get_secret_value() if t.api_key is not None else NO_API_KEY,
            timeout=t.timeout,
            max_retries=provider.max_retries,
        )


class WebhookSettings(_Section):
    url: HttpUrl | None = None
    listen: ListenAddr = Listen("127.0.0.1", 8443)
    path: str = "/telegram"
    secret_token: OptionalSecret = Field(default=f"{ENV_REF}TELEGRAM_WEBHOOK_SECRET")

    def _cross_check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.path.startswith("/"):
            problems.append(("path", f"must start with '/', got {self.path!r}"))
        if self.secret_token is not None and not _WEBHOOK_SECRET.fullmatch(self.secret_token.get_secret_value()):
            problems.append(("secret_token", "must be 1-256 characters of A-Z, a-z, 0-9, _ and - (Telegram's rule)"))
        return problems


class TelegramPacing(PacingSettings):
    """Telegram: ~1 message/s per private chat, 20/min per group, ~30/s per bot (docs)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "private": {"rate": 1.0, "burst": 2},
        "group": {"rate": 0.3, "burst": 2},
        "global": {"rate": 25.0, "burst": 25},
    }


class DiscordPacing(PacingSettings):
    """Discord: 5 messages per 5 s per channel (DMs and guild channels alike), 50/s per bot."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "private": {"rate": 0.9, "burst": 3},
        "group": {"rate": 0.9, "burst": 3},
        "global": {"rate": 40.0, "burst": 40},
    }


class TelegramSettings(_Section):
    token: OptionalSecret = Field(default=f"{ENV_REF}TELEGRAM_BOT_TOKEN")
    api_base: HttpUrl = "https://api.telegram.org"
    mode: Literal["polling", "webhook"] = "polling"
    webhook: WebhookSettings = Field(default_factory=dict)
    drafts: bool = False
    group_trigger: Literal["mention", "all"] = "mention"
    group_triggers: dict[str, Literal["mention", "all"]] = Field(default_factory=dict)
    pacing: TelegramPacing = Field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """A platform without a token is not started."""
        return self.token is not None

    @property
    def uses_cloud_api(self) -> bool:
        """True for Telegram's own servers (not a local Bot API server or a fake)."""
        return (urlsplit(self.api_base).hostname or "").lower() in TELEGRAM_CLOUD_HOSTS

    @property
    def bot_base_url(self) -> str:
        """PTB's `base_url`: PTB appends the token, giving `<api_base>/bot<token>/<method>`."""
        return f"{self.api_base}/bot"

    @property
    def file_base_url(self) -> str:
        """PTB's `base_file_url`: PTB does not derive it from `base_url`, so set both."""
        return f"{self.api_base}/file/bot"

    def _cross_check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.api_base.endswith("/bot"):
            problems.append(("api_base", "drop the trailing /bot: parley appends /bot<token> itself"))
        if self.mode == "webhook":
            if self.webhook.url is None:
                problems.append(
                    ("webhook.url", "required when telegram.mode is webhook (the public URL Telegram posts to)")
                )
            elif urlsplit(self.webhook.url).scheme != "https" and self.uses_cloud_api:
                problems.append(("webhook.url", "Telegram's cloud API only delivers webhooks to https URLs"))
            if self.enabled and self.webhook.secret_token is None:
                var = self.webhook.unset_env.get("secret_token")
                why = f" (environment variable {var} is not set)" if var else ""
                problems.append(
                    (
                        "webhook.secret_token",
                        f"required when telegram.mode is webhook, so forged updates are rejected{why}",
                    )
                )
        return problems


class DiscordSettings(_Section):
    token: OptionalSecret = Field(default=f"{ENV_REF}DISCORD_BOT_TOKEN")
    api_base: HttpUrl = "https://discord.com/api/v10"
    gateway_url: WsUrl = "wss://gateway.discord.gg/"
    command_prefix: str = Field(default="!", min_length=1)
    slash_commands: bool = True
    group_trigger: Literal["mention", "all"] = "mention"
    group_triggers: dict[str, Literal["mention", "all"]] = Field(default_factory=dict)
    max_ratelimit_timeout: float = Field(default=30.0, ge=1)
    pacing: DiscordPacing = Field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """A platform without a token is not started."""
        return self.token is not None


def _user_rate(value: Any) -> str | None:
    """`access.user_rate`, checked by the parser the gateway uses (`limits`); "off" (YAML: false) is None."""
    from bots.inbound_rate import parse_rate

    return None if parse_rate(value) is None else str(value).strip()


class AccessSettings(_Section):
    """Who may talk to the bot. Deny by default: with no owners, nobody but allowed chats."""

    owners: Annotated[list[Annotated[str, BeforeValidator(_owner)]], NoDecode, BeforeValidator(_split_list)] = Field(
        default_factory=list
    )
    allow_everyone: bool = False
    allowed_chats: Annotated[list[Annotated[str, BeforeValidator(_chat)]], NoDecode, BeforeValidator(_split_list)] = (
        Field(default_factory=list)
    )
    # Messages that start turns, per person, e.g. "20/minute" or "5 per 10 seconds"
    # (bots.inbound_rate.DEFAULT_USER_RATE); "off" disables. Owners are exempt and
    # commands are not counted, so /stop always works.
    user_rate: Annotated[str | None, BeforeValidator(_user_rate)] = "20/minute"

    def is_owner(self, platform: str, user_id: str | int) -> bool:
        return f"{platform}:{user_id}" in self.owners

    def policy(self) -> AccessPolicy:
        """This section as the `bots.access.AccessPolicy` the gateway checks against."""
        from bots.access import AccessPolicy

        return AccessPolicy(
            owners=frozenset(self.owners),
            allow_everyone=self.allow_everyone,
            allowed_chats=frozenset(self.allowed_chats),
        )


class MetricsSettings(_Section):
    listen: Annotated[ListenAddr | None, NoDecode, BeforeValidator(Listen.parse)] = None

    @property
    def enabled(self) -> bool:
        return self.listen is not None


class HealthSettings(_Section):
    """When a platform that keeps failing makes parley "not ready" (`/readyz` answers 503)."""

    # Seconds of uninterrupted failure (getUpdates erroring, the Discord Gateway away)
    # before /readyz says so. Short blips heal by themselves and should not page anyone;
    # a platform that merely sends nothing is never a failure.
    unready_after: Seconds = 30.0


class ClusterSettings(_Section):
    """Several replicas of `parley run` sharing one PostgreSQL store and one Redis (`bots.cluster`).

    Off by default: one process with its SQLite file is the whole deployment. On, every
    replica runs the same `parley run` and the same configuration; a conversation's
    messages are queued in PostgreSQL (procrastinate jobs locked per conversation) and the
    platforms' rate budgets are shared through Redis.
    """

    enabled: bool = False
    # Where the replicas share their outbound budgets (`limits`' Redis storage), e.g.
    # redis://127.0.0.1:6379/0 or env:REDIS_URL. Required when enabled.
    redis_url: OptionalSecret = None
    # This replica's name in logs, /status and /readyz; default: <hostname>-<pid>.
    replica_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] | None = None
    # Seconds after which a replica that stopped sending heartbeats (killed, frozen, cut
    # off) is taken for dead: its conversations move to another replica.
    lease_timeout: Annotated[float, Field(ge=3)] = 30.0
    # Conversations this replica runs at once (its procrastinate worker's concurrency);
    # more wait in the queue for any replica.
    concurrency: int = Field(default=500, ge=1, le=10_000)

    def _cross_check(self) -> list[tuple[str, str]]:
        if self.enabled and self.redis_url is None:
            return [
                (
                    "redis_url",
                    "required when cluster.enabled is true: the replicas share the platforms' rate budgets through "
                    "Redis (e.g. redis://127.0.0.1:6379/0)",
                )
            ]
        return []


class LoggingSettings(_Section):
    level: LogLevel = "INFO"
    format: Literal["text", "json"] = "text"
    loggers: dict[str, LogLevel] = Field(default_factory=dict)


# --------------------------------------------------------------------------- sources


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of `os.environ`.

    Used twice: for the process environment (or `load_config(env=...)`) and for the
    `.env` file, so both follow exactly the same `PARLEY_` / `__` rules.
    """

    def __init__(self, settings_cls: type[BaseSettings], mapping: Mapping[str, str]) -> None:
        self._mapping = mapping
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._mapping.items() if v != ""}


class _YamlSource(PydanticBaseSettingsSource):
    """The parsed YAML file, handed over as-is so unknown top-level keys are reported."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The YAML file as a mapping, or `ConfigProblems` saying exactly what is wrong with it."""
    key = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigProblems([Problem(key, "config file not found")], source=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigProblems([Problem(key, f"cannot read the config file: {exc}")], source=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigProblems([Problem(key, f"malformed YAML{where}: {detail}")], source=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigProblems(
            [Problem(key, f"the file must be a mapping of keys (like `provider:`), not a {type(data).__name__}")],
            source=path,
        )
    return data


def find_config_file(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """The YAML file to read: `path`, else `$PARLEY_CONFIG`, else `./parley.yaml` if present."""
    if path is not None and str(path) != "":
        return Path(path)
    from_env = environ.get(CONFIG_ENV_VAR, "").strip()
    if from_env:
        return Path(from_env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


# --------------------------------------------------------------------------- settings


class Settings(BaseSettings):
    """Everything parley needs to run. Build it with `load_config()`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,
    )

    provider: ProviderSettings = Field(default_factory=dict)
    agent: AgentSettings = Field(default_factory=dict)
    chat: ChatSettings = Field(default_factory=dict)
    telegram: TelegramSettings = Field(default_factory=dict)
    discord: DiscordSettings = Field(default_factory=dict)
    access: AccessSettings = Field(default_factory=dict)
    media: MediaSettings = Field(default_factory=dict)
    tools: ToolsSettings = Field(default_factory=dict)
    # Several providers (the long form): named endpoints, the models people may pick (the
    # first is the default), fallback chains and the circuit breaker (`agent.providers`).
    providers: dict[str, EndpointSettings] = Field(default_factory=dict)
    models: list[ModelSettings] = Field(default_factory=list)
    fallback: StrList = Field(default_factory=list)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown: Seconds = 60.0
    store: StoreUrl = Field(default_factory=lambda: StoreUrl("sqlite:///data/parley.db"))
    metrics: MetricsSettings = Field(default_factory=dict)
    health: HealthSettings = Field(default_factory=dict)
    logging: LoggingSettings = Field(default_factory=dict)
    shutdown_timeout: Seconds = 20.0
    cluster: ClusterSettings = Field(default_factory=dict)

    _config_file: Path | None = PrivateAttr(default=None)

    def __init__(self, **values: Any) -> None:
        # A bare `Settings()` behaves like `load_config()` minus the error formatting.
        if _LOAD.get() is None:
            with _loading(_default_options(with_yaml=True)):
                super().__init__(**values)
        else:
            super().__init__(**values)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        opts = _options()
        return (
            init_settings,
            _MappingEnvSource(settings_cls, {k: v for k, v in opts.environ.items() if k not in opts.unknown}),
            _MappingEnvSource(settings_cls, {k: v for k, v in opts.dotenv.items() if k not in opts.unknown}),
            _YamlSource(settings_cls, opts.yaml_data),
        )

    @model_validator(mode="wrap")
    @classmethod
    def _note_long_form(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        """While validating, tell the `provider` section whether `providers` replaces it (its
        default OpenAI key is then not needed)."""
        token = _LONG_FORM.set(bool(isinstance(data, Mapping) and data.get("providers")))
        try:
            return handler(data)
        finally:
            _LONG_FORM.reset(token)

    @model_validator(mode="after")
    def _check_models(self) -> "Settings":
        """The providers and models fit together: one form or the other, every model served
        by a named provider, every fallback a known model, no cycles; keys where needed."""
        problems: list[tuple[str, str]] = []
        if self.providers:
            if self.provider.model_fields_set:  # keys of the short form, not just an empty section
                problems.append(("provider", "set either provider (one provider) or providers + models, not both"))
            if not self.models:
                problems.append(("models", "list the models the providers serve, each with a name and a provider"))
            names = list(self.providers)
            for i, model in enumerate(self.models):
                if model.provider is None:
                    if len(names) == 1:
                        model.provider = names[0]
                    else:
                        problems.append((f"models.{i}.provider", f"name its provider (one of {', '.join(names)})"))
                elif model.provider not in self.providers:
                    problems.append(
                        (f"models.{i}.provider", f"no provider named {model.provider!r} (providers: {', '.join(names)})")
                    )
        elif self.models:
            problems.append(("models", "models go with providers; a single provider lists them in provider.models"))
        seen: dict[str, int] = {}
        for i, model in enumerate(self.models):
            if model.name in seen:
                problems.append((f"models.{i}.name", f"{model.name!r} is listed twice"))
            seen.setdefault(model.name, i)
        names = self.model_names()
        for j, name in enumerate(self.fallback):
            if name not in names:
                problems.append((f"fallback.{j}", f"unknown model {name!r} (models: {', '.join(names)})"))
        for i, model in enumerate(self.models):
            for j, name in enumerate(model.fallback):
                if name not in names:
                    problems.append((f"models.{i}.fallback.{j}", f"unknown model {name!r}"))
        if not problems:
            from agent.providers import chain_problems

            for problem in chain_problems(self.model_specs(), []):
                where, _, what = problem.partition(": ")
                name = where.removeprefix("models.").removesuffix(".fallback")
                problems.append((f"models.{seen.get(name, 0)}.fallback", what))
        if problems:
            raise _SectionProblems(problems)
        return self

    def model_names(self) -> list[str]:
        """What people may pick with /model, the default first."""
        if self.providers:
            return [m.name for m in self.models]
        return self.provider.allowed_models

    def model_specs(self) -> list[ModelSpec]:
        from agent.providers import ModelSpec

        if not self.providers:
            return [ModelSpec(name, "default") for name in self.provider.allowed_models]
        return [
            ModelSpec(
                m.name, m.provider or "", id=m.id or m.name, display_name=m.display_name or "", images=m.images,
                tools=m.tools, reasoning=m.reasoning, fallback=tuple(m.fallback),
            )
            for m in self.models
        ]

    def catalogue(self) -> Catalogue:
        """The agent's `Catalogue`: the providers, the models, the chains and the breaker."""
        from agent.providers import Catalogue

        specs = self.model_specs()
        if not self.providers:
            configs = {"default": self.provider.agent_config()}
        else:
            configs = {}
            for name, endpoint in self.providers.items():
                served = [s.id for s in specs if s.provider == name]
                configs[name] = endpoint.agent_config(served[0] if served else name)
        return Catalogue(
            configs, tuple(specs), default=specs[0].name, fallback=tuple(self.fallback),
            breaker_failures=self.breaker_failures, breaker_cooldown=self.breaker_cooldown,
        )

    def prices(self) -> dict[str, tuple[float, float]]:
        """$ per 1M tokens (prompt, completion) by model: `provider.prices`, then `models[].price`."""
        prices = {name: (p.prompt, p.completion) for name, p in self.provider.prices.items()}
        for model in self.models:
            if model.price is not None:
                prices[model.name] = prices[model.id or model.name] = (model.price.prompt, model.price.completion)
        return prices

    @model_validator(mode="after")
    def _check_cluster(self) -> "Settings":
        """Cluster mode needs a store every replica reaches: PostgreSQL, never a SQLite file."""
        if self.cluster.enabled and self.store.kind == "sqlite":
            raise _SectionProblems(
                [
                    (
                        "cluster.enabled",
                        "needs a PostgreSQL store (store: postgresql://...): the replicas share their message queue, "
                        "locks and history through it, and a SQLite file belongs to one process",
                    )
                ]
            )
        return self

    @model_validator(mode="after")
    def _tools_from_agent_section(self) -> "Settings":
        """Files written before `tools:` was a section of its own set `agent.tools`: read it."""
        old = self.agent.tools
        if old is not None:
            if "tools" in self.model_fields_set:
                raise ValueError("agent.tools: tools are configured under tools: now; move these keys there")
            self.tools = old
            self.agent.tools = None
        return self

    @property
    def config_file(self) -> Path | None:
        """The YAML file these settings were read from, if any."""
        return self._config_file

    def enabled_platforms(self) -> list[str]:
        """The platforms with a token, in a stable order: the ones `parley run` starts."""
        return [name for name in PLATFORMS if getattr(self, name).enabled]

    def secrets(self) -> list[str]:
        """Every secret value in these settings, for the log redactor (longest first)."""
        values: list[str] = []
        for secret in (
            self.provider.api_key,
            self.media.transcription.api_key,
            self.telegram.token,
            self.telegram.webhook.secret_token,
            self.discord.token,
            self.cluster.redis_url,
        ):
            if secret is not None:
                values.append(secret.get_secret_value())
        if self.telegram.token is not None:
            # "<bot id>:<secret>": the bot id is public (it is the bot's user id), the part
            # after the colon is the credential, wherever it shows up on its own.
            _, _, secret_part = self.telegram.token.get_secret_value().partition(":")
            if len(secret_part) >= 8:
                values.append(secret_part)
        from agent.tools.mcp import secret_values

        headers = [h for e in (self.provider, *self.providers.values()) for h in e.headers.values()]
        for endpoint in self.providers.values():
            if endpoint.api_key is not None:
                values.append(endpoint.api_key.get_secret_value())
        for secret in headers:
            text = secret.get_secret_value()
            values.extend(v for v in (text, *text.split()) if len(v) >= 8)  # "Bearer <token>": the token alone too
        # MCP servers: env and header values, the credential after "Bearer ", URL userinfo and query
        values.extend(secret_values(server.server_config() for server in self.tools.mcp_servers))
        if self.cluster.redis_url is not None:
            redis_password = urlsplit(self.cluster.redis_url.get_secret_value()).password
            if redis_password:
                values.extend((redis_password, quote(redis_password, safe="")))
        password = self.store.password
        if password:
            values.append(password)
            values.append(quote(password, safe=""))  # how it appears inside the URL
        return sorted(set(values), key=len, reverse=True)


# --------------------------------------------------------------------------- load_config


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = DEFAULT_ENV_FILE,
) -> Settings:
    """Read, merge and validate the configuration; raise `ConfigProblems` listing every problem.

    `path` is the CLI's `--config`; without it `PARLEY_CONFIG`, then `./parley.yaml`, are
    tried, and no file at all is fine. `env` replaces `os.environ` (tests, embedding);
    `env_file` is the `.env` file to read (relative to the working directory; None: none).
    Nothing here opens a network connection.
    """
    environ = {k: v for k, v in (os.environ if env is None else env).items() if isinstance(v, str)}
    dotenv = _read_dotenv(Path(env_file)) if env_file is not None else {}
    yaml_path = find_config_file(path, {**dotenv, **environ})
    yaml_data = _read_yaml(yaml_path) if yaml_path is not None else {}
    referenced = _env_refs([yaml_data, environ, dotenv])
    problems: list[Problem] = []
    unknown: set[str] = set()
    for mapping, where in ((environ, "environment variable"), (dotenv, f"{env_file} variable")):
        for var, problem in _unknown_env_vars(mapping, where, referenced):
            problems.append(problem)
            unknown.add(var)
    opts = _LoadOptions(environ, dotenv, yaml_data, yaml_path, unknown=frozenset(unknown))

    settings: Settings | None = None
    with _loading(opts):
        try:
            settings = Settings()
        except ValidationError as exc:
            problems.extend(_problems_from_validation(exc, opts))
        except SettingsError as exc:
            problems.extend(_problems_from_settings_error(exc, opts))
    if problems or settings is None:
        raise ConfigProblems(problems, source=yaml_path)
    settings._config_file = yaml_path
    return settings


def _env_refs(sources: Sequence[Any]) -> frozenset[str]:
    """Every variable an `env:NAME` value names, upper-cased (`env:PARLEY_TG_TOKEN` is in use)."""
    found: set[str] = set()
    stack = list(sources)
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            name = env_ref(item)
            if name:
                found.add(name.upper())
    return frozenset(found)


def _unknown_env_vars(
    mapping: Mapping[str, str], where: str, referenced: frozenset[str]
) -> list[tuple[str, Problem]]:
    """Every `PARLEY_*` variable in `mapping` that sets nothing: (variable, problem).

    pydantic-settings drops a variable whose first level names no setting
    (`PARLEY_PROVIDR__MODEL`, `PARLEY_TELEGRAM_TOKEN`) or that nests under a plain value
    (`PARLEY_STORE__URL`) without a word, while the same mistake in YAML is an error. So
    each name is walked through the settings here and reported like a YAML key:
    `key.path: unknown key (did you mean 'x'?) [set by environment variable PARLEY_...]`.
    Exempt: parley's own non-setting variables (`NON_SETTING_ENV_VARS`), variables an
    `env:NAME` value reads, and anything below a mapping-valued setting
    (`provider.extra_params`, `telegram.group_triggers`...), whose keys are the operator's.
    """
    found = []
    for var in mapping:
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTING_ENV_VARS or upper in referenced:
            continue
        path = upper[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        wrong = _unknown_env_path(path)
        if wrong is None:
            continue
        key, message = wrong
        fixed = _single_underscore_fix(path)
        if fixed is not None:
            key, message = fixed
            found.append((var, Problem(key, f"{where} {var} is ignored: {message}")))
            continue
        if key and "did you mean" not in message:
            close = difflib.get_close_matches(upper, _setting_env_names(), n=1, cutoff=0.75)
            message += f" (did you mean {close[0]}?)" if close else ""
        found.append((var, Problem(key or var, f"{message} [set by {where} {var}]")))
    return found


def _setting_env_names(model: type[BaseModel] | None = None, prefix: str = ENV_PREFIX) -> list[str]:
    """The variable name of every setting and section, e.g. `PARLEY_LOGGING__LEVEL`."""
    names = []
    for name, info in (model or Settings).model_fields.items():
        var = prefix + (info.alias or name).upper()
        names.append(var)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(_setting_env_names(annotation, var + ENV_DELIMITER))
    return names


def _unknown_env_path(path: Sequence[str]) -> tuple[str, str] | None:
    """Where the settings path `path` leaves the settings: (key, message), or None if it is one."""
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        here = list(path[: i + 1])
        fields = {(info.alias or name): info for name, info in model.model_fields.items()}
        info = fields.get(part)
        if info is None:
            return ".".join(here), "unknown key" + _did_you_mean(here)
        if i == len(path) - 1:
            return None
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif get_origin(annotation) is dict:
            return None  # the operator's own keys; pydantic checks the values
        else:
            return ".".join(path[: i + 2]), f"unknown key: {'.'.join(here)} is a value, it has no keys"
    return None


def _single_underscore_fix(path: Sequence[str]) -> tuple[str, str] | None:
    """`PARLEY_TELEGRAM_TOKEN` meant `PARLEY_TELEGRAM__TOKEN`: (key, message), when that is a setting."""
    head = path[0]
    for section, info in Settings.model_fields.items():
        annotation = info.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        if head.startswith(section + "_"):
            meant = [section, head[len(section) + 1 :], *path[1:]]
            if _unknown_env_path(meant) is None:
                fixed = ENV_PREFIX + ENV_DELIMITER.join(meant).upper()
                return ".".join(meant), f"nesting uses two underscores, {fixed}"
    return None


def _loc_to_key(loc: Sequence[str | int]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The settings model that owns the key at `loc` (for "did you mean" hints)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            return None
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        info = fields.get(part)
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(loc: Sequence[str | int]) -> str:
    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return ""
    names = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1].lower(), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_SECRET_KEYS = frozenset({"token", "api_key", "secret_token", "store"})


def _env_var_for(loc: Sequence[str | int], opts: _LoadOptions) -> str | None:
    """Which environment/`.env` variable set the value at `loc`, if one did."""
    if any(isinstance(part, int) for part in loc):
        return None
    wanted = (ENV_PREFIX + ENV_DELIMITER.join(str(p) for p in loc)).upper()
    for label, mapping in (("environment variable", opts.environ), (".env variable", opts.dotenv)):
        for var in mapping:
            if var.upper() == wanted:
                return f"{label} {var}"
    return None


def _problems_from_validation(exc: ValidationError, opts: _LoadOptions) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _SectionProblems):
            for rel, message in cause.problems:
                parts = (int(part) if part.isdigit() else part for part in rel.split("."))
                problems.append(Problem(_loc_to_key((*loc, *parts)), message))
            continue
        key = _loc_to_key(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif kind == "value_error" and cause is not None:
            message = str(cause)
        elif kind == "model_type":
            message = "must be a mapping of keys"
        else:
            message = err["msg"]
            value = err.get("input")
            secret = any(str(part) in _SECRET_KEYS for part in loc)
            if not secret and isinstance(value, (str, int, float, bool)) and kind != "missing":
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                message += f" (got {shown})"
        source = _env_var_for(loc, opts)
        if source:
            message += f" [set by {source}]"
        problems.append(Problem(key, message))
    return problems


def _wants_json(path: Sequence[str]) -> bool:
    """Whether the key at `path` is a mapping or a section, which the environment gives as JSON."""
    model = _model_at(path[:-1])
    if model is None:
        return False
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    info = fields.get(path[-1])
    if info is None:
        return False
    annotation = info.annotation
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return is_model or getattr(annotation, "__origin__", None) is dict


def _problems_from_settings_error(exc: SettingsError, opts: _LoadOptions) -> list[Problem]:
    """pydantic-settings gives up on a mapping/list variable that is not JSON; name which one."""
    match = re.search(r'field "([^"]+)"', str(exc))
    section = match.group(1) if match else ""
    head = f"{ENV_PREFIX}{section}".upper()
    problems = []
    for label, mapping in (("environment variable", opts.environ), (".env variable", opts.dotenv)):
        for var, value in mapping.items():
            upper = var.upper()
            if section and (upper == head or upper.startswith(head + ENV_DELIMITER)):
                path = upper[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
                if not _wants_json(path):
                    continue
                try:
                    json.loads(value)
                except ValueError:
                    key = ".".join(path)
                    problems.append(
                        Problem(key, f"{label} {var} must be JSON here, e.g. '{{\"temperature\": 0.2}}'")
                    )
    return problems or [Problem(section or "environment", f"cannot read the environment: {exc}")]
