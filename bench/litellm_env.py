"""LiteLLM's proxy for comparison, in a virtual environment of its own (created on first run).

The version is pinned: litellm 1.82.7 and 1.82.8 were compromised releases and are never installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import procs

LITELLM_VERSION = "1.82.6"
COMPROMISED = frozenset({"1.82.7", "1.82.8"})
REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
VENV_DIR = Path(__file__).resolve().parent / ".venv-litellm"

# No telemetry, no remote cost map, no logging on the hot path; no database (UNSET).
ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_MODE": "PRODUCTION",
    "STORE_MODEL_IN_DB": "False",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
}

UNSET = ("DATABASE_URL", "REDIS_HOST", "REDIS_URL")


@dataclass(frozen=True)
class LiteLLM:
    """An installed proxy: the `litellm` executable and its version."""

    executable: Path
    version: str


def _installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure(venv: Path = VENV_DIR) -> LiteLLM | str:
    """The pinned LiteLLM proxy, installing it if needed; a reason string when it cannot be had."""
    version = _installed_version(venv)
    if version == LITELLM_VERSION and (venv / "bin" / "litellm").exists():
        return LiteLLM(venv / "bin" / "litellm", version)
    if version is not None:
        print(f"  {venv} holds litellm {version}, not {LITELLM_VERSION}: recreating it", flush=True)
        shutil.rmtree(venv)
    print(f"  creating {venv} and installing {REQUIREMENT} (first run only, a few minutes)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create {venv}: {exc}"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    proc = subprocess.Popen([*pip, REQUIREMENT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-19:], line.rstrip()]
        if line.startswith(("Collecting", "Installing", "Successfully")):
            print("    " + line.rstrip()[:120], flush=True)
    if proc.wait() != 0:
        return "pip install failed:\n" + "\n".join(tail)
    version = _installed_version(venv)
    if version in COMPROMISED or version != LITELLM_VERSION:
        return f"unexpected litellm version {version}"
    return LiteLLM(venv / "bin" / "litellm", LITELLM_VERSION)


def write_config(path: Path, upstream_port: int) -> Path:
    """The proxy config: `bench`, `bench-slow`, `bench-paced` routed to the bench upstream. JSON is valid YAML."""
    base = f"http://127.0.0.1:{upstream_port}"
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": "openai/bench-model", "api_base": base + prefix, "api_key": "sk-bench"},
            }
            for name, prefix in (("bench", "/v1"), ("bench-slow", "/slow/v1"), ("bench-paced", "/paced/v1"))
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True, "request_timeout": 600},
        "general_settings": {"disable_spend_logs": True, "disable_error_logs": True},
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def write_log_config(path: Path) -> Path:
    """A uvicorn logging config without the access log, as the floor and chatgate run."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["err"], "level": "WARNING"},
            "uvicorn.error": {"level": "WARNING"},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def command(litellm: LiteLLM, config: Path, port: int, log_config: Path) -> list[str]:
    return [
        str(litellm.executable),
        "--config", str(config),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--num_workers", "1",
        "--telemetry", "False",
        "--log_config", str(log_config),
    ]  # fmt: skip


def start(litellm: LiteLLM, name: str, log_dir: Path, upstream_port: int) -> procs.Server:
    """The proxy on the server's core, routed to the bench upstream, its config and logs in `log_dir`."""
    port = procs.free_port()
    config = write_config(log_dir / f"{name}.yaml", upstream_port)
    log_config = write_log_config(log_dir / f"{name}-logging.json")
    return procs.start(
        name, command(litellm, config, port, log_config), port=port, core=procs.SERVER_CORE, log_dir=log_dir,
        env=ENV, cwd=log_dir, unset=UNSET,
    )  # fmt: skip
