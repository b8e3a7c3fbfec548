"""Settings: one frozen, typed object built once at start-up and passed in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class Settings(BaseSettings):
    """Every setting chatgate reads, from `CHATGATE_*` variables or a `.env` file."""

    model_config = SettingsConfigDict(
        env_prefix="CHATGATE_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    database_url: str = "sqlite:///./chatgate.db"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # `json`: one JSON object per line (for log pipelines); `text`: lines for a person.
    log_format: Literal["text", "json"] = "text"
    # Server processes on the one port (`serve --workers`); `auto` is one per usable core.
    workers: int = Field(1, ge=1, le=512)
    # Where the generated secrets (key file, first admin token) live in the embedded setup.
    data_dir: Path = Path(".")

    # Upstream timeouts, in seconds.
    connect_timeout: float = Field(10.0, gt=0)
    first_byte_timeout: float = Field(60.0, gt=0)
    idle_timeout: float = Field(60.0, gt=0)
    # A non-streamed answer's head comes only when the whole answer is ready: its own, longer wait.
    completion_timeout: float = Field(600.0, gt=0)
    # Largest single SSE event held from a model server, in bytes; beyond it the stream fails (502,
    # or an aborted answer once it began): a server that never ends an event cannot fill memory.
    max_event_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    # Seconds an idle upstream keep-alive connection stays in the pool (less if the server's
    # Keep-Alive header says so); 0 closes each after its answer.
    keepalive_expiry: float = Field(5.0, ge=0)
    # Largest non-streamed upstream answer read, in bytes: beyond it the request is answered 502.
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    # Failover (docs/failover.md). A transient failure before the answer's first byte (refused,
    # reset, no head in time, 429, 502, 503, 504) is retried on the same model `retry_attempts`
    # more times, after a jittered backoff (`retry_backoff` seconds doubling per retry, or the
    # server's Retry-After when it is at most `retry_after_cap`); then the model's fallbacks are
    # tried. No attempt starts after `failover_deadline` seconds. A stream that sends no text
    # within `first_token_timeout` seconds of its head has failed too.
    retry_attempts: int = Field(1, ge=0, le=10)
    retry_backoff: float = Field(0.1, ge=0)
    retry_after_cap: float = Field(5.0, ge=0)
    failover_deadline: float = Field(30.0, gt=0)
    first_token_timeout: float = Field(60.0, gt=0)
    # Circuit breaking: after `breaker_threshold` failures in a row a model is skipped for
    # `breaker_cooldown` seconds (doubling after each failed probe, up to `breaker_cooldown_max`);
    # then one request probes it. 0 turns the breaker off.
    breaker_threshold: int = Field(5, ge=0)
    breaker_cooldown: float = Field(5.0, gt=0)
    breaker_cooldown_max: float = Field(300.0, gt=0)

    # Size of the in-process model cache (entries) and its safety-net TTL (seconds).
    model_cache_size: int = Field(1024, ge=1)
    model_cache_ttl: float = Field(5.0, gt=0)

    # Largest request body accepted, in bytes.
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Seconds a client may take to send a request's head, or leave its body stalled, before
    # the request is answered 408 (slowloris); uvicorn has no such timeout of its own.
    client_timeout: float = Field(30.0, gt=0)
    # Seconds running chats may take to finish after SIGTERM before they are ended (503).
    drain_timeout: float = Field(30.0, ge=0)

    # Apply pending migrations when the server starts.
    migrate_on_start: bool = True
    # PostgreSQL: seconds one database step may take (pool wait, ping, connect, statements, all
    # together) before the request is answered 503, and the connection pool size per process (as many again on bursts).
    database_timeout: float = Field(5.0, gt=0)
    database_pool_size: int = Field(10, ge=1)

    # Redis, shared by every instance: rate limits, stream caps, model-cache invalidation.
    # Empty: each process keeps these in memory (one instance).
    redis_url: str = ""
    redis_prefix: str = "chatgate:"
    # Seconds a Redis call may take before chatgate carries on without it (fail open).
    redis_timeout: float = Field(0.5, gt=0)

    # Keys at rest: a urlsafe-base64 32-byte key; empty means the embedded key file.
    secret_key: SecretStr = SecretStr("")

    # Upstreams on loopback/private networks (Ollama on localhost) are refused unless allowed here.
    # Link-local addresses (cloud metadata) stay refused whatever these say.
    allow_private_upstreams: bool = False
    upstream_allowlist: str = ""

    # Encrypt API keys chatgate writes. Off only for a table that chatbot-ui itself must read.
    encrypt_api_keys: bool = True

    # Supabase access tokens (chatbot-ui's users): HS256 secret and/or the project's JWKS URL.
    supabase_jwt_secret: SecretStr = SecretStr("")
    supabase_jwks_url: str = ""
    supabase_audience: str = "authenticated"

    # Per-user limits; 0 means unlimited.
    rate_limit_per_minute: int = Field(0, ge=0)
    max_concurrent_streams: int = Field(0, ge=0)

    # Prometheus metrics of the chats (off: /metrics keeps only the process counters, and a chat
    # costs nothing more). A scrape token lets a Prometheus server read /metrics without an admin
    # token; `metrics_max_models` bounds the `model` label (later models are counted as `other`).
    metrics: bool = True
    metrics_token: SecretStr = SecretStr("")
    metrics_max_models: int = Field(50, ge=0)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return usable_cores()
        return value

    @property
    def admin_token_path(self) -> Path:
        """Where `serve` writes the first admin's token, and where `chatgate chat` looks for one."""
        return self.data_dir / "admin-token"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0))


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (and `.env`), with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
