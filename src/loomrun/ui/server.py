"""`loomrun ui`: a web page of the jobs, another face of the same steering client.

The server listens on 127.0.0.1 only and lets in only who holds its token (printed in
the URL, like Jupyter's; kept in a same-site cookie once the page opened). It holds one
broker connection with the credentials of the user who started it: the page's replica
table comes from the same model as `watch` (watch.WatchModel), its curves from the
supervisors' metric history, its markers from the change ledger, and every control goes
through `Steering` with the same checks and answers as `loomrun set`.

One WebSocket per page carries what changes, at most UPDATES_PER_SECOND frames a second
whatever the number of replicas; controls are HTTP POSTs, each answered with the outcome
of its own change on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import secrets
import time
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from loomrun import params as P
from loomrun import subjects as S
from loomrun.client import SteerError, Steering, summary
from loomrun.control import history
from loomrun.control.ledger import record
from loomrun.watch import WatchModel, feed

UPDATES_PER_SECOND = 10
QUIET_REFRESH = 1.0  # seconds: a frame at least this often (ages, stale states move on)
MAX_BODY = 16 * 1024
COOKIE = "loomrun_ui"
_REPLICA = re.compile(r"r\d{1,5}")
_STATIC = {
    "app.js": "application/javascript",
    "app.css": "text/css",
    "vendor/uplot/uPlot.iife.min.js": "application/javascript",
    "vendor/uplot/uPlot.min.css": "text/css",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class RequestError(Exception):
    """A request that cannot be carried out: one line, and its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _static(name: str) -> bytes:
    return resources.files("loomrun.ui").joinpath("static", name).read_bytes()


def spec_dict(spec: P.ParamSpec, value: Any) -> dict[str, Any]:
    """A published parameter as the page builds its form from it."""
    kind = "enum" if spec.choices else spec.kind
    return {
        "name": spec.name,
        "kind": kind,
        "type": spec.type_name,
        "is_list": spec.is_list,
        "length": spec.length,
        "choices": list(spec.choices),
        "min": spec.min,
        "max": spec.max,
        "doc": spec.doc,
        "builtin": spec.builtin,
        "own": spec.default,
        "value": value,
    }


def parse_change(body: Any) -> tuple[str, dict[str, Any], list[str] | None, bool]:
    """A POST body of a change, checked for shape (values are checked by Steering):
    {"job": J, "params": {name: value}, "replicas": [r0, ...] | null, "force": bool}."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    job = body.get("job")
    if not isinstance(job, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", job):
        raise RequestError(400, "job must be a job id (letters, digits, - and _)")
    replicas = body.get("replicas")
    if replicas is not None and (
        not isinstance(replicas, list)
        or not replicas
        or not all(isinstance(r, str) and _REPLICA.fullmatch(r) for r in replicas)
    ):
        raise RequestError(400, "replicas must be a non-empty list of names like r0, or null")
    params = body.get("params", {})
    if not isinstance(params, dict) or len(params) > 64:
        raise RequestError(400, "params must be an object of at most 64 name: value pairs")
    for name, value in params.items():
        if not S.PARAM_NAME.match(name):
            raise RequestError(400, f"{name[:80]!r} is not a parameter name")
        if not isinstance(value, str | int | float | bool | list):
            raise RequestError(400, f"{name}: expected a value, got {type(value).__name__}")
    return job, params, replicas, bool(body.get("force", False))


class Dashboard:
    """The server's state: one broker connection, the live model, the pages open."""

    def __init__(self, steering: Steering, token: str, job: str | None = None):
        self.steering = steering
        self.token = token
        self.job = job
        self.model = WatchModel()
        self.pages: set[web.WebSocketResponse] = set()
        self.tasks: list[asyncio.Task] = []
        self.port = 0

    async def start(self) -> None:
        ready = asyncio.Event()
        self.tasks = await feed(self.steering, self.model, None, ready)
        await ready.wait()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for page in list(self.pages):
            await page.close()

    # -- the gate ------------------------------------------------------------------------

    def _allowed(self, request: web.Request) -> bool:
        given = request.cookies.get(COOKIE) or request.headers.get("X-Loomrun-Token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        return origin is None or origin in (
            f"http://127.0.0.1:{self.port}",
            f"http://localhost:{self.port}",
        )

    @web.middleware
    async def gate(self, request: web.Request, handler):
        try:
            if request.path == "/" and "token" in request.query:
                if not hmac.compare_digest(request.query["token"].encode(), self.token.encode()):
                    raise RequestError(403, "wrong token: open the URL `loomrun ui` printed")
                response = web.HTTPFound("/")  # the token leaves the address bar
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
                raise response
            if not self._allowed(request):
                raise RequestError(403, "no token: open the URL `loomrun ui` printed")
            changes = request.method != "GET" or request.path == "/ws"
            if changes and not self._same_origin(request):
                raise RequestError(403, "requests from another site are refused")
            response = await handler(request)
        except RequestError as error:
            response = web.json_response({"error": str(error)}, status=error.status)
        except web.HTTPRequestEntityTooLarge:
            response = web.json_response(
                {"error": f"the body is larger than {MAX_BODY} bytes"}, status=413
            )
        except web.HTTPException as error:
            if error.status < 400:
                raise
            response = web.json_response({"error": error.reason}, status=error.status)
        if not isinstance(response, web.WebSocketResponse):
            response.headers.update(_SECURITY_HEADERS)
        return response

    # -- pages and files -----------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise RequestError(404, f"no file {name[:80]!r}")
        return web.Response(body=_static(name), content_type=_STATIC[name])

    # -- controls ------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not JSON ({error})") from None

    async def _known(self, job: str) -> None:
        if job not in {j.job for j in await self.steering.jobs()}:
            raise RequestError(404, f"no job {job!r} on this broker")

    async def set(self, request: web.Request) -> web.Response:
        job, params, replicas, force = parse_change(await self._body(request))
        if not params:
            raise RequestError(400, "params is empty: nothing to change")
        await self._known(job)
        texts = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        return await self._answer(self.steering.set(job, texts, replicas, force=force))

    async def pause(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        job, _, replicas, force = parse_change(body)
        paused = body.get("paused")
        if not isinstance(paused, bool):
            raise RequestError(400, "paused must be true or false")
        await self._known(job)
        return await self._answer(self.steering.pause(job, paused, replicas, force=force))

    async def _answer(self, change) -> web.Response:
        try:
            results = await change
        except SteerError as error:
            raise RequestError(400, str(error)) from None
        return web.json_response(
            {"result": summary(results), "changes": [r.as_dict() for r in results]}
        )

    # -- the live page -------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.WebSocketResponse:
        page = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        await page.prepare(request)
        self.pages.add(page)
        feeds: list[asyncio.Task] = []
        sender = asyncio.ensure_future(self._frames(page, request))
        try:
            async for msg in page:
                if msg.type != WSMsgType.TEXT:
                    continue
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    ask = json.loads(msg.data)
                    if ask.get("type") == "select" and isinstance(ask.get("job"), str):
                        for task in feeds:
                            task.cancel()
                        request["job"] = ask["job"]
                        feeds = [asyncio.ensure_future(self._job_feed(page, ask["job"]))]
        finally:
            self.pages.discard(page)
            for task in [sender, *feeds]:
                task.cancel()
        return page

    async def _frames(self, page: web.WebSocketResponse, request: web.Request) -> None:
        """The table and the jobs, at most UPDATES_PER_SECOND times a second, and only
        when something changed (or QUIET_REFRESH passed: ages move on)."""
        seen, last = -1, 0.0
        while not page.closed:
            now = time.time()
            if self.model.updates != seen or now - last >= QUIET_REFRESH:
                seen, last = self.model.updates, now
                everything = self.model.snapshot(now)
                jobs = [
                    {"job": j["job"], "state": j["state"], "replicas": j["totals"]["replicas"]}
                    for j in everything["jobs"]
                ]
                job = request.get("job") or self.job
                if job is None and jobs:
                    job = jobs[-1]["job"]
                shown = self.model.snapshot(now, job) if job else everything
                await self._send(page, {"type": "frame", "list": jobs, "job": job, **shown})
            await asyncio.sleep(1 / UPDATES_PER_SECOND)

    async def _job_feed(self, page: web.WebSocketResponse, job: str) -> None:
        """For the job chosen: its metric history, its schema, then its change ledger,
        from the first record on, in batches at most UPDATES_PER_SECOND a second."""
        with contextlib.suppress(SteerError):
            found = await self.steering.job(job)
            series = await self.steering.history(job, found.replicas)
            await self._send(page, {
                "type": "history", "job": job,
                "series": {r: history.series_dict(s) for r, s in series.items()},
            })  # fmt: skip
        records: asyncio.Queue[dict] = asyncio.Queue()

        async def read() -> None:
            async for outcome in self.steering.ledger(job, follow=True):
                records.put_nowait(record(job, outcome))

        helpers = [asyncio.ensure_future(read()), asyncio.ensure_future(self._schemas(page, job))]
        try:
            while not page.closed:
                batch = [await records.get()]
                while not records.empty():
                    batch.append(records.get_nowait())
                await self._send(page, {"type": "changes", "job": job, "records": batch})
                await asyncio.sleep(1 / UPDATES_PER_SECOND)
        finally:
            for task in helpers:
                task.cancel()

    async def _schemas(self, page: web.WebSocketResponse, job: str) -> None:
        """The forms' parameters, sent again when a replica publishes new ones."""
        sent = None
        while not page.closed:
            with contextlib.suppress(SteerError):
                schemas = await self.steering.schemas(job)
                statuses = await self.steering.statuses(job)
                params = {}
                for replica, schema in schemas.items():
                    values = statuses[replica].status.values if replica in statuses else {}
                    params[replica] = [
                        spec_dict(spec, P.from_pb(values[n]) if n in values else spec.default)
                        for n, spec in sorted(schema.specs.items())
                    ]
                shape = {r: [(p["name"], p["type"]) for p in ps] for r, ps in params.items()}
                if shape != sent:
                    sent = shape
                    await self._send(page, {"type": "schema", "job": job, "params": params})
            await asyncio.sleep(2.0)

    async def _send(self, page: web.WebSocketResponse, message: dict) -> None:
        if not page.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await page.send_str(json.dumps(message, default=str))

    # -- the app -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.gate], client_max_size=MAX_BODY)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name:.+}", self.static)
        app.router.add_get("/ws", self.live)
        app.router.add_post("/api/set", self.set)
        app.router.add_post("/api/pause", self.pause)
        return app


async def serve(options, job: str | None, port: int, ready) -> None:
    """Run the dashboard until cancelled; `ready(url)` once it listens."""
    token = secrets.token_urlsafe(24)
    async with Steering.connect(options) as steering:
        dashboard = Dashboard(steering, token, job)
        await dashboard.start()
        runner = web.AppRunner(dashboard.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        dashboard.port = site._server.sockets[0].getsockname()[1]
        ready(f"http://127.0.0.1:{dashboard.port}/?token={token}")
        try:
            await asyncio.Event().wait()
        finally:
            await dashboard.close()
            await runner.cleanup()
