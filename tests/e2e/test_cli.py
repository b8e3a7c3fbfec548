"""The `chatgate` command line, run as a user would: a process with the environment set."""

from __future__ import annotations

import re

import pytest
from tests.support import ChatgateServer

pytestmark = pytest.mark.e2e

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_models_add_list_show_update_remove(gateway: ChatgateServer) -> None:
    added = gateway.cli(
        "models", "add", "--name", "cli-model", "--base-url", "http://127.0.0.1:9/v1",
        "--model-id", "m1", "--api-key-env", "CLI_TEST_KEY", "--description", "from the CLI", "--user", "admin",
        env_extra={"CLI_TEST_KEY": "sk-cli-secret-key-9876"},
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    model_id = added.stdout.strip()
    assert UUID.match(model_id)

    listed = gateway.cli("models", "list")
    assert listed.returncode == 0
    assert model_id in listed.stdout
    assert "sk-…9876" in listed.stdout
    assert "sk-cli-secret-key-9876" not in listed.stdout

    shown = gateway.cli("models", "show", model_id)
    assert "from the CLI" in shown.stdout
    assert "sk-…9876" in shown.stdout

    updated = gateway.cli("models", "update", model_id, "--description", "changed", "--context-length", "8192")
    assert updated.returncode == 0, updated.stderr
    assert "changed" in updated.stdout
    assert "8192" in updated.stdout

    # The server sees the CLI's change (another process) once its cache entry expires.
    with gateway.client() as client:
        assert client.get(f"/api/models/{model_id}").json()["description"] == "changed"

    removed = gateway.cli("models", "remove", model_id)
    assert removed.returncode == 0
    assert gateway.cli("models", "show", model_id).returncode == 1


def test_cli_errors_are_plain_words(gateway: ChatgateServer) -> None:
    too_long = gateway.cli(
        "models", "add", "--name", "n" * 101, "--base-url", "http://127.0.0.1:9/v1", "--model-id", "m"
    )
    assert too_long.returncode == 2
    assert "name" in too_long.stderr
    assert "at most 100 characters" in too_long.stderr
    assert "Traceback" not in too_long.stderr

    missing = gateway.cli("models", "show", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1
    assert "Model not found" in missing.stderr

    nothing = gateway.cli("models", "update", "00000000-0000-4000-8000-000000000000")
    assert nothing.returncode == 2
    assert "nothing to change" in nothing.stderr

    no_env = gateway.cli(
        "models", "add", "--name", "x", "--base-url", "http://127.0.0.1:9/v1", "--model-id", "m",
        "--api-key-env", "SURELY_NOT_SET_ANYWHERE",
    )  # fmt: skip
    assert no_env.returncode == 2
    assert "SURELY_NOT_SET_ANYWHERE is not set" in no_env.stderr


def test_bad_setting_is_named(gateway: ChatgateServer) -> None:
    result = gateway.cli("models", "list", env_extra={"CHATGATE_PORT": "not-a-port"})
    assert result.returncode == 2
    assert "CHATGATE_PORT" in result.stderr
    assert "Traceback" not in result.stderr
