"""The `chatgate` command line: serve, and manage the registry on the local database directly."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from chatgate.config import Settings, load_settings
from chatgate.errors import ChatgateError
from chatgate.registry import ModelCreate, ModelRecord, ModelUpdate, Registry, parse_id, parse_input
from chatgate.runtime import build_registry, load_keyring
from chatgate.security.principal import Principal
from chatgate.store import db

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

app = typer.Typer(help="chatgate: a gateway for chatting with your own models.", no_args_is_help=True)
models_app = typer.Typer(help="Register and manage models.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)

LOCAL_ADMIN = Principal(uuid.UUID(int=0), "local", is_admin=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = "CHATGATE_" + "_".join(str(p) for p in error["loc"]).upper()
            err.print(f"[red]error:[/] {name}: {error['msg']}")
        raise typer.Exit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ChatgateError as exc:
        err.print(f"[red]error:[/] {exc.message}", highlight=False)
        raise typer.Exit(1) from None


async def _with_registry(action: Callable[[Registry], Awaitable[T]]) -> T:
    settings = _settings()
    engine = db.create_engine(settings.database_url)
    try:
        await db.upgrade(engine)
        return await action(build_registry(settings, engine, load_keyring(settings)))
    finally:
        await engine.dispose()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (CHATGATE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (CHATGATE_PORT).")] = None,
) -> None:
    """Serve the gateway (uvicorn with uvloop and httptools)."""
    import uvicorn

    from chatgate.app import create_app
    from chatgate.logs import configure

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = _settings().model_copy(update=overrides)
    configure(settings.log_level)
    err.print(f"chatgate serving on http://{settings.host}:{settings.port} (database: {_safe_url(settings)})")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        log_level=settings.log_level,
        server_header=False,
        timeout_graceful_shutdown=5,
    )


def _safe_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.database_url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations to CHATGATE_DATABASE_URL."""

    async def go() -> None:
        settings = _settings()
        engine = db.create_engine(settings.database_url)
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    _run(go())
    out.print("Database is up to date.")


def _parse(schema: type[M], data: dict[str, Any]) -> M:
    try:
        parsed: M = parse_input(schema, data)
    except ChatgateError as exc:
        err.print(f"[red]error:[/] {exc.message}", highlight=False)
        raise typer.Exit(2) from None
    return parsed


def _api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    if api_key is not None and api_key_env is not None:
        err.print("[red]error:[/] give --api-key or --api-key-env, not both")
        raise typer.Exit(2)
    if api_key_env is not None:
        value = os.environ.get(api_key_env)
        if value is None:
            err.print(f"[red]error:[/] environment variable {api_key_env} is not set")
            raise typer.Exit(2)
        return value
    return api_key


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Option(help="Display name (at most 100 characters).")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://host:11434/v1.")],
    model_id: Annotated[str, typer.Option(help="The model id the upstream server knows.")],
    api_key: Annotated[
        str | None, typer.Option(help="API key (prefer --api-key-env: shells keep history).")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Read the API key from this environment variable.")
    ] = None,
    description: Annotated[str, typer.Option(help="Free text (at most 500 characters).")] = "",
    context_length: Annotated[int, typer.Option(help="Context window in tokens.")] = 4096,
    sharing: Annotated[str, typer.Option(help="private, public or unlisted.")] = "private",
) -> None:
    """Register a model; prints its id."""
    data = _parse(
        ModelCreate,
        {
            "name": name,
            "base_url": base_url,
            "model_id": model_id,
            "api_key": _api_key(api_key, api_key_env) or "",
            "description": description,
            "context_length": context_length,
            "sharing": sharing,
        },
    )
    record = _run(_with_registry(lambda r: r.create(LOCAL_ADMIN.user_id, data)))
    out.print(str(record.id), highlight=False)


@models_app.command("list")
def models_list() -> None:
    """All registered models, keys masked."""
    records = _run(_with_registry(lambda r: r.list()))
    table = Table("id", "name", "model_id", "base_url", "api_key", "sharing", "context", title=None)
    for record in records:
        view = record.public()
        table.add_row(
            view["id"],
            view["name"],
            view["model_id"],
            view["base_url"] or "(OpenAI)",
            view["api_key"],
            view["sharing"],
            str(view["context_length"]),
        )
    if records:
        out.print(table)
    else:
        out.print("No models yet. Add one with: chatgate models add --name N --base-url URL --model-id M")


def _show(record: ModelRecord) -> None:
    table = Table("field", "value", show_header=False)
    for key, value in record.public().items():
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


@models_app.command("show")
def models_show(model_id: Annotated[str, typer.Argument(help="The model's id.")]) -> None:
    """One model's fields, key masked."""
    _show(_run(_with_registry(lambda r: r.get(parse_id(model_id)))))


@models_app.command("update")
def models_update(
    model_id: Annotated[str, typer.Argument(help="The model's id.")],
    name: Annotated[str | None, typer.Option()] = None,
    base_url: Annotated[str | None, typer.Option()] = None,
    upstream_model: Annotated[str | None, typer.Option("--model-id", help="The upstream model id.")] = None,
    api_key: Annotated[str | None, typer.Option()] = None,
    api_key_env: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    context_length: Annotated[int | None, typer.Option()] = None,
    sharing: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change the given fields of a model."""
    fields = {
        "name": name,
        "base_url": base_url,
        "model_id": upstream_model,
        "api_key": _api_key(api_key, api_key_env),
        "description": description,
        "context_length": context_length,
        "sharing": sharing,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        err.print("[red]error:[/] nothing to change: give at least one option (see --help)")
        raise typer.Exit(2)
    data = _parse(ModelUpdate, given)
    _show(_run(_with_registry(lambda r: r.update(parse_id(model_id), data))))


@models_app.command("remove")
def models_remove(model_id: Annotated[str, typer.Argument(help="The model's id.")]) -> None:
    """Delete a model."""
    _run(_with_registry(lambda r: r.delete(parse_id(model_id))))
    out.print(f"Removed model {model_id}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
