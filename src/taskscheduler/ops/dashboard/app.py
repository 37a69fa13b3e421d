"""The dashboard's web app (Starlette): a page, its static files, JSON endpoints, a live event stream, actions.

Actions (cancel, requeue, pause, resume, bulk requeue: :mod:`.actions`) go through the public Scheduler API. They
are POSTs that need a custom header (a cross-site form cannot send one, so no other web page can trigger them),
and with ``token`` the token as ``Authorization: Bearer TOKEN``; otherwise 403 and nothing changes.
``read_only`` answers every action with 403. Every value from job data reaches the page as JSON and is put into
the page as text, never as markup. Every parameter comes in the query string, which is bounded before anything
is parsed; no endpoint reads a request body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bson import ObjectId
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ...client.process import Process
from ...client.scheduler import Scheduler
from ...constants import VERSION, JobStatus
from ...errors import InvalidArgumentError, JobNotFoundError, ServerUnavailableError
from ...store.views import JobView
from .actions import ACTION_HEADER, bulk_preview, bulk_query, bulk_requeue, refusal
from .limits import MAX_STREAMS
from .live import Broadcaster, Message
from .views import MAX_ROWS, MAX_RUNS, counts_view, job_details, job_query

__all__ = ["ACTION_HEADER", "STATIC", "create_app"]

STATIC = Path(__file__).resolve().parent / "static"
#: What the page can do to a job (POST /api/jobs/ID/ACTION).
ACTIONS = ("cancel", "requeue")
#: What the page can do to a class, a limit key or every job (POST /api/flow/ACTION?key=KEY).
FLOW_ACTIONS = ("pause", "resume")
#: Seconds between keep-alive comments on an idle event stream (proxies close silent connections).
KEEPALIVE_SECONDS = 15.0
#: Longest query string answered, in bytes (the page's own filters take a few hundred): longer ones get 414 before
#: anything is parsed or read, so no request can make the server match a huge filter.
MAX_QUERY_BYTES = 2048
#: Longest class filter of the job table, in characters.
MAX_CLASS_FILTER = 512
#: Seconds a page refused for too many live streams is told to wait before it tries again (``Retry-After``).
STREAM_RETRY_SECONDS = 15
#: Only our own files: no inline script, no third-party origin, not framed by another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    scheduler: Scheduler,
    read_only: bool = False,
    token: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_streams: int = MAX_STREAMS,
) -> Starlette:
    """The dashboard of ``scheduler``'s jobs. ``allowed_hosts``: Host headers answered (None: any);
    ``max_streams``: live streams (open pages) served at once, 503 beyond."""
    feed = Broadcaster(scheduler, max_streams)
    views = _Endpoints(scheduler, feed, read_only, token)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feed.start()
        yield
        await asyncio.to_thread(feed.stop)

    routes = [
        Route("/", views.index),
        Route("/api/config", views.config),
        Route("/api/summary", views.summary),
        Route("/api/jobs", views.jobs),
        Route("/api/jobs/{job_id}", views.job),
        Route("/api/jobs/{job_id}/{action:str}", views.action, methods=["POST"]),
        Route("/api/trends", views.trends),
        Route("/api/flow", views.flow),
        Route("/api/flow/{action:str}", views.flow_action, methods=["POST"]),
        Route("/api/schedules", views.schedules),
        Route("/api/bulk/requeue", views.bulk_preview),
        Route("/api/bulk/requeue", views.bulk_requeue, methods=["POST"]),
        Route("/api/stream", views.stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    middleware.append(Middleware(_BoundedQuery))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.feed = feed
    return app


class _Endpoints:
    """The handlers. Plain ``def`` ones run in Starlette's thread pool (they call pymongo, which blocks)."""

    def __init__(self, scheduler: Scheduler, feed: Broadcaster, read_only: bool, token: str | None) -> None:
        self.scheduler = scheduler
        self.feed = feed
        self.read_only = read_only
        self.token = token

    def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    def config(self, request: Request) -> Response:
        return _json(
            {
                "read_only": self.read_only,
                "token_required": self.token is not None,
                "version": VERSION,
                "database": self.scheduler.store.db.name,
            }
        )

    def summary(self, request: Request) -> Response:
        if not self.feed.nodes:
            self.feed.refresh_nodes()
        return _json({"counts": counts_view(self.scheduler.store.status_counts()), "nodes": self.feed.nodes})

    def jobs(self, request: Request) -> Response:
        params = request.query_params
        job_class, refused = _class_filter(request)
        if refused is not None:
            return refused
        query = job_query(params.get("status", "").split(","), job_class, params.get("id"))
        if query is None:
            return _json({"jobs": [], "total": 0})
        try:
            limit = max(1, min(MAX_ROWS, int(params.get("limit", MAX_ROWS))))
        except ValueError:
            return _error(400, f"limit must be a number, got {params.get('limit')!r}")
        store = self.scheduler.store
        docs = store.newest_jobs(query, limit)
        rows = self.feed.rows([Process(doc, self.scheduler) for doc in docs])
        return _json({"jobs": rows, "total": store.count_jobs(query)})

    def job(self, request: Request) -> Response:
        job_id = _job_id(request)
        if job_id is None:
            return _error(404, "not a job id")
        store = self.scheduler.store
        doc = store.find_job(job_id)
        if doc is None:
            return _error(404, f"no job {job_id}")
        process = Process(doc, self.scheduler)
        events, total = store.recent_run_events(job_id, MAX_RUNS)
        job = JobView(doc)
        status = job.status_value
        waiting = type(status) is int and status in (int(JobStatus.WAITING), int(JobStatus.POSTPONED))
        blocked = process.blocked_by if waiting else []  # only a job not yet started can be blocked
        served = self.feed.served_modules()
        details = job_details(process, self.feed.labels, events, total, job.outcome_value, served, blocked)
        return _json(details)

    def action(self, request: Request) -> Response:
        if request.path_params["action"] not in ACTIONS:
            return _error(404, f"no action {request.path_params['action']!r}")
        refused = self._refuse(request)
        if refused is not None:
            return refused
        job_id = _job_id(request)
        if job_id is None:
            return _error(404, "not a job id")
        try:
            if request.path_params["action"] == "cancel":
                self.scheduler.cancel_job(job_id)
                process = self.scheduler.get_job(job_id)
            else:
                process = self.scheduler.requeue_job(job_id)
        except JobNotFoundError:
            return _error(404, f"no job {job_id}")
        except InvalidArgumentError as exc:  # e.g. canceling a job that has ended
            return _error(409, str(exc).splitlines()[0])
        (row,) = self.feed.rows([process])
        return _json(row)

    def trends(self, request: Request) -> Response:
        return _json(self.feed.trends.get())

    def flow(self, request: Request) -> Response:
        return _json(self.feed.flow.get())

    def flow_action(self, request: Request) -> Response:
        """Pause or resume ``key`` (a class, a limit key, or ``*`` for every job); answers the flow panel."""
        action = request.path_params["action"]
        if action not in FLOW_ACTIONS:
            return _error(404, f"no action {action!r}")
        refused = self._refuse(request)
        if refused is not None:
            return refused
        key = request.query_params.get("key", "")
        try:
            (self.scheduler.pause if action == "pause" else self.scheduler.resume)(key)
        except InvalidArgumentError as exc:
            return _error(400, str(exc).splitlines()[0])
        return _json(self.feed.flow.get(fresh=True))

    def schedules(self, request: Request) -> Response:
        return _json(self.feed.schedules.get())

    def bulk_preview(self, request: Request) -> Response:
        """How many jobs ``POST /api/bulk/requeue`` with the same filter would requeue."""
        query, refused = _bulk_query(request)
        if refused is not None:
            return refused
        return _json(bulk_preview(self.scheduler, query))

    def bulk_requeue(self, request: Request) -> Response:
        """Requeue the FAILED/TIMEOUT jobs of the filter, at most ``expected`` (the count the page confirmed)."""
        refused = self._refuse(request)
        if refused is not None:
            return refused
        query, refused = _bulk_query(request)
        if refused is not None:
            return refused
        try:
            expected = int(request.query_params.get("expected", ""))
        except ValueError:
            return _error(400, "expected must be the number of jobs confirmed, e.g. expected=12")
        try:
            return _json(bulk_requeue(self.scheduler, query, expected))
        except ServerUnavailableError as exc:  # stopped at the first job the server could not be asked about
            return _error(503, str(exc))

    def _refuse(self, request: Request) -> Response | None:
        """Why an action is refused (checked before anything is read), or None."""
        refused = refusal(self.read_only, self.token, request.headers)
        return _error(*refused) if refused is not None else None

    async def stream(self, request: Request) -> Response:
        queue = self.feed.subscribe()
        if queue is None:
            response = _error(503, f"too many live streams open ({self.feed.max_streams}); try again later")
            response.headers["Retry-After"] = str(STREAM_RETRY_SECONDS)
            return response
        return _Stream(self.feed, queue, request)


class _Stream(StreamingResponse):
    """A page's event stream, which gives its subscription back however the response ends, even when the page
    left before the first event (the generator's own ``finally`` would then never run)."""

    def __init__(self, feed: Broadcaster, queue: asyncio.Queue[Message | None], request: Request) -> None:
        super().__init__(
            _events(feed, queue, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.feed = feed
        self.queue = queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.feed.unsubscribe(self.queue)


class _BoundedQuery:
    """Answers 414 to a request whose query string is longer than :data:`MAX_QUERY_BYTES`, before any endpoint
    parses it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = len(scope.get("query_string", b"")) if scope["type"] == "http" else 0
        if size > MAX_QUERY_BYTES:
            await _error(414, f"query string too long ({size} bytes, at most {MAX_QUERY_BYTES})")(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _events(feed: Broadcaster, queue: asyncio.Queue[Message | None], request: Request) -> AsyncIterator[str]:
    """One page's server-sent events (``queue``: its subscription): ``ready`` once the feed is open (the page then
    loads what it shows, missing no change made after), then ``job``, ``counts`` and ``nodes`` as they come."""
    try:
        await asyncio.to_thread(feed.wait_ready, 10.0)
        yield "retry: 2000\nevent: ready\ndata: {}\n\n"
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            if message is None:
                return
            event, data = message
            yield f"event: {event}\ndata: {data}\n\n"
    finally:
        feed.unsubscribe(queue)


def _class_filter(request: Request) -> tuple[str | None, Response | None]:
    """The class filter of a request (None: none), or the refusal of one too long."""
    job_class = request.query_params.get("class") or None
    if job_class is not None and len(job_class) > MAX_CLASS_FILTER:
        return None, _error(400, f"class filter too long ({len(job_class)} characters, at most {MAX_CLASS_FILTER})")
    return job_class, None


def _bulk_query(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
    job_class, refused = _class_filter(request)
    if refused is not None:
        return None, refused
    params = request.query_params
    return bulk_query(params.get("status", ""), job_class, params.get("id")), None


def _job_id(request: Request) -> ObjectId | None:
    value = str(request.path_params["job_id"])
    return ObjectId(value) if ObjectId.is_valid(value) else None


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(value, status_code=status, headers={"Cache-Control": "no-store", **SECURITY_HEADERS})


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": message}, status)
