"""What the control plane's routes are handed: the process's `Runtime` and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from chatgate.runtime import Runtime
from chatgate.security.principal import Principal


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def principal_of(request: Request) -> Principal:
    return await runtime_of(request).admit(request.scope)


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
PrincipalDep = Annotated[Principal, Depends(principal_of)]
