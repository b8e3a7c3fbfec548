"""Test infrastructure that runs real processes on loopback: the fake upstream and its launchers.

Import what tests need from here::

    from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name
"""

from tests.support import scripts
from tests.support.procs import (
    Blackhole,
    ChatgateServer,
    ConnectionRecord,
    FakeUpstream,
    RequestRecord,
    ServerProcess,
    StartupError,
    free_port,
    refused_base_url,
    unique_name,
    wait_for_port,
    wait_until,
)

__all__ = [
    "Blackhole",
    "ChatgateServer",
    "ConnectionRecord",
    "FakeUpstream",
    "RequestRecord",
    "ServerProcess",
    "StartupError",
    "free_port",
    "refused_base_url",
    "scripts",
    "unique_name",
    "wait_for_port",
    "wait_until",
]
