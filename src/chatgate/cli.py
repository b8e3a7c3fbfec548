"""The `chatgate` command line: serve, and manage the registry, users and keys on the local
database directly (no token needed: whoever can run this can read the database anyway)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from chatgate import __version__
from chatgate.config import Settings, load_settings
from chatgate.errors import BadRequest, ChatgateError

# Each command imports what it uses: the database and HTTP stacks take about a second to import,
# which `chatgate --version`, `--help` and `chatgate chat` (a client of a running server) never need.
if TYPE_CHECKING:
    from chatgate.accounts import Accounts, User
    from chatgate.checks import CheckResult
    from chatgate.local import Local
    from chatgate.registry import ModelRecord

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

app = typer.Typer(help="chatgate: a gateway for chatting with your own models.", no_args_is_help=True)
models_app = typer.Typer(help="Register and manage models.", no_args_is_help=True)
users_app = typer.Typer(help="Users who may call chatgate.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (shown once, stored as hashes).", no_args_is_help=True)
keys_app = typer.Typer(help="The keys that encrypt API keys at rest.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")

# Piped output (scripts, tests) gets full-width tables rather than rich's 80-column default.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = "CHATGATE_" + "_".join(str(p) for p in error["loc"]).upper()
            err.print(f"[red]error:[/] {name}: {error['msg']}", highlight=False)
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ChatgateError as exc:
        raise _fail(exc.message) from None
    except OSError as exc:
        raise _fail(f"cannot open the database: {exc.strerror or exc}") from None


async def _local(action: Callable[[Local], Awaitable[T]], *, writes: bool = False) -> T:
    from chatgate.local import run_local

    return await run_local(_settings(), action, writes=writes)


def _parse(schema: type[M], data: dict[str, Any]) -> M:
    try:
        from chatgate.registry import parse_input

        parsed: M = parse_input(schema, data)
    except ChatgateError as exc:
        raise _fail(exc.message, 2) from None
    return parsed


def _api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    if api_key is not None and api_key_env is not None:
        raise _fail("give --api-key or --api-key-env, not both", 2)
    if api_key_env is not None:
        value = os.environ.get(api_key_env)
        if value is None:
            raise _fail(f"environment variable {api_key_env} is not set", 2)
        return value
    return api_key


def _version(value: bool) -> None:
    if value:
        out.print(f"chatgate {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """chatgate: a gateway for chatting with your own models."""


# ----- serve and db -------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (CHATGATE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (CHATGATE_PORT).")] = None,
    workers: Annotated[
        str | None,
        typer.Option(help="Processes serving the port: a number, or auto for one per core (CHATGATE_WORKERS)."),
    ] = None,
) -> None:
    """Serve the gateway (uvicorn with uvloop and httptools)."""
    from sqlalchemy.engine import make_url

    from chatgate.app import create_app
    from chatgate.config import usable_cores
    from chatgate.logs import configure
    from chatgate.server import DrainingServer, uvicorn_config, uvicorn_problem
    from chatgate.workers import Supervisor, WorkersProblem

    problem = uvicorn_problem()
    if problem is not None:
        raise _fail(problem)
    overrides: dict[str, object] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if workers is not None:
        count = usable_cores() if workers.strip().lower() == "auto" else _int_or_none(workers)
        if count is None or count < 1:
            raise _fail(f"--workers {workers}: give a number of processes (1 or more), or auto", 2)
        overrides["workers"] = count
    settings = _settings().model_copy(update=overrides)
    configure(settings.log_level, settings.log_format)
    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    if settings.workers == 1:  # one process, no supervisor: nothing in between
        err.print(f"chatgate serving on http://{settings.host}:{settings.port} (database: {shown})", highlight=False)
        gateway = create_app(settings)
        DrainingServer(uvicorn_config(gateway, settings), gateway.drain).run()
        return
    err.print(
        f"chatgate serving on http://{settings.host}:{settings.port} with {settings.workers} workers "
        f"(database: {shown})",
        highlight=False,
    )
    try:
        code = Supervisor(settings).run()
    except WorkersProblem as exc:
        raise _fail(str(exc), 2) from None
    except ChatgateError as exc:  # the preparation: the database cannot be reached
        raise _fail(exc.message) from None
    except OSError as exc:
        raise _fail(f"cannot serve on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    raise typer.Exit(code)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations to CHATGATE_DATABASE_URL."""
    from chatgate.store import db

    async def go() -> None:
        engine = db.create_engine(_settings().database_url)
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    _run(go())
    out.print("Database is up to date.")


# ----- models -------------------------------------------------------------------------------


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Option(help="Display name (at most 100 characters).")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://host:11434/v1.")],
    model_id: Annotated[str, typer.Option(help="The model id the upstream server knows.")],
    api_key: Annotated[str | None, typer.Option(help="API key (--api-key-env keeps it out of shell history).")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Read the API key from this environment variable.")] = None,
    description: Annotated[str, typer.Option(help="Free text (at most 500 characters).")] = "",
    context_length: Annotated[int, typer.Option(help="Context window in tokens.")] = 4096,
    sharing: Annotated[str, typer.Option(help="private, public or unlisted.")] = "private",
    user: Annotated[
        str | None, typer.Option(help="The owner (a chatgate user name); default: the admin, when there is one only.")
    ] = None,
) -> None:
    """Register a model; prints its id."""
    from chatgate.registry import ModelCreate

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

    async def go(local: Local) -> ModelRecord:
        owner = await local.accounts.user(user) if user is not None else await _only_admin(local.accounts)
        return await local.registry.create(owner.id, data)

    out.print(str(_run(_local(go, writes=True)).id), highlight=False)


async def _only_admin(accounts: Accounts) -> User:
    admins = [user for user in await accounts.users() if user.is_admin]
    if len(admins) == 1:
        return admins[0]
    if not admins:
        raise BadRequest("there is no admin to own the model: give --user NAME (see `chatgate users list`)")
    names = ", ".join(user.name for user in admins)
    raise BadRequest(f"there are {len(admins)} admins ({names}): say which owns the model with --user NAME")


@models_app.command("list")
def models_list() -> None:
    """All registered models, keys masked."""
    records = _run(_local(lambda local: local.registry.list()))
    if not records:
        out.print("No models yet. Add one with: chatgate models add --name N --base-url URL --model-id M")
        return
    table = Table("name", "model_id", "base_url", "api_key", "sharing", "context")
    table.add_column("id", no_wrap=True, min_width=36)
    for record in records:
        view = record.public()
        table.add_row(
            view["name"],
            view["model_id"],
            view["base_url"] or "(OpenAI)",
            view["api_key"],
            view["sharing"],
            str(view["context_length"]),
            view["id"],
        )
    out.print(table)


def _show(record: ModelRecord) -> None:
    table = Table("field", "value", show_header=False)
    for key, value in record.public().items():
        table.add_row(key, _cell(value))
    out.print(table)


def _cell(value: object) -> str:
    """A field as a person reads it: fallbacks as `id, id`, members as `id:weight, id:weight`."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(f"{v['id']}:{v['weight']}" if isinstance(v, dict) else str(v) for v in value)
    return str(value)


@models_app.command("show")
def models_show(model_id: Annotated[str, typer.Argument(help="The model's id.")]) -> None:
    """One model's fields, key masked."""
    from chatgate.registry import parse_id

    _show(_run(_local(lambda local: local.registry.get(parse_id(model_id)))))


@models_app.command("update")
def models_update(
    model_id: Annotated[str, typer.Argument(help="The model's id.")],
    name: Annotated[str | None, typer.Option(help="New display name (at most 100 characters).")] = None,
    base_url: Annotated[str | None, typer.Option(help="New OpenAI-compatible base URL.")] = None,
    upstream_model: Annotated[str | None, typer.Option("--model-id", help="The upstream model id.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="New API key (--api-key-env keeps it out of shell history).")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Read the new API key from this environment variable.")
    ] = None,
    description: Annotated[str | None, typer.Option(help="New free text (at most 500 characters).")] = None,
    context_length: Annotated[int | None, typer.Option(help="New context window in tokens.")] = None,
    sharing: Annotated[str | None, typer.Option(help="private, public or unlisted.")] = None,
    fallbacks: Annotated[
        str | None,
        typer.Option(help='Models tried in order when this one fails: "ID2,ID3" ("" removes them).'),
    ] = None,
    members: Annotated[
        str | None,
        typer.Option(help='A balancing group: "ID:WEIGHT,ID2:WEIGHT" (weight 1 when left out; "" removes it).'),
    ] = None,
) -> None:
    """Change the given fields of a model."""
    from chatgate.registry import ModelUpdate, parse_id

    fields = {
        "name": name,
        "base_url": base_url,
        "model_id": upstream_model,
        "api_key": _api_key(api_key, api_key_env),
        "description": description,
        "context_length": context_length,
        "sharing": sharing,
        "fallbacks": None if fallbacks is None else _model_list(fallbacks, "--fallbacks"),
        "members": None if members is None else _member_list(members),
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        raise _fail("nothing to change: give at least one option (see --help)", 2)
    data = _parse(ModelUpdate, given)
    _show(_run(_local(lambda local: local.registry.update(parse_id(model_id), data), writes=True)))


def _model_list(text: str, option: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    for model_id in ids:
        try:
            uuid.UUID(model_id)
        except ValueError:
            raise _fail(f"{option}: {model_id!r} is not a model id (see `chatgate models list`)", 2) from None
    return ids


def _member_list(text: str) -> list[dict[str, Any]]:
    members = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        model_id, _, weight = part.partition(":")
        (checked,) = _model_list(model_id, "--members")
        if weight and not (weight.isdigit() and 1 <= int(weight) <= 1000):
            raise _fail(f"--members: the weight of {checked} must be a whole number from 1 to 1000", 2)
        members.append({"id": checked, "weight": int(weight) if weight else 1})
    return members


@models_app.command("remove")
def models_remove(model_id: Annotated[str, typer.Argument(help="The model's id.")]) -> None:
    """Delete a model."""
    from chatgate.registry import parse_id

    _run(_local(lambda local: local.registry.delete(parse_id(model_id)), writes=True))
    out.print(f"Removed model {model_id}", highlight=False)


@models_app.command("check")
def models_check(
    model_id: Annotated[str, typer.Argument(help="The model's id.")],
    timeout: Annotated[float, typer.Option(help="Seconds each request may take.", min=0.1)] = 30.0,
) -> None:
    """Ask the model's server for its model list and a one-token chat, and say how it went.

    Exit status: 0 the model answered and its server lists it; 3 it answered but is not in the
    list (or the list failed); 1 it did not answer."""
    from chatgate.checks import Verdict, check_model
    from chatgate.registry import parse_id
    from chatgate.runtime import upstream_policy
    from chatgate.security.ssrf import GuardedResolver
    from chatgate.upstream.client import UpstreamClient

    async def go(local: Local) -> CheckResult:
        record = await local.registry.for_chat(parse_id(model_id))
        upstream = UpstreamClient(local.settings, GuardedResolver(upstream_policy(local.settings)))
        await upstream.start()
        try:
            return await check_model(upstream, local.settings, record, wait=timeout)
        finally:
            await upstream.close()

    result = _run(_local(go))
    models, chat = result.models, result.chat
    if not models.ok:
        listed = f"failed: {models.error}"
    elif result.listed:
        listed = f"ok, lists {result.model_id}"
    else:
        listed = f"does not list {result.model_id}"
    out.print(f"model list      {_ms(models.latency):>9}  {listed}", highlight=False)
    out.print(
        f"one-token chat  {_ms(chat.latency):>9}  {'ok' if chat.ok else 'failed: ' + str(chat.error)}", highlight=False
    )
    out.print(f"verdict: {result.verdict}", highlight=False)
    raise typer.Exit({Verdict.OK: 0, Verdict.WARNING: 3, Verdict.FAILED: 1}[result.verdict])


# ----- users and tokens ---------------------------------------------------------------------


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    admin: Annotated[bool, typer.Option("--admin", help="May manage every model.")] = False,
) -> None:
    """Add a user (then give them a token with `chatgate tokens create --user NAME`)."""
    user = _run(_local(lambda local: local.accounts.add_user(name, is_admin=admin), writes=True))
    out.print(f"Added user {user.name} ({'admin' if user.is_admin else 'user'}), id {user.id}", highlight=False)


@users_app.command("list")
def users_list() -> None:
    """All users."""
    table = Table("name", "role", "id", "created")
    for user in _run(_local(lambda local: local.accounts.users())):
        table.add_row(
            user.name, "admin" if user.is_admin else "user", str(user.id), f"{user.created_at:%Y-%m-%d %H:%M}"
        )
    out.print(table)


@tokens_app.command("create")
def tokens_create(user: Annotated[str, typer.Option(help="The user the token acts as.")]) -> None:
    """Create an API token; it is printed once and cannot be shown again."""
    info, token = _run(_local(lambda local: local.accounts.create_token(user), writes=True))
    err.print(f"Token {info.id} for {info.user} (shown once, keep it safe):", highlight=False)
    out.print(token, highlight=False, soft_wrap=True)


@tokens_app.command("list")
def tokens_list(user: Annotated[str | None, typer.Option(help="Only this user's tokens.")] = None) -> None:
    """Tokens by id and prefix (never the token itself)."""
    table = Table("id", "user", "prefix", "created", "revoked")
    for info in _run(_local(lambda local: local.accounts.tokens(user))):
        revoked = f"{info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else ""
        table.add_row(str(info.id), info.user, info.prefix + "…", f"{info.created_at:%Y-%m-%d %H:%M}", revoked)
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token: Annotated[str, typer.Argument(help="The token's id (or its prefix).")]) -> None:
    """Revoke a token: it stops working at once."""
    info = _run(_local(lambda local: local.accounts.revoke(token), writes=True))
    out.print(f"Revoked token {info.id} ({info.prefix}…) of {info.user}", highlight=False)


# ----- usage --------------------------------------------------------------------------------


def _when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(f"{option}: not an ISO date or time: {value!r}", 2) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


@app.command()
def usage(
    model: Annotated[str | None, typer.Option(help="Only this model (its id, or a name).")] = None,
    since: Annotated[str | None, typer.Option(help="From this ISO date or time (UTC unless it says).")] = None,
    until: Annotated[str | None, typer.Option(help="Until this ISO date or time, exclusive.")] = None,
    days: Annotated[int, typer.Option(help="Without --since: the last this many days.", min=1)] = 7,
) -> None:
    """Chats per model and (UTC) day: requests, errors, tokens, median and p95 time to first byte."""
    from chatgate.usage import summarize_usage

    start = _when(since, "--since") or datetime.now(UTC) - timedelta(days=days)
    end = _when(until, "--until")
    summaries = _run(_local(lambda local: summarize_usage(local.engine, model=model, since=start, until=end)))
    if not summaries:
        out.print("No chats recorded in that range.")
        return
    table = Table("model", "day", "requests", "errors", "prompt tokens", "completion tokens", "TTFB p50", "TTFB p95")
    for day in summaries:
        table.add_row(
            day.model,
            day.day.isoformat(),
            str(day.requests),
            str(day.errors),
            _count(day.prompt_tokens),
            _count(day.completion_tokens),
            _ms(day.ttfb_p50),
            _ms(day.ttfb_p95),
        )
    out.print(table)
    err.print("Tokens count the chats whose server reported them; errors exclude clients that went away.")


# ----- chat ---------------------------------------------------------------------------------


@app.command()
def chat(
    model: Annotated[str | None, typer.Argument(help="A model's name or id (without one: pick from a list).")] = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="Ask this once, print only the answer, and exit.")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(envvar="CHATGATE_URL", help="The chatgate server (default: http://CHATGATE_HOST:CHATGATE_PORT)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="CHATGATE_TOKEN", help="API token (default: the admin-token file in CHATGATE_DATA_DIR)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the model's).")] = None,
    history: Annotated[
        Path | None, typer.Option(help="Where to keep the prompt history (default: ~/.local/state/chatgate/).")
    ] = None,
) -> None:
    """Chat with a model through a running chatgate: interactive on a terminal, or one question
    with -m or on stdin (`cat notes.txt | chatgate chat MODEL`), for scripts."""
    from chatgate.chat_cli import start
    from chatgate.chat_client import ChatFailed

    try:
        code = start(
            _settings(), model, message, url=url, token=token, system=system, temperature=temperature, history=history
        )
    except ChatFailed as exc:
        raise _fail(exc.message, exc.code) from None
    raise typer.Exit(code)


# ----- keys ---------------------------------------------------------------------------------


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Start encrypting with a new key and re-encrypt every stored API key under it.

    With the key file, running servers pick the new key up by themselves. With
    CHATGATE_SECRET_KEY, first put the new key in front ("new,old") on every instance."""
    from chatgate.registry import rotate_keys

    async def go(local: Local) -> tuple[str, int]:
        keys = local.keys
        if keys.path is not None:
            kid = keys.ring.add_new_key()
            keys.ring.save(keys.path)
        else:
            kid = keys.ring.current_kid
        return kid, await rotate_keys(local.engine, keys)

    kid, count = _run(_local(go, writes=True))
    out.print(f"Current key is {kid}; re-encrypted {count} stored API key(s).", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
