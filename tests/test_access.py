"""Access: who may do what, deny by default (real store, on SQLite and PostgreSQL)."""

from __future__ import annotations

from bots.access import Access, AccessPolicy, Role, denial_text
from bots.inbound import Inbound
from bots.outbox import ChatRef
from bots.store import Store

PRIVATE = ChatRef("telegram", "77", is_private=True)
GROUP = ChatRef("telegram", "-100", thread_id="5", is_private=False)


def said(user: str, chat: ChatRef) -> Inbound:
    return Inbound(chat, user, "hi", message_id="1", update_id="1")


async def test_deny_by_default(store: Store) -> None:
    access = Access(store, AccessPolicy(owners=frozenset({"telegram:1"})))
    assert await access.role(said("77", PRIVATE)) is Role.NOBODY
    assert await access.role(said("77", GROUP)) is Role.NOBODY
    assert await access.role(said("1", PRIVATE)) is Role.OWNER


async def test_stored_roles_and_their_order(store: Store) -> None:
    access = Access(store, AccessPolicy(owners=frozenset({"telegram:1"}), allow_everyone=True))
    await store.set_role("telegram:2", "admin")
    await store.set_role("telegram:3", "user")
    await store.set_role("telegram:4", "blocked")
    await store.set_role("telegram:1", "blocked")  # owners come from the configuration: a stored block cannot touch them
    assert [await access.role_of(f"telegram:{n}") for n in (1, 2, 3, 4, 5)] == [
        Role.OWNER, Role.ADMIN, Role.USER, Role.BLOCKED, Role.USER,
    ]  # fmt: skip
    assert Role.BLOCKED < Role.NOBODY < Role.USER < Role.ADMIN < Role.OWNER


async def test_groups_allowed_as_a_whole_in_config_or_store(store: Store) -> None:
    access = Access(store, AccessPolicy(allowed_chats=frozenset({"telegram:-100"})))
    # Every topic of an allowed group; not the members' private chats.
    assert await access.role(said("77", GROUP)) is Role.USER
    assert await access.role(said("77", PRIVATE)) is Role.NOBODY
    other = ChatRef("telegram", "-200", is_private=False)
    assert await access.role(said("77", other)) is Role.NOBODY
    await store.update_chat_settings("telegram:-200", allowed=True)
    assert await access.role(said("77", other)) is Role.USER
    # A blocked user stays blocked in an allowed group.
    await store.set_role("telegram:77", "blocked")
    assert await access.role(said("77", other)) is Role.BLOCKED


async def test_the_access_reply_is_rate_limited_per_user(store: Store) -> None:
    access = Access(store, AccessPolicy())
    assert access.should_tell_denied("telegram:77")
    assert not access.should_tell_denied("telegram:77")
    assert access.should_tell_denied("telegram:78")
    text = denial_text(said("77", PRIVATE))
    assert "/allow telegram:77" in text and "\n" not in text
