"""The OpenAPI document of the public API (anon_ticket/openapi.json) held to the app's routes,
to README.md's "Public HTTP API" section and to real answers over loopback HTTP.

A route added to `Public.create_app` without documentation fails here, and so does a route or
status the README names that the document lacks. tests/process/test_openapi_fuzz.py fuzzes the
real process with the same document (schemathesis).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import trio

from actors.public import Public, PublicConfig
from anon_ticket import checkout, openapi
from anon_ticket.domain.ids import PaymentId
from anon_ticket.metrics import Metrics
from supervisors.mailbox import Mailbox
from tests.harness import Server, running_server
from tests.rawhttp import parse_response, read_until_closed

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT_FILE = ROOT / "anon_ticket" / "openapi.json"
DOC = openapi.document()
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DRAFT = "https://json-schema.org/draft/2020-12/schema"


# --- the document -------------------------------------------------------------------------


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s ("#/components/...") to the object they name."""
    while "$ref" in node:
        target: Any = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> operation object."""
    return {(method.upper(), path): op for path, item in DOC["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS}


def responses(method: str, path: str) -> dict[str, dict[str, Any]]:
    """The status codes one request can get: its operation's, or the path's answer to a
    method it does not list (`x-unlisted-methods`)."""
    op = operations().get((method, path))
    found = op["responses"] if op is not None else DOC["paths"][path]["x-unlisted-methods"]
    return {status: resolve(r) for status, r in found.items()}


def validator(schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator (formats too) whose refs resolve in the document."""
    return jsonschema_rs.validator_for(
        {"$schema": DRAFT, "components": DOC["components"], "allOf": [schema]},
        validate_formats=True)


def check_answer(method: str, path: str, status: int, headers: httpx.Headers | dict[str, str],
                 body: bytes) -> Any:
    """The answer is one the document lists for this request: its status, its required
    headers and their values, its content type and its body's schema."""
    documented = responses(method, path)
    assert str(status) in documented, f"{method} {path}: {status} is undocumented: {body!r}"
    spec = documented[str(status)]
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, header in spec.get("headers", {}).items():
        header = resolve(header)
        if header.get("required"):
            assert name.lower() in lowered, f"{method} {path} {status}: no {name} header"
        if name.lower() in lowered:
            value = lowered[name.lower()]
            assert validator(header["schema"]).is_valid(value), (name, value)
    content = spec.get("content")
    if content is None:
        assert body == b"", body
        return None
    assert lowered.get("content-type", "").split(";")[0] in content, lowered
    parsed = json.loads(body)
    schema = content[lowered["content-type"].split(";")[0]]["schema"]
    errors = [str(e) for e in validator(schema).iter_errors(parsed)]
    assert not errors, f"{method} {path} {status}: {parsed!r}: {errors}"
    return parsed


def check(resp: httpx.Response, path: str) -> Any:
    return check_answer(resp.request.method, path, resp.status_code, resp.headers, resp.content)


def test_the_document_is_openapi_3_1_with_valid_schemas() -> None:
    assert DOC["openapi"].startswith("3.1.")
    for name, schema in DOC["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid({"$schema": DRAFT, **schema}), name
    for (method, path), op in operations().items():
        assert op.get("operationId") and op.get("responses"), (method, path)
        for status, response in op["responses"].items():
            assert re.fullmatch(r"[1-5][0-9]{2}", status), (method, path, status)
            assert resolve(response).get("description"), (method, path, status)


def test_every_error_is_json_error_and_every_503_says_when_to_retry() -> None:
    error = {"$ref": "#/components/schemas/Error"}
    answers = [(f"{m} {p}", responses(m, p)) for m, p in operations()]
    answers += [(f"other methods {p}", responses("unlisted", p)) for p in DOC["paths"]]
    for request, documented in answers:
        for status, spec in documented.items():
            if int(status) < 400:
                continue
            schema = spec["content"]["application/json"]["schema"]
            assert schema == error or error in schema.get("oneOf", ()), (request, status)
            if status == "503":
                assert resolve(spec["headers"]["Retry-After"])["required"], request
            if status == "405":
                assert resolve(spec["headers"]["Allow"])["required"], request


def app_routes(*, page: bool = False) -> set[tuple[str, str]]:
    """(METHOD, path) of every rule of the public app, HEAD/OPTIONS (automatic) and Quart's
    static route aside, with werkzeug's `<name>` written as OpenAPI's `{name}`: the API's
    routes, or (`page`) the checkout page's, which are HTML for people and not part of the
    API the document describes (anon_ticket/checkout.py)."""
    cfg = PublicConfig(host="127.0.0.1", port=0, unix_socket=None, max_body_bytes=4096,
                       request_timeout=5, grace=1, network=None, primary_address=None,
                       min_confirmations=10, min_payment_amount=1)
    app = Public(cfg, Mailbox("storage"), Mailbox("filter"), Metrics()).create_app()
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        if rule.endpoint.startswith(checkout.BLUEPRINT + ".") != page:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes.add((method, path))
    return routes


def test_the_checkout_page_adds_only_its_own_routes_and_none_under_the_api() -> None:
    assert app_routes(page=True) == {
        ("GET", checkout.PAGE_PATH), ("POST", checkout.FORM_PATH),
        *(("GET", f"/checkout/{name}") for name in checkout.ASSETS)}
    api_paths = {path for _, path in app_routes()}
    for _, path in app_routes(page=True):
        assert not path.startswith("/api/") and path not in api_paths, path
        assert path not in DOC["paths"], path


def test_the_document_describes_exactly_the_apps_routes() -> None:
    documented = set(operations())
    served = app_routes()
    assert served - documented == set(), "routes served but not documented"
    assert documented - served == set(), "routes documented but not served"
    assert ("GET", openapi.PATH) in documented
    for path, item in DOC["paths"].items():  # every path says what other methods get
        assert set(item["x-unlisted-methods"]) == {"405"}, path


# --- README.md ----------------------------------------------------------------------------

ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`")
STATUS = re.compile(r"(?<![\w.,/-])([1-5][0-9]{2})(?![\w.,/-]*\w)")


def readme_api() -> tuple[set[int], dict[tuple[str, str], set[int]]]:
    """README.md's "Public HTTP API" section: the statuses its opening paragraphs name for
    every route, and each route it names with the statuses its own text names (the status
    column of its table, or the numbers in its prose; code is not read)."""
    text = (ROOT / "README.md").read_text()
    heading = "\n## Public HTTP API\n"
    start = text.index(heading) + len(heading)
    end = text.index("\n## ", start)
    section = re.sub(r"```.*?```", "", text[start:end], flags=re.S)
    blocks: dict[tuple[str, str] | None, list[str]] = {None: []}  # None: the opening
    current: list[str] | None = blocks[None]
    for line in section.splitlines():
        found = ROUTE.search(line)
        if found is not None:
            current = blocks.setdefault((found[1], found[2]), [])
        elif line.startswith("#"):
            current = None  # a section that names no route: not read
        if current is not None:
            current.append(line)

    def statuses(lines: list[str]) -> set[int]:
        prose = re.sub(r"`[^`]*`", "", "\n".join(lines))  # code spans may span lines
        return {int(s) for s in STATUS.findall(prose)}

    general = statuses(blocks.pop(None))
    return general, {route: statuses(lines) for route, lines in blocks.items()
                     if route is not None}


def test_the_readme_parser_reads_what_it_should() -> None:
    general, routes = readme_api()
    assert {400, 404, 405, 413, 503}.issubset(general), general
    assert routes[("POST", "/api/v1/redeem")] >= {200, 400, 404, 413, 503}
    assert routes[("GET", "/api/v1/token/{token}")] >= {200, 400, 404}
    assert ("GET", "/api/v1/watch") in routes and ("GET", "/healthz") in routes


def test_every_route_and_status_in_the_readme_is_documented() -> None:
    general, routes = readme_api()
    ops = operations()
    missing_routes = set(routes) - set(ops)
    assert not missing_routes, f"README routes the document lacks: {missing_routes}"
    for route, statuses in routes.items():
        documented = {int(s) for s in ops[route]["responses"]}
        assert statuses <= documented, f"{route}: {statuses - documented} undocumented"
        if route != ("GET", "/api/v1/watch"):
            assert 200 in documented, route
    anywhere = {int(s) for op in ops.values() for s in op["responses"]}
    anywhere |= {int(s) for item in DOC["paths"].values() for s in item["x-unlisted-methods"]}
    assert general <= anywhere, f"README statuses the document lacks: {general - anywhere}"


# --- real answers -------------------------------------------------------------------------

TOKEN_PATH = "/api/v1/token/{token}"


async def test_the_served_document_is_the_checked_in_file(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        resp = await srv.client.get(openapi.PATH)
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/json"
        assert resp.content == DOCUMENT_FILE.read_bytes()
        assert check(resp, openapi.PATH) == DOC


async def test_real_answers_match_the_document(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_body_bytes=256) as srv:
        c = srv.client
        redeem = "/api/v1/redeem"
        pid = PaymentId.generate()
        await srv.pay(pid, 2 * 10**12)
        first = check(await srv.redeem(pid.hex()), redeem)
        assert first["status"] == "success"
        again = check(await srv.redeem(pid.hex().upper()), redeem)
        assert again == {**first, "status": "already_claimed"}
        check(await srv.redeem(PaymentId.generate().hex()), redeem)  # 404
        bodies: list[Any] = [{"pid": "0123"}, {"pid": "0123456789abcdeg"}, {"pid": "0" * 16},
                             {"pid": 7}, {}, [], "x"]
        for body in bodies:
            resp = await c.post(redeem, json=body)
            assert resp.status_code == 400, resp.text
            check(resp, redeem)
        for content, ctype in ((b"{", "application/json"), (b'{"pid":"1"}', "text/plain")):
            resp = await c.post(redeem, content=content, headers={"content-type": ctype})
            assert resp.status_code == 400
            check(resp, redeem)
        resp = await c.post(redeem, json={"pid": pid.hex(), "pad": "x" * 300})
        assert resp.status_code == 413
        check(resp, redeem)

        token = first["service_token"]
        info = check(await c.get(f"/api/v1/token/{token}"), TOKEN_PATH)
        assert info["status"] == "active" and info["amount"] == 2 * 10**12
        for bad, status in (("abc", 400), ("z" * 64, 400), ("ab" * 32, 404), ("AB" * 32, 404)):
            resp = await c.get(f"/api/v1/token/{bad}")
            assert resp.status_code == status, resp.text
            check(resp, TOKEN_PATH)

        check(await c.get("/api/v1/info"), "/api/v1/info")
        health = check(await c.get("/healthz"), "/healthz")
        assert health["status"] in ("ok", "degraded")

        plain = await c.get("/api/v1/watch")  # not a websocket handshake
        assert plain.status_code == 400
        check(plain, "/api/v1/watch")
        for method, path in (("GET", redeem), ("POST", "/api/v1/info"),
                             ("DELETE", TOKEN_PATH), ("PUT", "/healthz"),
                             ("POST", openapi.PATH), ("POST", "/api/v1/watch")):
            resp = await c.request(method, path.replace("{token}", token))
            assert resp.status_code == 405, (method, path, resp.text)
            check(resp, path)

        # draining: redeem and health answer 503 with Retry-After
        assert (await srv.internal.post("/admin/drain")).status_code == 200
        resp = await srv.redeem(pid.hex())
        assert resp.status_code == 503
        check(resp, redeem)
        resp = await c.get("/healthz")
        assert resp.status_code == 503
        assert check(resp, "/healthz")["status"] == "draining"


async def raw_answer(srv: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream(srv.settings.bind_host, srv.settings.bind_port)
    async with stream:
        await stream.send_all(request)
        status, headers, body = parse_response(await read_until_closed(stream))
    return status, headers, body[: int(headers.get("content-length", len(body)))]


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /api/v1/info HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"GET /api/v1/info HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    (b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 100\r\n\r\n{", 408),
], ids=["no host", "two framings", "unknown coding", "huge head", "http/1.2", "slow body"])
async def test_protocol_refusals_match_the_document(tmp_path: Path, request_bytes: bytes,
                                                    status: int) -> None:
    path = "/api/v1/redeem" if request_bytes.startswith(b"POST") else "/api/v1/info"
    async with running_server(tmp_path, read_timeout_secs=0.5) as srv:
        got, headers, body = await raw_answer(srv, request_bytes)
        assert got == status, body
        method = request_bytes.split(b" ", 1)[0].decode()
        check_answer(method, path, got, headers, body)
