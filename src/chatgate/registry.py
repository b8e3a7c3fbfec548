"""The model registry: what a user may register, and how the chat path finds a model fast.

Writes validate (limits of chatbot-ui's table, URL policy), encrypt the API key, and invalidate
the in-process cache; reads on the chat path go through that cache.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.cache import LRUCache
from chatgate.errors import BadRequest, NotFound, ValidationFailed
from chatgate.security.crypto import mask
from chatgate.store.schema import model_routes as routes_table
from chatgate.store.schema import models as models_table
from chatgate.store.values import as_utc, as_uuid

Sharing = Literal["private", "public", "unlisted"]


class KeyCipher(Protocol):
    """How API keys are sealed at rest (see `security.crypto.KeyRing`)."""

    def encrypt(self, plaintext: str) -> str: ...
    def decrypt(self, stored: str) -> str: ...


def _text(limit: int, *, required: bool = False) -> Any:
    return Annotated[str, StringConstraints(max_length=limit, min_length=1 if required else 0)]


# An API key travels in an HTTP header: control characters could not be sent (or would inject).
_ApiKey = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*$")]


NAME_MAX = 100
MAX_FALLBACKS = 10
MAX_MEMBERS = 20


class Member(BaseModel):
    """One model of a balancing group and its share of the traffic."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID
    weight: int = Field(1, ge=1, le=1000)


Fallbacks = Annotated[list[uuid.UUID], Field(max_length=MAX_FALLBACKS)]
Members = Annotated[list[Member], Field(max_length=MAX_MEMBERS)]


class ModelCreate(BaseModel):
    """A new model, as a user registers it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: _text(100, required=True)  # type: ignore[valid-type]
    base_url: _text(1000)  # type: ignore[valid-type]
    model_id: _text(1000, required=True)  # type: ignore[valid-type]
    api_key: _ApiKey = ""
    description: _text(500) = ""  # type: ignore[valid-type]
    context_length: int = Field(4096, ge=1, le=10_000_000)
    sharing: Sharing = "private"
    folder_id: uuid.UUID | None = None
    # Models tried, in order, when this one fails; models sharing its traffic (see failover.py).
    fallbacks: Fallbacks = []
    members: Members = []


class ModelUpdate(BaseModel):
    """A partial change: only the fields given are written."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: _text(100, required=True) | None = None  # type: ignore[valid-type]
    base_url: _text(1000) | None = None  # type: ignore[valid-type]
    model_id: _text(1000, required=True) | None = None  # type: ignore[valid-type]
    api_key: _ApiKey | None = None
    description: _text(500) | None = None  # type: ignore[valid-type]
    context_length: int | None = Field(None, ge=1, le=10_000_000)
    sharing: Sharing | None = None
    folder_id: uuid.UUID | None = None
    fallbacks: Fallbacks | None = None  # [] removes them
    members: Members | None = None


def parse_input(schema: type[BaseModel], data: object) -> Any:
    """Validate `data` against `schema`; a failure names each field and its limit."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc) from None


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One registered model, with its API key in clear (never rendered: see `public()`)."""

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    base_url: str
    model_id: str
    api_key: str = field(repr=False)
    description: str = ""
    context_length: int = 4096
    sharing: str = "private"
    folder_id: uuid.UUID | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    fallbacks: tuple[uuid.UUID, ...] = ()
    members: tuple[tuple[uuid.UUID, int], ...] = ()  # (model, weight)

    def public(self, *, routes: bool = True) -> dict[str, Any]:
        """The form every response and table shows: the key masked. `routes=False` leaves out the
        fallbacks and members, for a caller who may use the model but not manage it: an
        unlisted model's id is what lets one use it."""
        shown: dict[str, Any] = {
            "id": str(self.id),
            "user_id": str(self.user_id),
            "folder_id": str(self.folder_id) if self.folder_id else None,
            "name": self.name,
            "base_url": self.base_url,
            "model_id": self.model_id,
            "api_key": mask(self.api_key),
            "description": self.description,
            "context_length": self.context_length,
            "sharing": self.sharing,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }
        if routes:
            shown["fallbacks"] = [str(model_id) for model_id in self.fallbacks]
            shown["members"] = [{"id": str(model_id), "weight": weight} for model_id, weight in self.members]
        return shown


def parse_id(value: object) -> uuid.UUID:
    """A model id from the wire; anything that is not a UUID is a model that does not exist."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise NotFound("Model not found")


class Registry:
    """Create, read, update and delete models; `for_chat` is the cached hot-path lookup."""

    def __init__(
        self,
        engine: AsyncEngine,
        cipher: KeyCipher,
        *,
        check_url: Callable[[str], Awaitable[None]],
        check_connect: Callable[[str], None],
        cache: LRUCache[uuid.UUID, ModelRecord],
        names: LRUCache[str, tuple[ModelRecord, ...]] | None = None,
        on_change: Callable[[uuid.UUID | None], Awaitable[None]] | None = None,
    ) -> None:
        self._engine = engine
        self._cipher = cipher
        self._check_url = check_url
        self._filling: dict[uuid.UUID, asyncio.Future[ModelRecord]] = {}
        self._check_connect = check_connect
        self._cache = cache
        self._names: LRUCache[str, tuple[ModelRecord, ...]] = names if names is not None else LRUCache(1024, 5.0)
        # Models whose server refused the `stream_options` chatgate adds to ask for token counts.
        self._no_stream_options: set[uuid.UUID] = set()
        self._on_change = on_change

    async def create(self, owner: uuid.UUID, data: ModelCreate) -> ModelRecord:
        await self._check_url(data.base_url)
        now = datetime.now(UTC)
        model_id = uuid.uuid4()
        fallbacks, members = await self._routes_for(model_id, owner, data.fallbacks, data.members)
        record = ModelRecord(
            id=model_id,
            user_id=owner,
            name=data.name,
            base_url=data.base_url,
            model_id=data.model_id,
            api_key=data.api_key,
            description=data.description,
            context_length=data.context_length,
            sharing=data.sharing,
            folder_id=data.folder_id,
            created_at=now,
            updated_at=now,
            fallbacks=fallbacks or (),
            members=members or (),
        )
        values = {
            "id": record.id,
            "user_id": owner,
            "folder_id": record.folder_id,
            "created_at": now,
            "updated_at": now,
            "sharing": record.sharing,
            "api_key": self._cipher.encrypt(record.api_key),
            "base_url": record.base_url,
            "description": record.description,
            "model_id": record.model_id,
            "name": record.name,
            "context_length": record.context_length,
        }
        try:
            async with self._engine.begin() as conn:
                await conn.execute(models_table.insert().values(**values))
                await _write_routes(conn, record.id, fallbacks, members)
        except sa.exc.IntegrityError:
            # chatbot-ui's table references auth.users: its owners are Supabase users.
            raise BadRequest(
                "This models table only accepts owners who are users of its database "
                "(a chatbot-ui table: sign in with a Supabase access token)"
            ) from None
        # The name may now be taken twice, here and in every other instance's name cache.
        await self._changed(record.id)
        return record

    async def get(self, model_id: uuid.UUID) -> ModelRecord:
        async with self._engine.connect() as conn:
            row = (await conn.execute(models_table.select().where(models_table.c.id == model_id))).first()
            if row is None:
                raise NotFound("Model not found")
            routes = await _read_routes(conn, routes_table.c.model_id == model_id)
        return self._record(row._mapping, routes.get(model_id))

    async def list(self, *, visible_to: uuid.UUID | None = None) -> list[ModelRecord]:
        """All models, or only those listed for a user: their own and the public ones
        (an unlisted model is usable by anyone who knows its id, but listed only for its owner)."""
        query = models_table.select().order_by(models_table.c.created_at, models_table.c.id)
        if visible_to is not None:
            query = query.where(sa.or_(models_table.c.user_id == visible_to, models_table.c.sharing == "public"))
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            routes = await _read_routes(conn, sa.true())
        return [self._record(row._mapping, routes.get(as_uuid(row.id))) for row in rows]

    async def update(self, model_id: uuid.UUID, data: ModelUpdate) -> ModelRecord:
        changes = data.model_dump(exclude_unset=True)
        if "base_url" in changes:
            await self._check_url(changes["base_url"])
        nullable = {"folder_id"}
        for key in [k for k, v in changes.items() if v is None and k not in nullable]:
            del changes[key]
        current = await self.get(model_id)
        fallbacks, members = await self._routes_for(
            model_id, current.user_id, changes.pop("fallbacks", None), changes.pop("members", None)
        )
        if not changes and fallbacks is None and members is None:
            return current
        now = datetime.now(UTC)
        values = dict(changes, updated_at=now)
        if "api_key" in values:
            values["api_key"] = self._cipher.encrypt(values["api_key"])
        async with self._engine.begin() as conn:
            result = await conn.execute(models_table.update().where(models_table.c.id == model_id).values(**values))
            if result.rowcount == 0:
                raise NotFound("Model not found")
            await _write_routes(conn, model_id, fallbacks, members)
        await self._changed(model_id)
        if fallbacks is not None:
            changes["fallbacks"] = fallbacks
        if members is not None:
            changes["members"] = members
        return replace(current, **changes, updated_at=now)

    async def _routes_for(
        self,
        model_id: uuid.UUID,
        owner: uuid.UUID,
        fallbacks: Sequence[uuid.UUID] | None,
        members: Sequence[Member | dict[str, Any]] | None,
    ) -> tuple[tuple[uuid.UUID, ...] | None, tuple[tuple[uuid.UUID, int], ...] | None]:
        """Check the fallbacks and members a write names: each a model the owner may use (their
        own, or one shared), none twice, and no model its own fallback. A model that does not
        exist and a private model of someone else are refused alike, so that the answer tells
        nothing about other users' models. None: not given, left as they are."""
        named_fallbacks = None if fallbacks is None else tuple(fallbacks)
        named_members = None
        if members is not None:
            parsed = [m if isinstance(m, Member) else Member.model_validate(m) for m in members]
            named_members = tuple((m.id, m.weight) for m in parsed)
        for field_name, ids in (
            ("fallbacks", named_fallbacks or ()),
            ("members", tuple(m for m, _ in named_members or ())),
        ):
            if len(set(ids)) != len(ids):
                raise BadRequest(f"{field_name} names a model twice", param=field_name)
            for target in ids:
                if target == model_id:
                    if field_name == "fallbacks":
                        raise BadRequest("A model cannot be its own fallback", param=field_name)
                    continue  # a group may include the model itself
                try:
                    record = await self.get(target)
                except NotFound:
                    record = None
                if record is None or not (record.user_id == owner or record.sharing != "private"):
                    raise BadRequest(
                        f"{field_name}: no model {target} that the model's owner may use", param=field_name
                    )
        return named_fallbacks, named_members

    async def delete(self, model_id: uuid.UUID) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(models_table.delete().where(models_table.c.id == model_id))
        if result.rowcount == 0:
            raise NotFound("Model not found")
        # The routes to it went with it: every model that named it has changed too.
        await self._changed(None)

    async def for_chat(self, model_id: uuid.UUID) -> ModelRecord:
        """The model to relay a chat to, from the cache when it is there."""
        record = self._cache.get(model_id)
        if record is not None:
            return record
        # One database read per expired entry, however many chats are waiting for it.
        pending = self._filling.get(model_id)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    return await self.for_chat(model_id)  # the reader was cancelled, not us: read again
                raise
        pending = asyncio.get_running_loop().create_future()
        self._filling[model_id] = pending
        try:
            record = await self.get(model_id)
            # A literal IP never reaches the connect-time resolver guard, and a row written
            # by chatbot-ui never passed the write-time check: check it here, once per fill.
            self._check_connect(record.base_url)
            self._cache.put(model_id, record)
            pending.set_result(record)
        except Exception as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: nobody else may be waiting
            raise
        except BaseException:
            pending.cancel()
            raise
        finally:
            del self._filling[model_id]
        return record

    async def named(self, name: str) -> tuple[ModelRecord, ...]:
        """Every model with this name (names are not unique), from the cache when it is there."""
        records = self._names.get(name)
        if records is None:
            records = ()
            if 0 < len(name) <= NAME_MAX:
                query = models_table.select().where(models_table.c.name == name)
                async with self._engine.connect() as conn:
                    rows = (await conn.execute(query.order_by(models_table.c.created_at, models_table.c.id))).all()
                records = tuple(self._record(row._mapping) for row in rows)
            self._names.put(name, records)
        return records

    def accepts_stream_options(self, model_id: uuid.UUID) -> bool:
        """False once the model's server has refused `stream_options` (until the model changes)."""
        return model_id not in self._no_stream_options

    def refuses_stream_options(self, model_id: uuid.UUID) -> None:
        self._no_stream_options.add(model_id)

    def invalidate(self, model_id: uuid.UUID | None = None) -> None:
        """Forget a cached model (or all of them): called on writes, here or elsewhere."""
        self._names.clear()  # a write may rename any model
        if model_id is None:
            self._cache.clear()
            self._no_stream_options.clear()
        else:
            self._cache.discard(model_id)
            self._no_stream_options.discard(model_id)

    async def _changed(self, model_id: uuid.UUID | None) -> None:
        self.invalidate(model_id)
        if self._on_change is not None:
            await self._on_change(model_id)

    def _record(self, row: Any, routes: _Routes | None = None) -> ModelRecord:
        fallbacks, members = routes or ((), ())
        return ModelRecord(
            id=as_uuid(row["id"]),
            user_id=as_uuid(row["user_id"]),
            name=row["name"],
            base_url=row["base_url"],
            model_id=row["model_id"],
            api_key=self._cipher.decrypt(row["api_key"]),
            description=row["description"],
            context_length=row["context_length"],
            sharing=row["sharing"],
            folder_id=as_uuid(row["folder_id"]) if row["folder_id"] is not None else None,
            created_at=as_utc(row["created_at"]),
            updated_at=as_utc(row["updated_at"]) if row["updated_at"] is not None else None,
            fallbacks=fallbacks,
            members=members,
        )


_Routes = tuple[tuple[uuid.UUID, ...], tuple[tuple[uuid.UUID, int], ...]]


async def _read_routes(conn: Any, where: Any) -> dict[uuid.UUID, _Routes]:
    """The fallbacks and members of the models `where` selects, in order, by model."""
    t = routes_table
    query = sa.select(t.c.model_id, t.c.kind, t.c.target_id, t.c.weight).where(where)
    rows = (await conn.execute(query.order_by(t.c.model_id, t.c.kind, t.c.position))).all()
    found: dict[uuid.UUID, tuple[list[uuid.UUID], list[tuple[uuid.UUID, int]]]] = {}
    for row in rows:
        fallbacks, members = found.setdefault(as_uuid(row.model_id), ([], []))
        if row.kind == "fallback":
            fallbacks.append(as_uuid(row.target_id))
        else:
            members.append((as_uuid(row.target_id), row.weight))
    return {model_id: (tuple(f), tuple(m)) for model_id, (f, m) in found.items()}


async def _write_routes(
    conn: Any,
    model_id: uuid.UUID,
    fallbacks: tuple[uuid.UUID, ...] | None,
    members: tuple[tuple[uuid.UUID, int], ...] | None,
) -> None:
    """Replace the model's fallbacks and/or members (None: leave that kind as it is)."""
    t = routes_table
    weighted = (
        ("fallback", None if fallbacks is None else [(target, 1) for target in fallbacks]),
        ("member", None if members is None else list(members)),
    )
    for kind, targets in weighted:
        if targets is None:
            continue
        await conn.execute(t.delete().where(t.c.model_id == model_id, t.c.kind == kind))
        rows = [
            {"model_id": model_id, "kind": kind, "position": position, "target_id": target, "weight": weight}
            for position, (target, weight) in enumerate(targets)
        ]
        if rows:
            await conn.execute(t.insert(), rows)


async def rotate_keys(engine: AsyncEngine, keys: Any) -> int:
    """Re-encrypt every stored key that is encrypted under an older key; returns how many.

    Plain-text rows are left alone: they may belong to a chatbot-ui table that chatbot-ui reads.
    Each row is rewritten only if it still holds the value read (a concurrent edit wins)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(models_table.c.id, models_table.c.api_key))).all()
    count = 0
    for row in rows:
        stored = row.api_key
        if not stored.startswith("cg1:") or not keys.ring.needs_rotation(stored):
            continue
        fresh = keys.ring.encrypt(keys.decrypt(stored))
        async with engine.begin() as conn:
            result = await conn.execute(
                models_table.update()
                .where(models_table.c.id == row.id, models_table.c.api_key == stored)
                .values(api_key=fresh)
            )
        count += result.rowcount
    return count
