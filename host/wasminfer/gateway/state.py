"""`AppState`: what every request shares, built once by `create_app` (the platform, the settings,
the metrics, the worker-thread limiters), and how a handler reaches it and runs platform calls."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from wasminfer.gateway.metrics import Metrics
from wasminfer.gateway.settings import Settings
from wasminfer.jobs import JobService
from wasminfer.replicas import FairLimiter, Fleet
from wasminfer.service import Platform, Principal

T = TypeVar("T")


@dataclass
class AppState:
    platform: Platform
    settings: Settings
    metrics: Metrics
    invoke_limiter: FairLimiter  # invocation threads, shared fairly between tenants
    admin_limiter: FairLimiter  # deploys and reads, likewise
    fleet: Fleet  # where invocations run: the host replicas, their router and autoscaler
    jobs: JobService  # asynchronous and bulk invocations (`wasminfer.jobs`)
    openapi: dict[str, Any] | None = None  # the app's OpenAPI document, made at its first request


#: Where `auth.scoped` keeps the caller in the request's ASGI scope (a namespaced key, as ASGI
#: extensions do: `request.state` would make an object and go through a Python `__setattr__`).
PRINCIPAL = "wasminfer.principal"


def app_state(request: Request) -> AppState:
    # The app's own attribute (`Gateway.shared`), set with `app.state.wasminfer`: Starlette's
    # `State` answers every read with a Python `__getattr__`, and a request reads it several times.
    state: AppState = request.scope["app"].shared
    return state


def principal(request: Request) -> Principal:
    """The caller, as `auth.scoped` found it."""
    who: Principal = request.scope[PRINCIPAL]
    return who


async def run_admin(request: Request, func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Runs a blocking platform call (a deploy, a read) on the admin worker threads, as the caller's
    tenant: one tenant's slow deploys leave the others a thread. Raises what `func` raises."""
    limiter = app_state(request).admin_limiter
    return await limiter.run_sync(principal(request).tenant, functools.partial(func, *args, **kwargs))
