"""One agent turn: model call, tool calls, model call, ... until a final answer.

`Agent.run_turn` knows nothing about chats: it takes Chat Completions history and the
new user message, reports progress through `TurnEvents`, and returns a `TurnResult`
with the messages to persist. Interrupts (`interrupt.set()`, from /stop or the
"interrupt" busy policy) cancel whatever is in flight — the HTTP stream is closed at
once, partial tool calls are discarded, running tools are cancelled — and the turn
*returns* the partial text marked `interrupted`. Cancelling the task that runs the turn
instead propagates `CancelledError` (after the stream is closed).

Every model call's usage is counted, however the turn ends: what the provider reported,
or -- for a call whose stream was cut before the report, or a provider that reports
none -- an estimate of its prompt plus what it generated (`agent.tokens`: counted with
the tokenizer of the model asked when parley has it loaded, else characters / 4), marked
as estimated. A call that failed before generating anything counts nothing: providers do
not bill a request they rejected or failed. The caller's `UsageMeter` holds the count,
so a turn that raises or is cancelled still tells what it used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ProviderConfig
from .errors import ProviderError
from .events import Approver, ToolCall, ToolResult, TurnEvents
from .media import Transcriber, TranscriptionConfig, has_images, user_content
from .provider import ProbeResult, Provider, RequestObserver, StepState, _guard
from .providers import Breaker, Catalogue, ModelSpec, can_fail_over
from .stream import ChatAccumulator, ModelResponse, ResponsesAccumulator, Usage
from .tokens import prompt_tokens, tokenizers
from .tools import ToolRegistry

__all__ = ["Agent", "TurnResult", "UsageMeter", "MAX_STEPS_MESSAGE"]

log = logging.getLogger(__name__)

MAX_STEPS_MESSAGE = (
    "I stopped after {steps} tool steps without a final answer. "
    "Ask me to continue if you want me to keep going."
)
INTERRUPTED_TOOL_RESULT = "Error: interrupted by the user before the tool finished."


@dataclass(slots=True)
class TurnResult:
    """The outcome of one turn; `messages` are ready to append to the stored history."""

    text: str
    messages: list[dict[str, Any]]
    usage: Usage
    model: str
    fell_back: bool = False
    fallback_causes: list[str] = field(default_factory=list)
    interrupted: bool = False
    hit_max_steps: bool = False
    steps: int = 0
    first_token_latency: float | None = None
    asked: str = ""  # the model the turn was asked of (a catalogue name)
    answered_by: str = ""  # the model that gave the last answer (differs after a failover)

    @property
    def fallback_model(self) -> str | None:
        """The model that answered instead of the one asked, if another had to."""
        return self.answered_by if self.answered_by and self.answered_by != self.asked else None


@dataclass(slots=True)
class UsageMeter:
    """What a turn's model calls have used so far; the caller keeps it.

    A turn that raises (the provider failed after a tool step, or mid-answer) or is
    cancelled (shutdown) returns no `TurnResult`, yet the provider billed what it
    generated. Hand `run_turn` a meter and read it however the turn ended: `usage` has
    every finished model call and the one cut off, `model` the model that answered.
    """

    model: str = ""
    usage: Usage = field(default_factory=Usage)


def _attempt_usage(
    acc: ChatAccumulator | ResponsesAccumulator | None, prompt: Callable[[], int], model: str
) -> Usage:
    """What one streamed attempt used: the provider's report if it sent one (Gemini sends
    it on every chunk), else an estimate (for `model`) when it generated anything, else nothing."""
    if acc is None:
        return Usage()
    partial = acc.result()
    if partial.usage is not None:
        return partial.usage
    if not acc.started:
        return Usage()
    return Usage.estimate(prompt(), partial, model)


class _Turn:
    """Mutable bookkeeping of a turn in flight (so an interrupt can return what exists)."""

    def __init__(self, model: str, meter: UsageMeter) -> None:
        self.meter = meter
        meter.model = model
        # The model asked: estimates count with its tokenizer (the answering model's name,
        # `self.model`, may carry a date suffix; the budget hold was counted for this one).
        self.asked = model
        self.messages: list[dict[str, Any]] = []
        self.causes: list[str] = []
        self.steps = 0
        self.started = asyncio.get_running_loop().time()
        self.first_token_latency: float | None = None
        self.step: StepState | None = None
        self.step_prompt: Callable[[], int] = lambda: 0  # the estimate of the step's prompt, when needed
        self.visible_text = ""  # what the last completed model call showed before its tool calls
        # while tools run: the calls and their results so far (None = unfinished)
        self.calls: list[ToolCall] = []
        self.results: list[ToolResult | None] = []
        self.answered_by = ""  # the catalogue name of the model that answered the last step

    @property
    def model(self) -> str:
        return self.meter.model

    @model.setter
    def model(self, value: str) -> None:
        self.meter.model = value

    @property
    def usage(self) -> Usage:
        return self.meter.usage

    @usage.setter
    def usage(self, value: Usage) -> None:
        self.meter.usage = value

    def count_cut_step(self) -> None:
        """Count the model call in flight, cut off by an interrupt, an error or a cancellation.

        Its stream (if one had begun) holds what the model generated, and a report if the
        provider sends one per chunk; a fallback request still in flight counts nothing.
        """
        step, self.step = self.step, None
        if step is not None:
            self.usage = self.usage + _attempt_usage(step.acc, self.step_prompt, self.asked)

    def result(self, text: str, *, interrupted: bool = False, hit_max_steps: bool = False) -> TurnResult:
        return TurnResult(
            text=text,
            messages=self.messages,
            usage=self.usage,
            model=self.model,
            fell_back=bool(self.causes),
            fallback_causes=self.causes,
            interrupted=interrupted,
            hit_max_steps=hit_max_steps,
            steps=self.steps,
            first_token_latency=self.first_token_latency,
            asked=self.asked,
            answered_by=self.answered_by or self.asked,
        )

    def interrupted(self) -> TurnResult:
        if self.calls:
            # Tools were running: keep the history valid (every call gets a result).
            text = self.visible_text
            for call, result in zip(self.calls, self.results):
                content = result.content if result is not None else INTERRUPTED_TOOL_RESULT
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
            return self.result(text, interrupted=True)
        # A model call was in flight: keep what the user saw, drop partial tool calls.
        text = self.step.visible_text if self.step is not None else ""
        self.count_cut_step()
        if text:
            self.messages.append({"role": "assistant", "content": text})
        return self.result(text, interrupted=True)


class Agent:
    """Runs turns against the models of a `Catalogue` (or one provider) with one tool registry.

    `cfg` is one `ProviderConfig` (its `model` the default; any other model name is asked
    of the same provider) or a `Catalogue` of named providers and models with fallback
    chains (`agent.providers`). `tools=None` gives the default built-ins (`current_time`);
    pass `ToolRegistry()` for none. `clock` drives the streaming cooldown (tests inject one).
    `on_request` hears of every HTTP request sent to the provider, SDK retries and
    fallbacks included (`agent.provider.RequestObserver`; the gateway counts them).
    `transcription` says how `transcribe` turns audio into text (default: `whisper-1`
    through the provider's own client).
    """

    def __init__(
        self,
        cfg: ProviderConfig | Catalogue,
        tools: ToolRegistry | None = None,
        max_steps: int = 8,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_request: RequestObserver | None = None,
        transcription: TranscriptionConfig | None = None,
    ) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        self.catalogue = cfg if isinstance(cfg, Catalogue) else Catalogue.single(cfg)
        default = self.catalogue.get(self.catalogue.default)
        assert default is not None
        self.default_model = default
        self.cfg = self.catalogue.providers[default.provider]  # the default model's provider
        self.tools = tools if tools is not None else ToolRegistry.default()
        self.max_steps = max_steps
        self._providers = {
            name: Provider(pcfg, clock=clock, on_request=on_request) for name, pcfg in self.catalogue.providers.items()
        }
        self._provider = self._providers[default.provider]
        self.breaker = Breaker(self.catalogue.breaker_failures, self.catalogue.breaker_cooldown, clock)
        cfg = self.cfg
        transcription = transcription or TranscriptionConfig()
        shared = transcription.base_url is None
        self._transcriber = Transcriber(
            transcription,
            client=self._provider.client if shared else None,
            api_key=cfg.api_key if shared else "",
        )

    async def aclose(self) -> None:
        await self._transcriber.aclose()
        for provider in self._providers.values():
            await provider.aclose()

    async def transcribe(self, audio: bytes, *, filename: str, mime: str | None = None) -> str:
        """The words spoken in `audio` ("" for silence); raises `TranscriptionFailed`.

        `filename` should carry the real format's extension (`voice.ogg`): Whisper-style
        servers decide the decoder by it.
        """
        return await self._transcriber.transcribe(audio, filename=filename, mime=mime)

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def health(self) -> dict[str, Any]:
        """Streaming health per model of the default provider (as before several providers),
        plus every provider's (`providers`) and the breaker per model (`breaker`), for an
        operator's /status (no secrets)."""
        snapshot = self._provider.health_snapshot()
        snapshot["providers"] = {name: p.health_snapshot() for name, p in self._providers.items()}
        snapshot["breaker"] = self.breaker.snapshot()
        return snapshot

    async def probe(self, models: Sequence[str] = (), *, provider: str | None = None) -> ProbeResult:
        """Check a provider (default: the default model's) is reachable with its key and
        serves `models` (default: the default model's id), for `parley check`."""
        target = self._providers[provider] if provider is not None else self._provider
        return await target.probe(models or (self.default_model.id,))

    async def run_turn(
        self,
        history: list[dict[str, Any]],
        message: str | Sequence[Mapping[str, Any]],
        events: TurnEvents | None = None,
        *,
        model: str | None = None,
        system_prompt: str | None = None,
        interrupt: asyncio.Event | None = None,
        meter: UsageMeter | None = None,
        tools: ToolRegistry | None = None,
        approver: Approver | None = None,
    ) -> TurnResult:
        """Run one turn to its final answer (or interrupt, or `max_steps`).

        `message` is the user's text, or Chat Completions content parts (text and
        `image_url` parts, see `agent.media`) -- converted for the Responses API when
        that is the provider's.

        `meter`: where the turn's usage is counted as it goes, readable even when this
        raises or is cancelled (see `UsageMeter`).

        `tools`: what this turn offers the model (default: the agent's registry) -- the
        caller narrows it to what the person asking may use (`ToolRegistry.subset`); a
        call to anything else is answered "unknown tool" and never runs. `approver`:
        asked before every valid call runs (see `Approver`); a call it denies is told to
        the model as not run, with its reason.
        """
        conversation: list[dict[str, Any]] = []
        if system_prompt:
            conversation.append({"role": "system", "content": system_prompt})
        conversation.extend(history)
        conversation.append({"role": "user", "content": user_content(message)})
        turn = _Turn(model or self.catalogue.default, meter if meter is not None else UsageMeter())
        tokenizers().warm(turn.asked)  # a first need starts loading its tokenizer, off this path

        task = asyncio.current_task()
        assert task is not None, "run_turn must run inside a task"
        baseline = task.cancelling()
        fired = False
        closed = False
        watcher: asyncio.Future[Any] | None = None
        if interrupt is not None:

            def on_interrupt(fut: asyncio.Future[Any]) -> None:
                nonlocal fired
                if closed or fut.cancelled():
                    return
                fired = True
                task.cancel()

            watcher = asyncio.ensure_future(interrupt.wait())
            watcher.add_done_callback(on_interrupt)
        try:
            offered = tools if tools is not None else self.tools
            chain = self._chain(model or self.catalogue.default, images=has_images(conversation))
            return await self._loop(conversation, turn, events, chain, offered, approver)
        except asyncio.CancelledError:
            if fired:
                fired = False
                if task.uncancel() <= baseline:  # our own interrupt, not an outside cancellation
                    log.info("turn interrupted after %d step(s)", turn.steps)
                    return turn.interrupted()
            turn.count_cut_step()
            raise
        except Exception:
            turn.count_cut_step()
            raise
        finally:
            closed = True
            if watcher is not None:
                watcher.cancel()
            if fired:  # the interrupt's cancellation was swallowed somewhere; keep the count balanced
                task.uncancel()

    async def _loop(
        self,
        conversation: list[dict[str, Any]],
        turn: _Turn,
        events: TurnEvents | None,
        chain: list[ModelSpec],
        tools: ToolRegistry,
        approver: Approver | None,
    ) -> TurnResult:
        for _ in range(self.max_steps):
            sent = conversation + turn.messages
            step, response = await self._complete_step(sent, turn, events, chain, tools)
            turn.step = None
            self._account(turn, step, response)
            turn.visible_text = response.visible_text
            turn.messages.append(response.assistant_message())
            if not response.tool_calls:
                return turn.result(response.content)
            await self._run_tools(turn, response.tool_calls, events, tools, approver)
        text = MAX_STEPS_MESSAGE.format(steps=self.max_steps)
        log.info("turn stopped at max_steps=%d", self.max_steps)
        turn.messages.append({"role": "assistant", "content": text})
        if events is not None and events.wants_deltas:
            _guard(events.on_text, "on_text")(text)
        return turn.result(text, hit_max_steps=True)

    def _chain(self, name: str, *, images: bool) -> list[ModelSpec]:
        """The models to try for `name`, in order. A turn that carries images goes to models
        that can see them: the chain's, then any other of the catalogue's (when none can,
        the chain as is -- the provider's refusal then says so)."""
        chain = self.catalogue.chain(name)
        if not images or all(spec.images for spec in chain):
            return chain
        seeing = [spec for spec in chain if spec.images]
        seeing += [spec for spec in self.catalogue.models if spec.images and spec not in seeing]
        return seeing or chain

    async def _complete_step(
        self,
        sent: list[dict[str, Any]],
        turn: _Turn,
        events: TurnEvents | None,
        chain: list[ModelSpec],
        tools: ToolRegistry,
    ) -> tuple[StepState, ModelResponse]:
        """One model call, on the first model of the chain that answers.

        A failure another model may fix moves the same step to the next model whose
        breaker lets it through; whatever the failed call showed is withdrawn first
        (`on_fallback("")`), so the chat ends with one answer. When the breaker skips every
        model, the first is asked anyway: a chat never fails without a try. (`allow` lets
        one probe through per model whose cooldown ended; one not asked is released.)
        """
        skipped = [spec for spec in chain if not self.breaker.allow(spec.name)]
        order = [spec for spec in chain if spec not in skipped] or chain[:1]  # every one skipped: ask the first
        for position, spec in enumerate(order):
            provider = self._providers[spec.provider]
            schemas = tools.schemas(provider.cfg.api) if len(tools) and spec.tools else None
            step = turn.step = StepState()
            turn.step_prompt = lambda sent=sent, schemas=schemas, model=spec.id: prompt_tokens(sent, schemas, model)
            turn.model = spec.id
            try:
                response = await provider.complete(
                    sent, schemas, model=spec.id, events=events, step=step, fail_fast=position < len(order) - 1
                )
            except ProviderError as exc:
                failover = can_fail_over(exc)
                if failover and len(chain) > 1:  # a chat's only model is never skipped
                    self.breaker.failure(spec.name, exc.describe())
                if not failover or position == len(order) - 1:
                    self._release(order[position + 1 :])
                    raise
                log.warning("model %s failed (%s); asking %s instead", spec.name, exc.describe(), order[position + 1].name)
                turn.count_cut_step()
                if events is not None and events.wants_deltas and step.visible_text:
                    _guard(events.on_fallback, "on_fallback")("")  # withdraw what the failed call showed
                continue
            except BaseException:
                self._release(order[position:])
                raise
            self.breaker.success(spec.name)
            self._release(order[position + 1 :])
            turn.answered_by = spec.name
            return step, response
        raise AssertionError("unreachable: the chain is never empty")  # pragma: no cover

    def _release(self, specs: list[ModelSpec]) -> None:
        """Models let through the breaker (a probe) but not asked after all."""
        for spec in specs:
            self.breaker.release(spec.name)

    @staticmethod
    def _account(turn: _Turn, step: StepState, response: ModelResponse) -> None:
        turn.steps += 1
        if response.usage is not None:
            used = response.usage
        else:
            used = Usage.estimate(turn.step_prompt(), response, turn.asked)
        if response.fell_back:
            used = used + _attempt_usage(step.acc, turn.step_prompt, turn.asked)  # the broken stream ran too
        turn.usage = turn.usage + used
        if response.fell_back and response.fallback_cause:
            turn.causes.append(response.fallback_cause)
        if response.model:
            turn.model = response.model
        if turn.first_token_latency is None and step.first_delta_at is not None and step.started_at is not None:
            turn.first_token_latency = step.first_delta_at - turn.started

    async def _run_tools(
        self,
        turn: _Turn,
        calls: list[ToolCall],
        events: TurnEvents | None,
        tools: ToolRegistry,
        approver: Approver | None,
    ) -> None:
        """Run one response's calls; results go into the history in call order.

        Invalid calls never run; the rest are put to the approver one at a time (a
        person answers one question at a time), then the approved ones run concurrently.
        """
        turn.calls = calls
        turn.results = results = [None] * len(calls)
        started = _guard(events.on_tool_started, "on_tool_started") if events is not None else None
        finished = _guard(events.on_tool_finished, "on_tool_finished") if events is not None else None

        async def run(position: int, call: ToolCall, prepared: Any) -> None:
            if started is not None:
                started(call)
            result = await tools.execute(prepared[0], prepared[1], call)
            results[position] = result
            if finished is not None:
                finished(call, result)

        approved: list[tuple[int, ToolCall, Any]] = []
        for position, call in enumerate(calls):
            prepared = tools.prepare(call)
            if isinstance(prepared, ToolResult):  # unknown tool or bad arguments: never runs
                log.info("tool call %s (%s) rejected: %s", call.id, call.name[:64], prepared.content[:200])
                results[position] = prepared
            elif approver is not None and not (decision := await approver.approve(call, prepared[1])).granted:
                log.info("tool call %s (%s) not approved: %s", call.id, call.name, decision.reason)
                results[position] = ToolResult(
                    call.id, call.name, f"Not run: {decision.reason or 'the user denied it'}.", True, denied=True
                )
            else:
                approved.append((position, call, prepared))
                continue
            if finished is not None:
                finished(call, results[position])
        async with asyncio.TaskGroup() as group:
            for position, call, prepared in approved:
                group.create_task(run(position, call, prepared))
        for call, result in zip(calls, results):
            assert result is not None
            turn.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content})
        turn.calls = []
        turn.results = []
