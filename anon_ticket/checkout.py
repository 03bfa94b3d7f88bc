"""The payer's checkout page on the public listener (README, "Checkout page").

- `GET /`: one self-contained page (anon_ticket/checkout/index.html). Its scripts draw the
  payment id in the browser, build the integrated address from `GET /api/v1/info`, draw the
  QR code, follow the payment over the watch websocket and redeem it. A `<noscript>` part,
  rendered here, tells how to pay without JavaScript.
- `GET /checkout/<file>`: its scripts, style sheet and icon, a fixed list read once when the
  app is built; nothing else is served from disk.
- `POST /redeem`: a plain HTML form (application/x-www-form-urlencoded `pid`) for those without
  JavaScript, answered with an HTML page: the token, or what went wrong.

Every answer carries a strict Content-Security-Policy: scripts only from these files, no
inline script, no eval, nothing from another site, no framing.

These routes are not the JSON API: anon_ticket/openapi.json describes that API alone (its
errors are JSON; these pages are HTML for people), and tests/test_openapi.py tells the two
apart by this blueprint's name. The form goes through the API itself: it is dispatched inside
the app as a JSON `POST /api/v1/redeem`, so the same handler, limits, metrics and abuse
controls (docs/architecture.md §5) answer it, and only the rendering differs.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

from quart import Blueprint, Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

if TYPE_CHECKING:
    from hypercorn.typing import HTTPScope

__all__ = ["ASSETS", "BLUEPRINT", "CSP", "FORM_PATH", "MAX_FORM_BYTES", "PAGE_PATH", "register"]

BLUEPRINT = "checkout"
PAGE_PATH = "/"
FORM_PATH = "/redeem"
ASSET_PATH = "/checkout/"
API_REDEEM = "/api/v1/redeem"
API_INFO = "/api/v1/info"
MAX_FORM_BYTES = 1024  # `pid=` and 16 hex digits need 20; the app's own limit applies too
MAX_FORM_FIELDS = 8
FORM_TYPE = "application/x-www-form-urlencoded"
HTML_TYPE = "text/html; charset=utf-8"
XMR = 10**12

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",  # the API and the watch websocket, on this origin only
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
))

ASSETS: dict[str, str] = {
    "address.js": "text/javascript; charset=utf-8",
    "qr.js": "text/javascript; charset=utf-8",
    "checkout.js": "text/javascript; charset=utf-8",
    "checkout.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_PAGE_FIELDS = {"primary_address", "network", "min_amount", "min_confirmations", "version"}


def _headers(cache: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Cache-Control": cache,
    }


def _read(name: str) -> bytes:
    return resources.files("anon_ticket").joinpath("checkout", name).read_bytes()


def _xmr(atomic: int) -> str:
    whole, frac = divmod(atomic, XMR)
    return f"{whole}.{frac:012d}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: Any  # the decoded JSON body, or None


async def _no_push(path: str, headers: Headers) -> None:
    pass


async def _dispatch(app: QuartTrio, method: str, path: str, payload: Any = None) -> _Answer:
    """`method path` answered inside the app as if it had come over the wire (with `payload`
    as its JSON body): routed, limited and answered by the route's own handler and the app's
    error handlers. Called from a request of the public listener."""
    outer = request._get_current_object()  # type: ignore[attr-defined]
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    headers = Headers({"Host": outer.headers.get("Host", ""),
                       "Content-Length": str(len(body))})
    if payload is not None:
        headers["Content-Type"] = "application/json"
    scope = cast("HTTPScope", {
        **outer.scope, "method": method, "path": path, "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in headers.items()]})
    inner = app.request_class(
        method, outer.scheme, path, b"", headers, outer.root_path, outer.http_version,
        scope=scope, max_content_length=app.config["MAX_CONTENT_LENGTH"],
        body_timeout=app.config["BODY_TIMEOUT"], send_push_promise=_no_push)
    inner.body.set_result(body)
    response = await app.handle_request(inner)
    if not isinstance(response, Response):  # pragma: no cover - our routes answer Responses
        return _Answer(500, {}, None)
    data = await response.get_data()
    try:
        decoded = json.loads(data) if response.mimetype == "application/json" else None
    except ValueError:  # pragma: no cover - the API answers JSON
        decoded = None
    return _Answer(response.status_code, dict(response.headers), decoded)


# --- HTML ----------------------------------------------------------------------------------


def _render(template: str, values: Mapping[str, str]) -> str:
    """Fill `{{name}}` placeholders with HTML-escaped values."""
    return _PLACEHOLDER.sub(lambda m: html.escape(values[m[1]]), template)


def _result_page(title: str, paragraphs: list[str], status: int, *,
                 token: str | None = None, extra_headers: Mapping[str, str] | None = None
                 ) -> Response:
    """The form's answer. Every value is escaped here: nothing a client sent is trusted."""
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{html.escape(title)}</title>",
        '<link rel="icon" href="/checkout/favicon.svg" type="image/svg+xml">',
        '<link rel="stylesheet" href="/checkout/checkout.css">', "</head>", "<body>",
        '<main><section class="card">', f"<h1>{html.escape(title)}</h1>",
    ]
    if token is not None:
        parts.append(f'<p class="result"><code id="token" class="secret">{html.escape(token)}'
                     "</code></p>")
    parts += [f'<p class="result">{html.escape(p)}</p>' for p in paragraphs]
    parts += ['<p><a href="/">Back to the checkout page</a></p>', "</section></main>",
              "</body>", "</html>"]
    headers = _headers("no-store")  # it may hold a token
    headers.update(extra_headers or {})
    return Response("\n".join(parts) + "\n", status=status, content_type=HTML_TYPE,
                    headers=headers)


def _refusal(status: int, text: str) -> Response:
    return _result_page("Not redeemed", [text], status)


_HTTP_TEXT = {
    408: "The form took too long to arrive. Try again.",
    413: "The form is too large: send only the payment id.",
}


async def _redeem_form(app: QuartTrio) -> Response:
    limit = MAX_FORM_BYTES
    if app.config["MAX_CONTENT_LENGTH"]:
        limit = min(limit, int(app.config["MAX_CONTENT_LENGTH"]))
    if request.mimetype != FORM_TYPE:
        return _refusal(400, f"invalid request: content type must be {FORM_TYPE}")
    if request.content_length is not None and request.content_length > limit:
        return _refusal(413, _HTTP_TEXT[413])
    try:
        raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    except HTTPException as exc:  # too large (chunked) or too slow
        code = exc.code or 400
        return _refusal(code, _HTTP_TEXT.get(code, "The form could not be read."))
    if len(raw) > limit:
        return _refusal(413, _HTTP_TEXT[413])
    try:
        fields = parse_qsl(raw.decode("ascii"), keep_blank_values=True, errors="strict",
                           max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # not ASCII, bad percent-escapes in UTF-8, too many fields
        return _refusal(400, "invalid request: the form could not be read")
    pids = [value for name, value in fields if name == "pid"]
    if len(pids) != 1:
        return _refusal(400, "invalid request: send exactly one field `pid`")
    answer = await _dispatch(app, "POST", API_REDEEM, {"pid": pids[0].strip()})
    body = answer.body if isinstance(answer.body, dict) else {}
    if answer.status == 200 and isinstance(body.get("service_token"), str):
        again = body.get("status") == "already_claimed"
        balance = body.get("balance")
        lines = ["This payment id was redeemed before: this is its token, as then."
                 if again else "Keep this token: the service you paid for asks for it."]
        if isinstance(balance, int):
            lines.append(f"Credited: {_xmr(balance)} XMR.")
        lines.append("Redeeming the same payment id again shows the same token.")
        return _result_page("Your service token", lines, 200, token=body["service_token"])
    error = str(body.get("error") or "error")
    if answer.status == 404:
        return _refusal(404, "No payment to this payment id is recorded yet. A payment counts "
                             "once it has enough confirmations (the checkout page says how "
                             "many; a block comes about every two minutes): try again later.")
    if answer.status == 503:
        retry = answer.headers.get("Retry-After", "5")
        return _result_page("Not redeemed", [
            f"The service is temporarily unavailable ({error}). Try again in {retry} s."],
            503, extra_headers={"Retry-After": retry})
    if answer.status == 413:
        return _refusal(413, _HTTP_TEXT[413])
    if 400 <= answer.status < 500:
        return _refusal(answer.status, error)  # the API's own words, escaped
    return _refusal(500, "The service could not redeem it (internal error). Try again later.")


# --- registration --------------------------------------------------------------------------


def register(app: QuartTrio) -> None:
    """Add the checkout page, its files and the HTML redeem form to the public app (its
    `/api/v1/redeem` and `/api/v1/info` routes answer the form and the page's fallback)."""
    template = _read("index.html").decode("utf-8")
    unknown = set(_PLACEHOLDER.findall(template)) - _PAGE_FIELDS
    if unknown:  # pragma: no cover - a template edited without this module
        raise ValueError(f"checkout/index.html: unknown placeholders {sorted(unknown)}")
    bp = Blueprint(BLUEPRINT, __name__)

    async def page() -> Response:
        info = await _dispatch(app, "GET", API_INFO)
        data = info.body if info.status == 200 and isinstance(info.body, dict) else {}
        primary = data.get("primary_address")
        minimum = data.get("min_payment_amount")
        confirmations = data.get("min_confirmations")
        values = {
            "primary_address": primary if isinstance(primary, str) else
            "(not known yet: the service's wallet has not answered; reload in a minute)",
            "network": str(data.get("network") or "network not known yet"),
            "min_amount": _xmr(minimum) if isinstance(minimum, int) else "(not known yet)",
            "min_confirmations": str(confirmations) if isinstance(confirmations, int)
            else "enough",
            "version": str(data.get("version") or ""),
        }
        return Response(_render(template, values), content_type=HTML_TYPE,
                        headers=_headers("no-cache"))

    bp.add_url_rule(PAGE_PATH, "page", page, methods=["GET"])
    for name, content_type in ASSETS.items():
        bp.add_url_rule(ASSET_PATH + name, name.replace(".", "_"),
                        _asset_view(_read(name), content_type), methods=["GET"])

    async def redeem_form() -> Response:
        return await _redeem_form(app)

    bp.add_url_rule(FORM_PATH, "redeem_form", redeem_form, methods=["POST"])
    app.register_blueprint(bp)


def _asset_view(data: bytes, content_type: str) -> Callable[[], Any]:
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'

    async def asset() -> Response:
        headers = _headers("no-cache")
        headers["ETag"] = etag
        if request.headers.get("If-None-Match") == etag:
            return Response(b"", status=304, headers=headers)
        return Response(data, content_type=content_type, headers=headers)

    return asset
