"""Static checks of the deployment files: Compose, Dockerfile, .env.example, the systemd unit.

Docker cannot run on the test machine, so nothing here builds an image or starts a
container; these tests hold the files to what the README promises and to what parley's
own configuration accepts.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bots.config import ConfigProblems, Settings, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHUTDOWN_TIMEOUT = Settings.model_fields["shutdown_timeout"].default


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def env_example() -> list[tuple[str, str, bool]]:
    """(name, value, commented out) for every assignment in .env.example."""
    out = []
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            out.append((match.group(2), match.group(3), bool(match.group(1))))
    return out


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", str(text).strip())
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


# --------------------------------------------------------------------------- compose


def test_compose_has_the_gateway_and_the_two_optional_profiles() -> None:
    services = compose()["services"]
    assert set(services) == {"parley", "postgres", "ollama"}
    assert "profiles" not in services["parley"], "the gateway starts with a plain `docker compose up`"
    assert services["postgres"]["profiles"] == ["postgres"]
    assert services["ollama"]["profiles"] == ["local-llm"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["ollama"]["image"].startswith("ollama/ollama")


def test_compose_gateway_is_env_driven_keeps_state_and_stops_gracefully() -> None:
    doc = compose()
    parley = doc["services"]["parley"]
    assert parley["build"] == "." and parley["env_file"] == ".env"
    assert "parley-data:/data" in parley["volumes"] and "parley-data" in doc["volumes"]
    # Health and metrics published on loopback only.
    assert all(port.startswith("127.0.0.1:") for port in parley["ports"])
    assert parley["environment"]["PARLEY_METRICS__LISTEN"].endswith(":9464")
    # Postgres is waited for only when its profile is on.
    assert parley["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}
    # Docker must wait longer than parley's own shutdown before it kills.
    assert seconds(parley["stop_grace_period"]) >= DEFAULT_SHUTDOWN_TIMEOUT + 15
    # Healthy means ready: the platforms work and the store answers (not merely "the process is up").
    check = " ".join(parley["healthcheck"]["test"])
    assert "127.0.0.1:9464/readyz" in check and "/healthz" not in check


def test_every_variable_compose_interpolates_is_documented_in_env_example() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    used = {m.group(1) for m in re.finditer(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text)}
    documented = {name for name, _, _ in env_example()}
    assert used, "compose reads its settings from .env"
    assert used - documented - {"POSTGRES_USER", "POSTGRES_DB"} == set()


# --------------------------------------------------------------------------- .env.example


def test_env_example_filled_in_is_a_valid_configuration(tmp_path: Path) -> None:
    lines = []
    for name, value, commented in env_example():
        if commented:
            continue
        stand_ins = {"TELEGRAM_BOT_TOKEN": "123456:abcdef", "DISCORD_BOT_TOKEN": "x.y.z",
                     "PARLEY_ACCESS__OWNERS": "telegram:123456789"}
        filled = stand_ins.get(name, "secret-value") if not value or "your-" in value else value
        lines.append(f"{name}={filled}")
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    settings = load_config(None, env={}, env_file=tmp_path / ".env")
    assert settings.enabled_platforms() == ["telegram", "discord"]
    assert settings.access.owners == ["telegram:123456789"]


def test_env_example_unfilled_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text())
    with pytest.raises(ConfigProblems) as exc:
        load_config(None, env={}, env_file=tmp_path / ".env")
    # The owner is a placeholder, not an example id that would make a stranger the owner.
    assert sorted(p.key for p in exc.value.problems) == ["access.owners[0]", "provider.api_key"]


@pytest.mark.parametrize("name", sorted({n for n, _, c in env_example() if c and n.startswith("PARLEY_")}))
def test_every_commented_parley_variable_in_env_example_is_a_real_setting(name: str, tmp_path: Path) -> None:
    value = next(v for n, v, c in env_example() if n == name and c)
    env = {"OPENAI_API_KEY": "secret-value", name: value}
    settings = load_config(None, env=env, env_file=None)
    assert isinstance(settings, Settings)


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_slim_base_non_root_user_data_volume_and_parley_entrypoint() -> None:
    text = (REPO / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    bases = [args for op, args in instructions if op == "FROM"]
    assert bases and all(re.match(r"python:3\.1[1-9]-slim\b", b) for b in bases), bases
    users = [args.strip() for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final image must not run as root"
    assert 'VOLUME ["/data"]' in text
    assert "PARLEY_STORE=sqlite:////data/parley.db" in text  # the database lives in the volume
    assert 'ENTRYPOINT ["parley"]' in text and 'CMD ["run"]' in text  # exec form: parley is PID 1, gets SIGTERM
    # Readiness, not liveness: a process whose platform keeps failing is unhealthy.
    assert "HEALTHCHECK" in text and "/readyz" in text and "/healthz" not in text
    # Everything the image copies exists (a renamed directory would break the build).
    for op, args in instructions:
        if op == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"


# --------------------------------------------------------------------------- systemd


def test_systemd_unit_runs_parley_as_its_own_user_and_outlasts_the_shutdown() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((REPO / "deploy" / "parley.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    program, *args = service["ExecStart"].split()
    assert (Path(program).name, args) == ("parley", ["run"])
    assert service["User"] not in ("root", "0")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= DEFAULT_SHUTDOWN_TIMEOUT + 15
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # an invalid config is not retried
    assert service["EnvironmentFile"].startswith("/etc/parley/")  # secrets outside the unit
    assert service["ReadWritePaths"] == service["WorkingDirectory"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
