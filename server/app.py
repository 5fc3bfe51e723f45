"""create_app(settings): routes, middleware, errors, and the lifespan that loads the engine once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.middleware.gzip import GZipMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference import __version__

from .auth import Auth
from .datadir import DataDirLock, clean_leftovers, node_holder, trim_lora_cache
from .events import Hub
from .fetching import OwnFetches, lora_settings
from .files import FileStore, is_disk_full
from .metrics import ServerMetrics
from .middleware import (BodyLimit, BodyTimeout, HeadAsGet, RefuseOwnFetches, RequestId, TrailingSlash, problem_response,
                         refusal)
from .lifecycle import WEBHOOK_TIMEOUT_S, Lifecycle
from .predictions import PredictionService
from .protocol import ApiError, Problem, disk_full
from .apis import mount, shape_of
from .bfl import API as BFL_API
from .cog import API as COG_API
from .openai_api import API as OPENAI_API
from .replicate import REPLICATE, answers
from .replicate import files as files_routes
from .routes import masks as masks_routes
from .routes import system as system_routes
from .routes import ui as ui_routes
from .settings import Settings
from .state import AppState
from .postgres import pool_options
from .store import DatabaseUnavailable, open_store

log = logging.getLogger("flux_fill.server")
JANITOR_S = 15.0
SHARED_LEFTOVER_S = 3600.0  # an unfinished file in a shared blob folder this old has no writer left
SHUTDOWN_GRACE_S = 20.0
GZIP_MIN_BYTES = 1024


ROLES = ("all", "api", "worker")
# The APIs this server speaks, each a package of its own (see server.apis): one line each.
APIS = (REPLICATE, OPENAI_API, BFL_API, COG_API)


def create_app(settings: Settings | None = None, *, load_model=None, data_lock: DataDirLock | None = None,
               role: str | None = None) -> FastAPI:
    """The ASGI app. ``load_model(weights, components, device)`` can be swapped for tests.
    ``data_lock``: the data folder's lock, already taken by the caller; without it the app takes
    (and releases) its own at startup, before it reads anything there. ``role``: "all" (the API and
    its workers, the default), "api" (the API alone: --no-workers) or "worker" (GPU workers, with
    only /health and /metrics: `flux-fill worker`)."""
    settings = settings or Settings()
    role = role or ("all" if settings.workers else "api")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if load_model is None:
        from inference.weights import load_model
    own_fetches = OwnFetches()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from .webhooks import WebhookSender

        data = settings.data_dir
        lock = (data_lock or DataDirLock(data)).acquire()  # before the queue is read: one server per folder
        clean_leftovers(data)
        blobs = settings.blob_dir or data
        if blobs != data:  # shared with other nodes: only what no live upload can still be writing
            clean_leftovers(blobs, older_than_s=SHARED_LEFTOVER_S)
        trim_lora_cache(data, lora_settings(settings).cache_bytes)
        store = open_store(settings.database or data / "flux-fill.sqlite3", **(pool_options(settings)
                                                                              if settings.database else {}))
        if store.shared and settings.blob_dir is None:  # files in the database, this folder their cache
            from .blobs import DatabaseFileStore

            files = DatabaseFileStore(data, store, settings.file_expiry_hours)
        else:
            files = FileStore(blobs, store, settings.file_expiry_hours)
        hub = Hub()
        hub.bind(asyncio.get_running_loop())
        metrics = ServerMetrics()
        lifecycle = Lifecycle(settings, store, files, hub, metrics, holder=node_holder(data))
        service = PredictionService(settings, store, files, hub, lifecycle)
        # How a worker runs the predictions the other APIs' adapters make (see server.adapters).
        service.adapters = {api.name: side for api in APIS if (side := api.worker_side(settings)) is not None}
        state = AppState(settings=settings, store=store, files=files, hub=hub, service=service,
                         auth=Auth(settings.api_tokens, settings.rate_limit_per_minute, settings.admin_tokens),
                         metrics=metrics)
        app.state.flux = state
        sender = WebhookSender(state.webhook_secret(None), allow_private=not settings.block_private_urls,
                               retry_for_s=settings.webhook_retry_s, timeout_s=WEBHOOK_TIMEOUT_S,
                               max_concurrency=settings.webhook_slots,
                               max_per_destination=settings.webhook_slots_per_destination)
        await sender.start()
        state.webhooks = sender
        styles = {api.name: style for api in APIS if (style := api.webhook_style(state)) is not None}
        lifecycle.send_webhooks(sender, lambda record: answers.webhook_body(service, record), state.webhook_secret,
                                styles=styles)
        service.recover()  # after the webhooks: a prediction it ends (canceled, failed) gets its webhook
        listening = threading.Event()
        store.on_reconnect(lifecycle.look_again)  # the database is back: what was told meanwhile is read again
        if store.shared:  # the other nodes' moves wake this node's streams and waiting requests
            threading.Thread(target=store.listen, args=(lifecycle.remote_event, listening, lifecycle.look_again),
                             kwargs=dict(moves=role != "worker", queue=settings.workers),
                             name="db-events", daemon=True).start()
        if role == "api":
            state.phase = "READY"
            state.setup_started_at = state.setup_completed_at = time.time()
        else:
            threading.Thread(target=_setup, args=(state, load_model, own_fetches), name="model-loader",
                             daemon=True).start()
        tasks = [asyncio.create_task(lifecycle.watch_leases()), asyncio.create_task(lifecycle.watch_owed_webhooks())]
        if role != "worker":
            tasks += [asyncio.create_task(_janitor(service.expire)), asyncio.create_task(lifecycle.watch_deadlines())]
        else:  # a worker keeps copies of the files it read and wrote: those removed elsewhere go
            tasks.append(asyncio.create_task(_janitor(files.sweep)))
        try:
            yield
        finally:
            service.stop_waiting()
            listening.set()
            for task in tasks:
                task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, _stop_workers, state)
            await sender.close()
            store.close()
            if data_lock is None:
                lock.release()

    app = FastAPI(
        redirect_slashes=False,  # TrailingSlash serves "/v1/predictions/" itself: the Python client follows no 307
        title="flux-fill-server",
        version=__version__,
        description="Replicate's predictions API for black-forest-labs/flux-fill-dev, served locally.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if shape := shape_of(request.scope):
            return shape.problem(exc.problem, exc.headers)
        return problem_response(exc.problem, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return (shape_of(request.scope) or REPLICATE.errors).validation(list(exc.errors()))

    @app.exception_handler(DatabaseUnavailable)
    async def _database_away(request: Request, exc: DatabaseUnavailable):
        log.warning("answered 503: %s", exc)
        problem = Problem(title="Service Unavailable", status=503,
                          detail="The database is not reachable right now (it may be restarting); nothing was "
                                 "changed by this request. Try again in a few seconds.")
        headers = {"Retry-After": str(exc.retry_after_s)}
        return refusal(request.scope, problem, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        answer = shape_of(request.scope)
        answer = answer.problem if answer else problem_response
        if exc.status_code == 404:
            return answer(Problem(detail="The requested resource could not be found.", status=404), None)
        return answer(Problem(detail=str(exc.detail), status=exc.status_code), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        answer = shape_of(request.scope)
        answer = answer.problem if answer else problem_response
        if is_disk_full(exc):
            log.warning("the disk is full: %s", exc)
            return answer(disk_full().problem, None)
        log.exception("unexpected error")
        return answer(Problem(title="Internal Server Error", detail="An unexpected error occurred; the server log has the details.", status=500), None)

    routers = (files_routes.outputs_router, system_routes.router, system_routes.metrics_router,
               system_routes.public_router, ui_routes.router, masks_routes.router)
    if role == "worker":  # a worker node answers its health and metrics, nothing else
        routers = (system_routes.public_router, system_routes.metrics_router)
    for router in routers:
        app.include_router(router)
        if settings.prefix:
            app.include_router(router, prefix=settings.prefix, include_in_schema=False)
    if role != "worker":
        app.state.apis = [m for api in APIS if (m := mount(app, api, settings)) is not None]
    # The last added runs first: slashes and HEAD are settled before anything else sees the request.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RefuseOwnFetches, own=own_fetches, prefix=settings.prefix)
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES)  # never SSE or images (Starlette's defaults)
    app.add_middleware(HeadAsGet)
    app.add_middleware(TrailingSlash, router=app.router)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)  # it may replace any answer
    app.add_middleware(RequestId)  # outermost: every answer, the other middleware's refusals too, carries one
    return app


def begin_shutdown(app: FastAPI) -> None:
    """A shutdown was asked for (a signal, from any thread): answer the requests waiting on a
    prediction while the server can still answer them."""
    state = getattr(app.state, "flux", None)
    loop = state.hub.loop if state is not None else None
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(state.service.stop_waiting)


def _setup(state: AppState, load_model, own_fetches: OwnFetches) -> None:
    """Load one engine per device, then start its worker. Runs beside the event loop."""
    from inference.factory import build_engine

    from .engines import engine_options
    from .worker import Worker

    settings = state.settings
    devices = settings.gpus or [None]
    state.setup_started_at = time.time()
    if settings.weights == "null":
        _setup_null(state, own_fetches)
        return
    try:
        for index, device in enumerate(devices):
            mark = own_fetches.mark(index)  # each worker's fetches carry their own mark
            engine = build_engine(engine_options(settings, device, mark), load_model=load_model)
            model = engine.model
            log.info("speed on %s: %s", model.device, model.extras["speed"])
            state.models.append(model)
            state.workers.append(Worker(engine, state.service, model.device, own_fetches=own_fetches, fetch_mark=mark))
            if model.demo:
                log.warning("=" * 72)
                log.warning("DEMO MODEL: %s.", model.name)
                log.warning("It keeps the picture outside the mask and paints random colours inside it.")
                log.warning("Pass --weights (see weights.md) to serve FLUX.1 Fill [dev].")
                log.warning("=" * 72)
            else:
                log.info("loaded %s from %s on %s", model.name, model.source, model.device)
            if state.store.shared:  # the API nodes, which load no model, say what this one serves
                _record_served(state, model)
        if settings.segmenter:
            _setup_segmenter(state, state.models[0].device if state.models else None)
    except Exception as exc:
        state.phase = "SETUP_FAILED"
        state.setup_error = str(exc)
        state.setup_completed_at = time.time()
        log.error("setup failed: %s", exc, exc_info=not exc.__class__.__name__ == "WeightsError")
        return
    for worker in state.workers:
        worker.start()
    state.setup_completed_at = time.time()
    state.phase = "READY"
    log.info("ready: %d worker(s)", len(state.workers))


def _setup_segmenter(state: AppState, device: str | None) -> None:
    """--segmenter: its models loaded once on --segmenter-device (default: the first worker's), shared
    by every worker's engine (mask_prompt) and POST /v1/masks."""
    from inference.segment import load_segmenter
    from inference.tiny_segmenter import TINY_NOTICE

    segmenter = load_segmenter(state.settings.segmenter, state.settings.segmenter_device or device)
    for worker in state.workers:
        worker.engine.segmenter = segmenter
    state.segmenter = segmenter
    if segmenter.demo:
        log.warning("DEMO SEGMENTER: %s", TINY_NOTICE)
    else:
        log.info("segmenter: %s on %s", ", ".join(segmenter.sources), segmenter.device)


def _setup_null(state: AppState, own_fetches: OwnFetches) -> None:
    """--weights null: no model; --simulated-gpus workers share one null engine (inference.null),
    each a thread of its own holding its own lease, as a GPU's worker does."""
    from inference.null import NullEngine

    from .engines import engine_options
    from .worker import Worker

    settings = state.settings
    engine = NullEngine(settings.null_delay_s, engine_options(settings, "null", own_fetches.mark(0)).engine_settings())
    state.models.append(engine.model)
    for index in range(settings.simulated_gpus):
        mark = own_fetches.mark(index)
        state.workers.append(Worker(engine, state.service, f"null:{index}", own_fetches=own_fetches, fetch_mark=mark))
    log.warning("NULL ENGINE: no model; %d simulated GPU(s), %.3g s a prediction", settings.simulated_gpus,
                settings.null_delay_s)
    if state.store.shared:
        _record_served(state, engine.model)
    for worker in state.workers:
        worker.start()
    state.setup_completed_at = time.time()
    state.phase = "READY"
    log.info("ready: %d worker(s)", len(state.workers))


def _record_served(state: AppState, model) -> None:
    try:
        state.store.record_served_model(f"{node_holder(state.settings.data_dir)}:{model.device}", dict(
            name=model.name, demo=model.demo, notice=model.notice, weights=model.source, device=model.device))
    except DatabaseUnavailable:  # the API nodes say nothing of this worker until it starts again
        log.warning("the database is away: the API nodes cannot be told that this worker serves %s", model.name)


def _stop_workers(state: AppState) -> None:
    """Finish the running prediction if it ends within the grace time, otherwise re-queue it."""
    for worker in state.workers:
        worker.stop()
    for worker in state.workers:
        worker.join(timeout=SHUTDOWN_GRACE_S)
        if worker.is_alive() and worker.current:
            state.service.lifecycle.requeue_requested.add(worker.current)
            worker.join(timeout=10)


async def _janitor(clean) -> None:
    """Run ``clean`` (retention: PredictionService.expire) every JANITOR_S, for the server's life."""
    while True:
        try:
            await asyncio.get_running_loop().run_in_executor(None, clean)
        except DatabaseUnavailable:
            pass  # cleaned at a later turn, once the database is back
        except Exception:
            log.exception("cleaning expired outputs failed")
        await asyncio.sleep(JANITOR_S)
