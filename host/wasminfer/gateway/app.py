"""`create_app`: the whole HTTP stack in one function — routes and the scope each needs, middleware,
exception handlers, startup. Each handler declares the rest about itself (`routing.operation`: its
parameters, body, replies, errors); `/openapi.json` is made from the two."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount

from wasminfer.gateway import routes_functions as functions
from wasminfer.gateway import routes_jobs as jobs
from wasminfer.gateway import routes_models as models
from wasminfer.gateway import routes_system as system
from wasminfer.gateway import routes_ui as ui
from wasminfer.gateway.assets import Assets, static_files
from wasminfer.gateway.auth import ADMIN, INVOKE, PUBLIC, READ
from wasminfer.gateway.collectors import JobsCollector
from wasminfer.gateway.direct import Gateway
from wasminfer.gateway.errors import EXCEPTION_HANDLERS
from wasminfer.gateway.metrics import Metrics
from wasminfer.gateway.routing import route
from wasminfer.gateway.settings import Settings
from wasminfer.gateway.state import AppState
from wasminfer.jobs import JobService, JobSettings
from wasminfer.replicas import FairLimiter, Fleet, InlinePolicy, ReplicaBackend
from wasminfer.scaling import ScalingConfig
from wasminfer.service import Platform


def create_app(
    platform: Platform,
    settings: Settings | None = None,
    *,
    scaling: ScalingConfig | None = None,
    backend: ReplicaBackend | None = None,
    job_settings: JobSettings | None = None,
    replica: bool = False,
    freeze_gc: bool = False,
    warm_up: bool = False,
) -> Starlette:
    """The gateway over `platform`. At startup it loads the store (`platform.start()`) on a worker
    thread without waiting for it: `/healthz` answers at once, `/readyz` and the API answer 503 until
    the load is done. The caller owns `platform` and closes it after the server stops.

    Invocations go to the host replicas of a `Fleet` made with `scaling` (default: the gateway's
    own process only) and `backend` (default: worker processes, when `scaling` allows more replicas);
    the fleet's autoscalers run from startup to shutdown, and shutdown drains its replicas.

    Asynchronous and bulk invocations run on this process' host in the capacity synchronous ones
    leave (`wasminfer.jobs`, tuned by `job_settings`, default `JobSettings.from_env()`), from
    startup to shutdown, which lets started chunks of work finish.

    `replica`: the app of a replica process that takes its own connections (`gateway.replica`):
    it runs no jobs (the gateway's process does) and follows deploys through the store.

    `warm_up` (a server's app): once the store is loaded, what a first upload would wait for is
    compiled in the background (`Platform.warm_up`).

    `freeze_gc` (a server process's app): once the store is loaded, what is alive then (the imported
    libraries, the loaded functions and models) is moved out of the cyclic collector's sight
    (`gc.freeze`). Each full collection walked all of it: ~0.1 s every few seconds under load, ~5% of
    a small invocation's CPU and a pause in its p99. The price: a reference cycle among those objects
    that becomes garbage later (a function loaded at startup, then replaced) is never collected."""
    settings = settings or Settings()
    # Worker threads shared between tenants: one tenant's flood or stuck calls leave the others theirs.
    invoke_limiter = FairLimiter(settings.invoke_threads, contended=settings.contended_invoke_threads)
    # Short invocations run on the event loop, the others on those threads (`replicas.inline`).
    inline = InlinePolicy(settings.inline, settings.inline_max_us)
    fleet = Fleet(
        platform, scaling, backend=backend, limiter=invoke_limiter, threads=settings.invoke_threads,
        inline=inline, follow_store=replica,
    )  # fmt: skip
    state = AppState(
        platform=platform,
        settings=settings,
        metrics=Metrics(platform, fleet),
        invoke_limiter=invoke_limiter,
        admin_limiter=FairLimiter(settings.admin_threads),
        fleet=fleet,
        jobs=JobService(platform, job_settings),
    )
    state.metrics.register(JobsCollector(state.jobs))

    invoke = route("POST", "/v1/functions/{name}/invoke", INVOKE, functions.invoke)
    routes: list[BaseRoute] = [
        route("GET", "/v1/functions", READ, functions.list_functions),
        route("PUT", "/v1/functions/{name}", ADMIN, functions.put_function),
        route("GET", "/v1/functions/{name}", READ, functions.get_function),
        route("DELETE", "/v1/functions/{name}", ADMIN, functions.delete_function),
        route("GET", "/v1/functions/{name}/versions", READ, functions.list_versions),
        route("POST", "/v1/functions/{name}/rollback", ADMIN, functions.rollback),
        invoke,
        route("GET", "/v1/functions/{name}/logs", READ, functions.logs),
        route("POST", "/v1/functions/{name}/batch", INVOKE, jobs.batch),
        # Jobs hold invocation outputs: the scope that may invoke may read them (`read` may not).
        route("GET", "/v1/jobs", INVOKE, jobs.list_jobs),
        route("GET", "/v1/jobs/{id}", INVOKE, jobs.get_job),
        route("DELETE", "/v1/jobs/{id}", INVOKE, jobs.delete_job),
        route("GET", "/v1/jobs/{id}/result", INVOKE, jobs.job_result),
        route("GET", "/v1/models", READ, models.list_models),
        route("PUT", "/v1/models/{name}", ADMIN, models.put_model),
        route("PATCH", "/v1/models/{name}", ADMIN, models.patch_model),
        route("GET", "/v1/models/{name}", READ, models.get_model),
        route("DELETE", "/v1/models/{name}", ADMIN, models.delete_model),
        route("GET", "/healthz", PUBLIC, system.healthz),
        route("GET", "/readyz", PUBLIC, system.readyz),
        route("GET", "/metrics", READ, system.metrics),
        route("GET", "/v1/scaling", READ, system.scaling),
        route("GET", "/v1/stats", READ, ui.stats),
        route("GET", "/v1/whoami", READ, ui.whoami),
        route("GET", "/openapi.json", PUBLIC, system.openapi),
        # Pages for people: they hold no data, and read the API with the key the person gives.
        route("GET", "/docs", PUBLIC, system.docs),
        route("GET", "/ui", PUBLIC, ui.console),
        Mount("/static", Assets(static_files())),  # their scripts and styles, from installed packages
    ]
    # No middleware: auth is per route (above) and body limits per handler, so an invocation pays for
    # nothing it does not use. Starlette adds its own two around this: ServerErrorMiddleware (the 500
    # handler) and ExceptionMiddleware (the other handlers); the invoke route skips them and the
    # router's scan, with the same handlers (`gateway.direct`).
    middleware: list[Middleware] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            if not platform.ready:
                tasks.start_soon(_load, platform, freeze_gc, warm_up)
            else:
                _loaded(platform, freeze_gc, warm_up)
            await fleet.start()
            if not replica:
                state.jobs.start()
            try:
                yield
            finally:
                await anyio.to_thread.run_sync(state.jobs.close)  # started chunks finish first
                # uvicorn has finished the requests in flight; now the replicas drain and stop.
                await fleet.aclose()
            # Shutting down while the store still loads: the load finishes first (threads cannot be
            # interrupted), then the owner closes the platform.

    app = Gateway(
        routes=routes,
        direct=[invoke],
        shared=state,
        middleware=middleware,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.state.wasminfer = state
    return app


async def _load(platform: Platform, freeze_gc: bool, warm_up: bool) -> None:
    await anyio.to_thread.run_sync(platform.start)
    _loaded(platform, freeze_gc, warm_up)


def _loaded(platform: Platform, freeze_gc: bool, warm_up: bool) -> None:
    """What follows the store's load (see `create_app`'s `freeze_gc` and `warm_up`)."""
    if freeze_gc:
        _freeze_gc()
    if warm_up:
        platform.warm_up()


def _freeze_gc() -> None:
    gc.collect()  # what is garbage already is not kept for good
    gc.freeze()
