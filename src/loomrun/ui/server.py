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
import hashlib
import hmac
import json
import secrets
import time
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from loomrun import fields, paramdoc
from loomrun import params as P
from loomrun import subjects as S
from loomrun.client import SteerError, Steering, parameters, summary
from loomrun.records import record, series_dict
from loomrun.watch import WatchModel, feed

UPDATES_PER_SECOND = 10
QUIET_REFRESH = 1.0  # seconds: a frame at least this often (ages, stale states move on)
MAX_BODY = 16 * 1024
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
RECORDS_PER_MESSAGE = 2000  # ledger records in one WebSocket message, at most
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


def cookie_name(token: str) -> str:
    """The cookie a server's token is kept in, named after the token: every `loomrun ui`
    has its own, even two reached through tunnels to the same remote port (cookies are kept
    per host, not per port). The name tells nothing of the token."""
    return "loomrun_ui_" + hashlib.sha256(token.encode()).hexdigest()[:16]


class RequestError(Exception):
    """A request that cannot be carried out: one line, and its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _static(name: str) -> bytes:
    return resources.files("loomrun.ui").joinpath("static", name).read_bytes()


_KINDS = {"number": "float", "integer": "int", "boolean": "bool", "string": "str"}


def forms(spec: P.ParamSpec, listed: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's forms of one parameter, built from its JSON Schema (as `loomrun schema
    --format json` prints it), with its value in effect, the script's own, and whether
    loomrun steers (holds) it (client.parameters). A structured one has a form for the
    whole value (JSON), and one per field, named by its path."""
    out = []
    for path, prop, value, own in _nodes(spec.name, paramdoc.value_schema(spec), listed):
        keys = fields.split(path)[1]
        out.append({
            "name": path, **_input(prop), "doc": prop.get("description", ""),
            "type": fields.field_spec(spec, keys).type_name if keys else spec.type_name,
            "builtin": spec.builtin, "own": own, "value": value,
            "steered": listed["steered"], "held": listed["held"],
        })  # fmt: skip
    return out


def _input(prop: dict[str, Any]) -> dict[str, Any]:
    """What input a value of this JSON Schema takes: a choice, a number (with bounds), a
    switch, a text (a list of plain values, comma separated), or JSON (an object)."""
    kind, is_list, length = prop.get("type"), False, 0
    if kind == "array" and prop.get("items", {}).get("type") != "object":
        is_list, length, prop = True, prop.get("minItems", 0), prop.get("items", {})
        kind = prop.get("type")
    choices = prop.get("enum", [])
    form = "enum" if choices else "json" if kind in ("object", "array") else _KINDS.get(kind)
    return {
        "kind": form, "is_list": is_list, "length": length, "choices": choices,
        "min": prop.get("minimum"), "max": prop.get("maximum"),
    }  # fmt: skip


def _nodes(path: str, prop: dict[str, Any], listed: dict[str, Any]):
    """The parameter, then each field within it: (path, its schema, value, own value); a
    list's items and a dict's keys as the value in effect has them."""
    value, own = listed["value"], listed["own"]
    yield path, prop, value, own
    if prop.get("type") == "object" and "properties" in prop:
        inner = [(key, sub) for key, sub in prop["properties"].items()]
    elif prop.get("type") == "object" and isinstance(value, dict):
        inner = [(key, prop.get("additionalProperties", {})) for key in value]
    elif prop.get("type") == "array" and prop.get("items", {}).get("type") == "object":
        inner = [(i, prop["items"]) for i in range(len(value) if isinstance(value, list) else 0)]
    else:
        return
    for key, sub in inner:
        got = fields.value_at(value, [str(key)])
        mine = fields.value_at(own, [str(key)])
        yield from _nodes(fields.join(path, key), sub, {"value": got, "own": mine})


def parse_change(body: Any) -> tuple[str, dict[str, Any], list[str] | None, bool]:
    """A POST body of a change, checked for shape (values are checked by Steering):
    {"job": J, "params": {name: value}, "replicas": [r0, ...] | null, "force": bool}."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    job = body.get("job")
    if not isinstance(job, str) or not S.JOB_ID.fullmatch(job):
        raise RequestError(400, "job must be a job id (letters, digits, - and _)")
    replicas = body.get("replicas")
    if replicas is not None and (
        not isinstance(replicas, list)
        or not replicas
        or not all(isinstance(r, str) and S.REPLICA_NAME.fullmatch(r) for r in replicas)
    ):
        raise RequestError(400, "replicas must be a non-empty list of names like r0, or null")
    params = body.get("params", {})
    if not isinstance(params, dict) or len(params) > 64:
        raise RequestError(400, "params must be an object of at most 64 name: value pairs")
    for name, value in params.items():
        if not S.is_key(name):
            raise RequestError(400, f"{name[:80]!r} is not a parameter name, nor a field's path")
        if not isinstance(value, str | int | float | bool | list | dict):
            raise RequestError(400, f"{name}: expected a value, got {type(value).__name__}")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise RequestError(400, "force must be true or false")
    return job, params, replicas, force


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

    @property
    def cookie(self) -> str:
        return cookie_name(self.token)

    def _allowed(self, request: web.Request) -> bool:
        given = [request.cookies.get(self.cookie, ""), request.headers.get("X-Loomrun-Token", "")]
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given if g)

    def _local_host(self, request: web.Request) -> bool:
        """The page is asked for by a name of this machine (any port: an SSH tunnel may
        forward another one), not by a name a DNS rebinding pointed here."""
        host = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") else ""
        return host in _LOCAL_HOSTS

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        return origin is None or origin == f"http://{request.host}"

    @web.middleware
    async def gate(self, request: web.Request, handler):
        try:
            if not self._local_host(request):
                raise RequestError(403, "this page answers to 127.0.0.1 and localhost only")
            if request.path == "/" and "token" in request.query:
                if not hmac.compare_digest(request.query["token"].encode(), self.token.encode()):
                    raise RequestError(403, "wrong token: open the URL `loomrun ui` printed")
                response = web.HTTPFound("/")  # the token leaves the address bar
                response.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict")
                response.headers.update(_SECURITY_HEADERS)
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
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            said = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RequestError(400, f"the body is not JSON ({said})") from None

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
            {
                "result": summary(results),
                "changes": [{**r.as_dict(), "text": r.sentence()} for r in results],
            }
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
                try:
                    ask = json.loads(msg.data)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(ask, dict) or ask.get("type") != "select":
                    continue
                job, selection = ask.get("job"), ask.get("selection")
                if not isinstance(job, str) or not S.JOB_ID.fullmatch(job):
                    continue
                if not isinstance(selection, int) or isinstance(selection, bool):
                    continue
                for task in feeds:
                    task.cancel()
                request["job"] = job
                feeds = [asyncio.ensure_future(self._job_feed(page, job, selection))]
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

    async def _job_feed(self, page: web.WebSocketResponse, job: str, selection: int) -> None:
        """For the job chosen: its metric history, its schema, then its change ledger from
        its first record (the page keeps the newest), in messages of at most
        RECORDS_PER_MESSAGE records, at most UPDATES_PER_SECOND a second. Each message
        names the page's `selection`, so a page that chose again drops what was under way
        for its former choice."""
        with contextlib.suppress(SteerError):
            found = await self.steering.job(job)
            series = await self.steering.history(job, found.replicas)
            await self._send(page, {
                "type": "history", "job": job, "selection": selection,
                "series": {r: series_dict(s) for r, s in series.items()},
            })  # fmt: skip
        records: asyncio.Queue[dict] = asyncio.Queue()

        async def read() -> None:
            async for outcome in self.steering.ledger(job, follow=True):
                records.put_nowait(record(job, outcome))

        helpers = [
            asyncio.ensure_future(read()),
            asyncio.ensure_future(self._schemas(page, job, selection)),
        ]
        try:
            while not page.closed:
                batch = [await records.get()]
                while not records.empty() and len(batch) < RECORDS_PER_MESSAGE:
                    batch.append(records.get_nowait())
                await self._send(page, {
                    "type": "changes", "job": job, "selection": selection, "records": batch,
                })  # fmt: skip
                await asyncio.sleep(1 / UPDATES_PER_SECOND)
        finally:
            for task in helpers:
                task.cancel()

    async def _schemas(self, page: web.WebSocketResponse, job: str, selection: int) -> None:
        """The forms' parameters, sent again when what a replica published (or a value)
        changed."""
        sent = None
        while not page.closed:
            with contextlib.suppress(SteerError):
                schemas = await self.steering.schemas(job)
                statuses = await self.steering.statuses(job)
                outcomes = await self.steering.outcomes(job)
                params = {}
                for replica, schema in schemas.items():
                    status = statuses[replica].status if replica in statuses else None
                    listed = parameters(replica, schema.specs, status, outcomes)
                    params[replica] = [
                        form
                        for p in sorted(listed, key=lambda p: p["name"])
                        for form in forms(schema.specs[p["name"]], p)
                    ]
                if params != sent:
                    sent = params
                    await self._send(page, {
                        "type": "schema", "job": job, "selection": selection, "params": params,
                    })  # fmt: skip
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


class ListenError(Exception):
    """The port cannot be listened on; one line."""


async def serve(options, job: str | None, port: int, ready) -> None:
    """Run the dashboard until cancelled; `ready(url)` once it listens. With no job on the
    broker yet it listens all the same and shows the jobs as they come."""
    token = secrets.token_urlsafe(24)
    async with Steering.connect(options, reconnect=True) as steering:
        steering.job_ttl = 0.0  # every control reads the job afresh: nodes may have joined
        dashboard = Dashboard(steering, token, job)
        runner = web.AppRunner(dashboard.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise ListenError(f"cannot listen on 127.0.0.1:{port}: {error.strerror}") from None
        dashboard.port = site._server.sockets[0].getsockname()[1]
        ready(f"http://127.0.0.1:{dashboard.port}/?token={token}")
        try:
            while True:
                try:
                    await dashboard.start()
                    break
                except SteerError:  # no job has ever run on this broker: wait for one
                    await asyncio.sleep(2.0)
            await asyncio.Event().wait()
        finally:
            await dashboard.close()
            await runner.cleanup()
