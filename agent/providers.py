"""Several providers, the models they serve, fallback chains and a circuit breaker.

An operator names providers (an endpoint, a key, an API style) and the models people may
pick, each served by one provider under its own id, with what it can do (images, tools,
reasoning). When a model call fails in a way another provider can fix -- unreachable,
timed out, 5xx, 429, overloaded, a bad key, a garbled answer, or "this model cannot see
images" -- the same step is tried on the next model of the chain, before any of it is
final in the chat; a failure that another model would repeat (a bad request, a refusal,
a context that is too long) is not retried elsewhere.

The chain of a chosen model is itself, then its own `fallback` models (each followed by
theirs, depth first), then the global `fallback`, each model once. A model that failed
`breaker_failures` times in a row is skipped for `breaker_cooldown` seconds; then one call
probes it (success closes the breaker, failure opens it again). Streaming health stays
per provider and model (`agent.provider.StreamHealth`), as does usage (booked to the model
that answered).

The single-provider configuration is the same thing with one provider and its models
(`Catalogue.single`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import ProviderConfig
from .errors import (
    ProviderAuthError,
    ProviderBadResponse,
    ProviderError,
    ProviderNoVision,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)

__all__ = ["Breaker", "Catalogue", "ModelSpec", "can_fail_over"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model an operator offers: what people pick (`name`), who serves it, what it can do."""

    name: str  # what /model shows and accepts, and what usage is booked to
    provider: str  # the provider's name in `Catalogue.providers`
    id: str = ""  # the provider's model id (default: `name`)
    display_name: str = ""
    images: bool = True
    tools: bool = True
    reasoning: bool = False
    fallback: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model needs a name")
        if not self.id:
            object.__setattr__(self, "id", self.name)

    @property
    def label(self) -> str:
        """How a chat names it."""
        return self.display_name or self.name


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Providers, the models offered, the default model, the global fallback and the breaker."""

    providers: dict[str, ProviderConfig]
    models: tuple[ModelSpec, ...]
    default: str = ""  # a model name; default: the first model
    fallback: tuple[str, ...] = ()
    breaker_failures: int = 3
    breaker_cooldown: float = 60.0
    _by_name: dict[str, ModelSpec] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a catalogue needs at least one model")
        by_name: dict[str, ModelSpec] = {}
        for spec in self.models:
            if spec.name in by_name:
                raise ValueError(f"model {spec.name!r} is listed twice")
            if spec.provider not in self.providers:
                raise ValueError(f"model {spec.name!r}: no provider named {spec.provider!r}")
            by_name[spec.name] = spec
        object.__setattr__(self, "_by_name", by_name)
        if not self.default:
            object.__setattr__(self, "default", self.models[0].name)
        problems = chain_problems(self.models, self.fallback)
        if self.default not in by_name:
            problems.append(f"default model {self.default!r} is not listed")
        if problems:
            raise ValueError("; ".join(problems))
        if self.breaker_failures < 1:
            raise ValueError("breaker_failures must be >= 1")
        if self.breaker_cooldown < 0:
            raise ValueError("breaker_cooldown must be >= 0")

    @classmethod
    def single(cls, cfg: ProviderConfig, models: Iterable[str] = ()) -> Catalogue:
        """One provider serving `cfg.model` (the default) and `models` (the old `provider:`)."""
        names = list(dict.fromkeys([cfg.model, *models]))
        return cls({"default": cfg}, tuple(ModelSpec(n, "default") for n in names), default=cfg.model)

    def get(self, name: str) -> ModelSpec | None:
        """The model called `name` -- or, failing that, whose display name is `name` (any case)."""
        found = self._by_name.get(name)
        if found is not None:
            return found
        folded = name.strip().casefold()
        for spec in self.models:
            if spec.name.casefold() == folded or (spec.display_name and spec.display_name.casefold() == folded):
                return spec
        return None

    def names(self) -> list[str]:
        return [spec.name for spec in self.models]

    def chain(self, name: str) -> list[ModelSpec]:
        """`name`, its fallbacks (depth first), then the global fallback; each model once.

        A name not in the catalogue (an old chat setting) is served by the default
        model's provider under that id, so a chat never breaks on a renamed model."""
        first = self.get(name)
        if first is None:
            base = self._by_name[self.default]
            first = ModelSpec(name, base.provider, images=base.images, tools=base.tools, reasoning=base.reasoning)
        seen: dict[str, ModelSpec] = {}

        def visit(spec: ModelSpec) -> None:
            if spec.name in seen:
                return
            seen[spec.name] = spec
            for next_name in spec.fallback:
                visit(self._by_name[next_name])

        visit(first)
        for next_name in self.fallback:
            visit(self._by_name[next_name])
        return list(seen.values())


def chain_problems(models: Sequence[ModelSpec], fallback: Sequence[str]) -> list[str]:
    """What is wrong with the fallback chains: unknown models, a model falling back to itself,
    cycles. Each problem names the key it is under (`models.<name>.fallback`, `fallback`)."""
    names = {m.name for m in models}
    problems = [f"fallback: unknown model {n!r}" for n in fallback if n not in names]
    graph = {m.name: [n for n in m.fallback if n in names] for m in models}
    for m in models:
        problems += [f"models.{m.name}.fallback: unknown model {n!r}" for n in m.fallback if n not in names]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                problems.append(f"models.{node}.fallback: a cycle: {' -> '.join(cycle)}")
            elif state.get(nxt) is None:
                walk(nxt, path + [nxt])
        state[node] = 2

    for m in models:
        if state.get(m.name) is None:
            walk(m.name, [m.name])
    return problems


def can_fail_over(exc: ProviderError) -> bool:
    """Whether another model (on another provider) may succeed where this call failed.

    Yes: unreachable, timeouts, 5xx/overloaded, 429, a rejected key (the next provider has
    its own), a garbled answer, a model that cannot see the images. No: a bad request, a
    content-policy refusal or a context that is too long -- the next model would be asked
    the same thing and refuse it the same way.
    """
    return isinstance(
        exc, (ProviderUnavailable, ProviderTimeout, ProviderRateLimited, ProviderAuthError, ProviderBadResponse,
              ProviderNoVision)
    )


BreakerState = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class _Circuit:
    failures: int = 0  # consecutive
    open_until: float | None = None
    probing: bool = False  # the one call let through after the cooldown is under way
    last_error: str | None = None
    opened: int = 0  # times it opened


class Breaker:
    """A circuit breaker per model: skip a model that keeps failing, probe it after a while."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def state(self, name: str) -> BreakerState:
        circuit = self._circuits.get(name)
        if circuit is None or circuit.open_until is None:
            return "closed"
        if self._clock() < circuit.open_until:
            return "open"
        return "half_open"

    def allow(self, name: str) -> bool:
        """May a call go to `name` now? After the cooldown, exactly one call at a time probes it."""
        state = self.state(name)
        if state == "closed":
            return True
        if state == "open":
            return False
        circuit = self._circuits[name]
        if circuit.probing:
            return False
        circuit.probing = True
        return True

    def success(self, name: str) -> None:
        circuit = self._circuits.get(name)
        if circuit is None:
            return
        if circuit.open_until is not None:
            log.info("model %s answers again; it is no longer skipped", name)
        circuit.failures = 0
        circuit.open_until = None
        circuit.probing = False

    def failure(self, name: str, error: str) -> None:
        circuit = self._circuits.setdefault(name, _Circuit())
        circuit.failures += 1
        circuit.last_error = error
        was_probe = circuit.probing
        circuit.probing = False
        if was_probe or circuit.failures >= self.failures:
            circuit.open_until = self._clock() + self.cooldown
            circuit.opened += 1
            log.warning(
                "model %s skipped for %.0fs after %d failure(s) in a row (last: %s)",
                name, self.cooldown, circuit.failures, error,
            )

    def release(self, name: str) -> None:
        """A probe that ended neither way (the turn was stopped): let the next call probe."""
        circuit = self._circuits.get(name)
        if circuit is not None:
            circuit.probing = False

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for name, c in self._circuits.items():
            state = self.state(name)
            out[name] = {
                "state": state,
                "failures": c.failures,
                "retry_in": round(c.open_until - now, 1) if state == "open" and c.open_until is not None else None,
                "last_error": c.last_error,
                "opened": c.opened,
            }
        return out
