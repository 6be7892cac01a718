"""Which model answers a person, who may choose it, and the /model picker's buttons.

`chat.model_choice` says who chooses: `per_user` -- each person for themselves in that
chat (stored per chat and person); `per_chat` -- anyone, for the whole chat;
`admins_only` -- admins, for the whole chat (an owner's choice is not undone by an
admin: the ladder of `bots.commands`); `auto` -- per_user in private chats, admins_only
in groups. A turn uses the person's own choice (per_user), else the chat's, else the
default; a choice that left the configuration since falls back to the default.

Only the models a person's role may use (`models[].allow`) are offered. `/model` with no
argument answers with one button per model, the current one marked; a press chooses,
like `/model NAME` (which also takes display names). A button's data names the model by
a short hash of its name, so a press on a picker shown before the model was removed from
the configuration is told "no longer available" -- never mapped to another model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bots.access import Role
from bots.errors import ParleyError
from bots.inbound import ButtonPress
from bots.outbox import Button, ChatRef, MessageRef
from bots.pacing import Priority

if TYPE_CHECKING:
    from bots.gateway import Gateway

__all__ = ["PREFIX", "ChoiceRefused", "ModelChoice"]

log = logging.getLogger(__name__)

PREFIX = "mp"
Mode = Literal["per_user", "per_chat", "admins_only"]
_ROLES = {"user": Role.USER, "admin": Role.ADMIN, "owner": Role.OWNER}
NO_LONGER_AVAILABLE = "That model is no longer available."


class ChoiceRefused(ParleyError):
    """A choice this person may not make; the message says why, for the chat."""


@dataclass(frozen=True, slots=True)
class Current:
    """The model a person gets in a chat, and where that comes from."""

    name: str
    source: Literal["yours", "chat", "default"]


def model_token(name: str) -> str:
    """The model's name as it travels in a button: 10 hex characters of its SHA-256."""
    return hashlib.sha256(name.encode()).hexdigest()[:10]


class ModelChoice:
    """The one place that decides models per person and chat (turns, /model, the picker)."""

    def __init__(self, gateway: "Gateway") -> None:
        self._gw = gateway

    # ---- what is offered -------------------------------------------------------------

    def mode(self, chat: ChatRef) -> Mode:
        mode = self._gw.defaults.model_choice
        if mode == "auto":
            return "per_user" if chat.is_private else "admins_only"
        return mode  # type: ignore[return-value]

    def allowed(self, role: Role) -> list[str]:
        """The models `role` may pick, the default first."""
        roles = self._gw.defaults.model_roles
        return [m for m in self._gw.defaults.allowed_models() if role >= _ROLES.get(roles.get(m, "user"), Role.USER)]

    def label(self, name: str) -> str:
        spec = self._gw.agent.catalogue.get(name)
        return spec.label if spec is not None and spec.name == name else name

    def resolve(self, typed: str, role: Role) -> str | None:
        """The model a person meant by `typed` (a name or display name, any case), if theirs to pick."""
        allowed = self.allowed(role)
        if typed in allowed:
            return typed
        spec = self._gw.agent.catalogue.get(typed)
        if spec is not None and spec.name in allowed:
            return spec.name
        folded = typed.strip().casefold()
        return next((m for m in allowed if m.casefold() == folded), None)

    # ---- what a turn uses --------------------------------------------------------------

    async def current(self, chat: ChatRef, user_key: str, chat_model: str | None) -> Current:
        """The model for `user_key`'s turn in `chat` (`chat_model`: the chat's stored setting)."""
        known = self._gw.defaults.allowed_models()
        if self.mode(chat) == "per_user":
            mine = await self._gw.store.model_choice(chat.key, user_key)
            if mine in known:
                return Current(mine, "yours")
        if chat_model in known:
            return Current(chat_model, "chat")  # type: ignore[arg-type]
        return Current(self._gw.defaults.model, "default")

    # ---- choosing ----------------------------------------------------------------------

    async def choose(self, chat: ChatRef, user_key: str, role: Role, name: str | None) -> str:
        """Set the model (None: back to the default) as `user_key` may; the line to answer.

        Raises `ChoiceRefused` with the reason when this person may not."""
        store = self._gw.store
        mode = self.mode(chat)
        if name is not None and name not in self.allowed(role):
            raise ChoiceRefused(f"You can't use {self.label(name)}.")
        if mode == "per_user":
            await store.set_model_choice(chat.key, user_key, name)
            default = self.label(self._gw.defaults.model)
            if chat.is_private:  # the person's model is the chat's
                return f"Model reset to the default, {default}." if name is None else f"Model for this chat set to {self.label(name)}."
            if name is None:
                return f"Your model in this chat is back to the default, {default}."
            return f"Your model in this chat is now {self.label(name)}."
        if mode == "admins_only" and role < Role.ADMIN:
            raise ChoiceRefused("Only admins can switch the model.")
        settings = await store.chat_settings(chat.key)
        setter = settings.set_by.get("model")
        if setter is not None and setter != user_key:
            setter_role = await self._gw.access.role_of(setter)
            if setter_role > role:
                raise ChoiceRefused(
                    f"An {setter_role.label} set this chat's model; only an {setter_role.label} can change it."
                )
        await store.update_chat_settings(chat.key, by=user_key, model=name)
        if name is None:
            return f"Model reset to the default, {self.label(self._gw.defaults.model)}."
        return f"Model for this chat set to {self.label(name)}."

    # ---- the picker ----------------------------------------------------------------------

    def picker(self, current: Current, role: Role, chat: ChatRef) -> tuple[str, list[Button]]:
        """The /model answer: what is in use, and a button per model this person may pick."""
        whose = "Your model in this chat" if self.mode(chat) == "per_user" and not chat.is_private else "Model in this chat"
        suffix = " (default)" if current.source == "default" else ""
        allowed = self.allowed(role)
        text = f"{whose}: {self.label(current.name)}{suffix}\nAvailable: {', '.join(self.label(m) for m in allowed)}"
        buttons = [
            Button(("✓ " if name == current.name else "") + self.label(name)[:60], f"{PREFIX}:{model_token(name)}")
            for name in allowed
        ]
        return text, buttons[:25] if len(buttons) > 1 else []  # one model: nothing to choose

    async def press(self, press: ButtonPress, rest: str) -> bool:
        """A press on a picker button: choose that model for the presser, as they may."""
        name = next((m for m in self._gw.defaults.allowed_models() if model_token(m) == rest), None)
        if name is None:
            await press.answer(NO_LONGER_AVAILABLE, False)
            return True
        group = None if press.chat.is_private else press.chat.key
        role = await self._gw.access.role_of(press.user_key, chat_key=group)
        if role < Role.USER:
            await press.answer("You can't use this bot here.", True)
            return True
        try:
            line = await self.choose(press.chat, press.user_key, role, name)
        except ChoiceRefused as refused:
            await press.answer(str(refused), True)
            return True
        await press.answer(line, False)
        if self.mode(press.chat) != "per_user":
            await self._remark(press, role)
        log.info("chat %s: %s picked model %s", press.chat.key, press.user_key, name)
        return True

    async def _remark(self, press: ButtonPress, role: Role) -> None:
        """Show the chat's new model on the picker that was pressed (its mark moves)."""
        connector = self._gw.connectors.get(press.platform)
        if connector is None:
            return
        settings = await self._gw.store.chat_settings(press.chat.key)
        text, buttons = self.picker(await self.current(press.chat, press.user_key, settings.model), role, press.chat)
        try:
            async with connector.pacing.for_chat(press.chat).sending(Priority.FINAL):
                await connector.outbox.edit(MessageRef(press.chat, press.message_id), text, buttons=buttons)
        except Exception as exc:  # the choice is made; a stale mark is cosmetic
            log.info("chat %s: could not update the model picker: %s", press.chat.key, exc)
