"""HTTP targets on loopback: small aiohttp servers that answer like the real APIs.

* ``ServiceNow`` — the Table API (``/api/now/table/{table}[/{sys_id}]``): basic
  auth, ``{"result": ...}`` envelopes, sys_id and number generation, journal
  fields (``work_notes``, ``comments``) kept apart like the real journal.
* ``PrometheusApi`` — ``/api/v1/query``: tests decide what a query returns
  (``set_vector``) or make every query answer an error (``error``).
* ``AlertmanagerApi`` — API v2 silences (create/update, list with ``filter``,
  get, expire) and alerts (list with silencedBy, post).
* ``SlackWebhook`` — an incoming webhook: answers ``ok`` as text, ``no_text``
  and ``invalid_payload`` as 400s.
* ``HttpEcho`` — ``/echo`` answers the request back (headers included, so a
  test can prove a secret the server saw does not reach a result; ``peer`` is
  the client's address, to see connection reuse), ``/status/{code}``,
  ``/bytes/{n}`` (n bytes of text), ``/basic`` and ``/bearer`` (auth checks
  that echo a wrong Authorization back, as careless servers do).

Every target records ``requests`` and can be told to fail the next N requests
(``fail_next``) or to hold them until the target stops (``hang_next``). Each
is started on a free port by a function-scoped fixture of the same snake name.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest_asyncio
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


def _json(data: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json", headers=headers)


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Target:
    """One aiohttp app on 127.0.0.1:<free port>; subclasses add routes."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.url = ""
        self._faults: list[tuple[int, str]] = []
        self._hang = 0
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def fail_next(self, n: int = 1, status: int = 500, body: str = "Internal Server Error"
                  ) -> None:
        self._faults.extend([(status, body)] * n)

    def hang_next(self, n: int = 1) -> None:
        self._hang += n

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(
            request.method, request.path,
            {k: request.query.getall(k) for k in request.query},
            {str(k): v for k, v in request.headers.items()}, body))
        if self._hang > 0:
            self._hang -= 1
            assert self._release is not None
            await self._release.wait()
        if self._faults:
            status, text = self._faults.pop(0)
            return web.Response(status=status, text=text)
        return await handler(request)

    async def start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class ServiceNow(Target):
    PREFIXES = {"incident": "INC", "change_request": "CHG", "problem": "PRB"}
    JOURNAL = ("work_notes", "comments")

    def __init__(self, username: str = "loopd", password: str = "sn-pass-0123") -> None:
        super().__init__()
        self.username, self.password = username, password
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}
        self.journal: dict[str, list[tuple[str, str]]] = {}  # sys_id -> (element, value)
        self._numbers: dict[str, int] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/now/table/{table}", self._create)
        app.router.add_get("/api/now/table/{table}", self._list)
        app.router.add_get("/api/now/table/{table}/{sys_id}", self._get)
        app.router.add_patch("/api/now/table/{table}/{sys_id}", self._update)
        app.router.add_put("/api/now/table/{table}/{sys_id}", self._update)
        app.router.add_delete("/api/now/table/{table}/{sys_id}", self._delete)

    # -- for tests -------------------------------------------------------------------

    @property
    def incidents(self) -> list[dict[str, Any]]:
        return list(self.tables.get("incident", {}).values())

    def notes(self, sys_id: str, element: str = "work_notes") -> list[str]:
        return [v for e, v in self.journal.get(sys_id, []) if e == element]

    def add(self, table: str, fields: dict[str, Any]) -> str:
        """Create a record directly (e.g. a CI) and return its sys_id."""
        return str(self._insert(table, fields)["sys_id"])

    # -- the Table API ---------------------------------------------------------------

    @staticmethod
    def _failure(status: int, message: str, detail: str) -> web.Response:
        return _json({"error": {"message": message, "detail": detail}, "status": "failure"},
                     status)

    def _authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    async def _fields(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not self._authorized(request):
            return self._failure(401, "User Not Authenticated",
                                 "Required to provide Auth information")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return self._failure(400, "Exception while reading request",
                                 "The payload is not valid JSON.")
        return body

    def _insert(self, table: str, fields: dict[str, Any]) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        sys_id = uuid.uuid4().hex
        record: dict[str, Any] = {"sys_id": sys_id, "sys_class_name": table,
                                  "sys_created_on": now, "sys_updated_on": now}
        if table in self.PREFIXES:
            self._numbers[table] = self._numbers.get(table, 10000) + 1
            record.update(number=f"{self.PREFIXES[table]}{self._numbers[table]:07d}", state="1")
        self.tables.setdefault(table, {})[sys_id] = record
        self._apply(record, fields)
        return record

    def _apply(self, record: dict[str, Any], fields: dict[str, Any]) -> None:
        for name, value in fields.items():
            if name.startswith("sys_"):
                continue
            if name in self.JOURNAL:  # journal fields read back empty, like the real one
                if value not in (None, ""):
                    self.journal.setdefault(record["sys_id"], []).append((name, str(value)))
                record[name] = ""
            else:
                record[name] = "" if value is None else str(value)
        record["sys_updated_on"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())

    def _record(self, request: web.Request) -> dict[str, Any] | None:
        table = self.tables.get(request.match_info["table"], {})
        return table.get(request.match_info["sys_id"])

    async def _create(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        if isinstance(fields, web.Response):
            return fields
        record = self._insert(request.match_info["table"], fields)
        location = f"{self.url}/api/now/table/{record['sys_class_name']}/{record['sys_id']}"
        return _json({"result": record}, 201, Location=location)

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._failure(401, "User Not Authenticated",
                                 "Required to provide Auth information")
        records = list(self.tables.get(request.match_info["table"], {}).values())
        for cond in filter(None, request.query.get("sysparm_query", "").split("^")):
            name, _, value = cond.partition("=")
            records = [r for r in records if r.get(name) == value]
        limit = int(request.query.get("sysparm_limit", "10000"))
        return _json({"result": records[:limit]}, 200, **{"X-Total-Count": str(len(records))})

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._failure(401, "User Not Authenticated",
                                 "Required to provide Auth information")
        record = self._record(request)
        if record is None:
            return self._failure(404, "No Record found",
                                 "Record doesn't exist or ACL restricts the record retrieval")
        return _json({"result": record})

    async def _update(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        if isinstance(fields, web.Response):
            return fields
        record = self._record(request)
        if record is None:
            return self._failure(404, "No Record found",
                                 "Record doesn't exist or ACL restricts the record retrieval")
        self._apply(record, fields)
        return _json({"result": record})

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._failure(401, "User Not Authenticated",
                                 "Required to provide Auth information")
        if self._record(request) is None:
            return self._failure(404, "No Record found", "Record doesn't exist")
        del self.tables[request.match_info["table"]][request.match_info["sys_id"]]
        return web.Response(status=204)


class PrometheusApi(Target):
    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.error: tuple[int, str, str] | None = None  # (status, errorType, error)
        self.queries: list[str] = []

    def set_vector(self, query: str, *samples: tuple[dict[str, str], float]) -> None:
        """What ``query`` returns from now on: one series per (labels, value)."""
        self.results[query] = [{"metric": labels, "value": [time.time(), repr(float(value))]}
                               for labels, value in samples]

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/query", self._query)
        app.router.add_post("/api/v1/query", self._query)

    async def _query(self, request: web.Request) -> web.Response:
        form = await request.post() if request.method == "POST" else {}
        query = request.query.get("query") or form.get("query")
        if not isinstance(query, str) or not query:
            return _json({"status": "error", "errorType": "bad_data",
                          "error": 'invalid parameter "query": unknown position'}, 400)
        self.queries.append(query)
        if self.error is not None:
            status, kind, message = self.error
            return _json({"status": "error", "errorType": kind, "error": message}, status)
        return _json({"status": "success", "data": {
            "resultType": "vector", "result": self.results.get(query, [])}})


_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"(.*)"\s*$')


def _filters(request: web.Request) -> list[tuple[str, str, str]] | web.Response:
    out = []
    for text in request.query.getall("filter", []):
        m = _MATCHER.match(text)
        if m is None:
            return _json(f"bad matcher format: {text}", 400)
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


def _holds(op: str, pattern: str, value: str | None) -> bool:
    value = value or ""
    if op == "=":
        return value == pattern
    if op == "!=":
        return value != pattern
    found = re.fullmatch(pattern, value) is not None
    return found if op == "=~" else not found


class AlertmanagerApi(Target):
    def __init__(self) -> None:
        super().__init__()
        self.silences: dict[str, dict[str, Any]] = {}
        self.alerts: list[dict[str, Any]] = []

    def fire(self, **labels: str) -> dict[str, Any]:
        """Add a firing alert with these labels."""
        alert = {"labels": labels, "annotations": {}, "startsAt": _rfc3339(time.time()),
                 "endsAt": _rfc3339(time.time() + 3600), "generatorURL": "",
                 "fingerprint": uuid.uuid4().hex[:16]}
        self.alerts.append(alert)
        return alert

    def state(self, silence: dict[str, Any]) -> str:
        now = time.time()
        if _parse_time(silence["endsAt"]) <= now:
            return "expired"
        return "pending" if _parse_time(silence["startsAt"]) > now else "active"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v2/silences", self._post_silence)
        app.router.add_get("/api/v2/silences", self._list_silences)
        app.router.add_get("/api/v2/silence/{id}", self._get_silence)
        app.router.add_delete("/api/v2/silence/{id}", self._delete_silence)
        app.router.add_get("/api/v2/alerts", self._list_alerts)
        app.router.add_post("/api/v2/alerts", self._post_alerts)

    def _view(self, silence: dict[str, Any]) -> dict[str, Any]:
        return {**silence, "status": {"state": self.state(silence)}}

    async def _post_silence(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json("parsing silence body: invalid JSON", 400)
        problem = _silence_problem(body)
        if problem:
            return _json(f"silence invalid: {problem}", 400)
        sid = body.get("id") or str(uuid.uuid4())
        if body.get("id") and sid not in self.silences:
            return _json(f"silence {sid} not found", 404)
        self.silences[sid] = {
            "id": sid, "matchers": body["matchers"], "startsAt": body["startsAt"],
            "endsAt": body["endsAt"], "createdBy": body["createdBy"],
            "comment": body["comment"], "updatedAt": _rfc3339(time.time())}
        return _json({"silenceID": sid})

    async def _list_silences(self, request: web.Request) -> web.Response:
        filters = _filters(request)
        if isinstance(filters, web.Response):
            return filters
        out = []
        for silence in self.silences.values():
            by_name = {m["name"]: m["value"] for m in silence["matchers"]}
            if all(name in by_name and _holds(op, value, by_name[name])
                   for name, op, value in filters):
                out.append(self._view(silence))
        return _json(out)

    async def _get_silence(self, request: web.Request) -> web.Response:
        silence = self.silences.get(request.match_info["id"])
        if silence is None:
            return _json(f"silence {request.match_info['id']} not found", 404)
        return _json(self._view(silence))

    async def _delete_silence(self, request: web.Request) -> web.Response:
        silence = self.silences.get(request.match_info["id"])
        if silence is None:
            return _json(f"silence {request.match_info['id']} not found", 404)
        if self.state(silence) == "expired":
            return _json(f"silence {silence['id']} already expired", 500)
        silence["endsAt"] = silence["updatedAt"] = _rfc3339(time.time())
        return web.Response(status=200)

    def _silenced_by(self, labels: dict[str, str]) -> list[str]:
        return [s["id"] for s in self.silences.values() if self.state(s) == "active" and all(
            _holds("=~" if m.get("isRegex") else "=", m["value"], labels.get(m["name"]))
            != (m.get("isEqual") is False) for m in s["matchers"])]

    async def _list_alerts(self, request: web.Request) -> web.Response:
        filters = _filters(request)
        if isinstance(filters, web.Response):
            return filters
        want_silenced = request.query.get("silenced", "true") == "true"
        out = []
        for alert in self.alerts:
            labels = alert["labels"]
            if not all(_holds(op, value, labels.get(name)) for name, op, value in filters):
                continue
            silenced = self._silenced_by(labels)
            if silenced and not want_silenced:
                continue
            out.append({**alert, "receivers": [{"name": "default"}],
                        "updatedAt": _rfc3339(time.time()),
                        "status": {"state": "suppressed" if silenced else "active",
                                   "silencedBy": silenced, "inhibitedBy": []}})
        return _json(out)

    async def _post_alerts(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        for alert in body:
            self.alerts.append({"annotations": {}, "startsAt": _rfc3339(time.time()),
                                "endsAt": _rfc3339(time.time() + 300), "generatorURL": "",
                                "fingerprint": uuid.uuid4().hex[:16], **alert})
        return web.Response(status=200)


def _silence_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body is not an object"
    for name in ("matchers", "startsAt", "endsAt", "createdBy", "comment"):
        if not body.get(name):
            return f"{name} missing"
    matchers = body["matchers"]
    if not isinstance(matchers, list) or not all(
            isinstance(m, dict) and m.get("name") and "value" in m and "isRegex" in m
            for m in matchers):
        return "matchers need name, value and isRegex"
    try:
        if _parse_time(body["endsAt"]) <= _parse_time(body["startsAt"]):
            return "end time must not be before start time"
    except (TypeError, ValueError):
        return "startsAt/endsAt are not RFC 3339 times"
    return None


class SlackWebhook(Target):
    path = "/services/T0LOOPD/B0LOOPD/hookSecret0123456789"

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []

    @property
    def webhook_url(self) -> str:
        return f"{self.url}{self.path}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post(self.path, self._post)
        app.router.add_post("/services/{tail:.*}", self._unknown)

    async def _post(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.Response(status=400, text="invalid_payload", content_type="text/html")
        if not isinstance(body, dict):
            return web.Response(status=400, text="invalid_payload", content_type="text/html")
        if not body.get("text") and not body.get("blocks"):
            return web.Response(status=400, text="no_text", content_type="text/html")
        self.messages.append(body)
        return web.Response(text="ok", content_type="text/html")

    async def _unknown(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="no_service", content_type="text/html")


class HttpEcho(Target):
    def __init__(self, username: str = "echo-user", password: str = "echo-pass-0123",
                 token: str = "echo-token-0123456789") -> None:
        super().__init__()
        self.username, self.password, self.token = username, password, token

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/bytes/{n}", self._bytes)
        app.router.add_get("/basic", self._basic)
        app.router.add_get("/bearer", self._bearer)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = body.decode()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return _json({"method": request.method, "path": request.path, "peer": list(peer or ()),
                      "query": {k: request.query.getall(k) for k in request.query},
                      "headers": {str(k): v for k, v in request.headers.items()}, "body": parsed})

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"status {code} from echo")

    async def _bytes(self, request: web.Request) -> web.Response:
        return web.Response(text="x" * int(request.match_info["n"]), content_type="text/plain")

    async def _basic(self, request: web.Request) -> web.Response:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        got = request.headers.get("Authorization", "")
        if got != f"Basic {expected}":  # echoes what it got, as careless servers do
            return web.Response(status=401, text=f"bad credentials: {got}")
        return _json({"user": self.username})

    async def _bearer(self, request: web.Request) -> web.Response:
        got = request.headers.get("Authorization", "")
        if got != f"Bearer {self.token}":
            return web.Response(status=401, text=f"bad token: {got}")
        return _json({"authenticated": True, "saw": got})


@pytest_asyncio.fixture
async def servicenow() -> AsyncIterator[ServiceNow]:
    target = ServiceNow()
    await target.start()
    yield target
    await target.stop()


@pytest_asyncio.fixture
async def prometheus_api() -> AsyncIterator[PrometheusApi]:
    target = PrometheusApi()
    await target.start()
    yield target
    await target.stop()


@pytest_asyncio.fixture
async def alertmanager_api() -> AsyncIterator[AlertmanagerApi]:
    target = AlertmanagerApi()
    await target.start()
    yield target
    await target.stop()


@pytest_asyncio.fixture
async def slack_webhook() -> AsyncIterator[SlackWebhook]:
    target = SlackWebhook()
    await target.start()
    yield target
    await target.stop()


@pytest_asyncio.fixture
async def http_echo() -> AsyncIterator[HttpEcho]:
    target = HttpEcho()
    await target.start()
    yield target
    await target.stop()
