"""Who may use the viewer, and which requests are the page's own (`Guard`, an ASGI middleware; `login`).

Bound to a loopback address (127.0.0.1, ::1, localhost): open, no login. It then answers only requests that
name a loopback host (the Host header), so that a web page whose domain is made to resolve to 127.0.0.1
(DNS rebinding) cannot use it through the user's browser.

Bound to any other address: `Auth` refuses to start without `VSEG_UI_TOKEN`, and every request, reads
included (the pages, the event streams, the media), needs it: `Authorization: Bearer <token>`, or the
cookie `/login?token=<token>` sets (HttpOnly, SameSite=Strict, holding an HMAC of the token rather than the
token). Compared in constant time (hmac.compare_digest). None given: 401 (a page is sent to the login
form); a wrong one: 403. Plain HTTP: put a TLS proxy in front of a viewer reached over a network.

Writes (anything but GET and HEAD) must also be the page's own: a JSON body (Content-Type
application/json, which a form on another site cannot send, and which a script on another site can send
only after a CORS preflight this server never answers), and an Origin, when the browser sends one, that is
this server's. Refused with 415 or 403, before any handler runs.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
from urllib.parse import parse_qs, quote, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.errors import ConfigError

# On every response: the page's own files only (hls.js plays through blob: URLs and a blob: worker), never in a
# frame of another site (a click on the picture is a write: no clickjacking), no content-type guessing.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                                 b"worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
                                 b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
COOKIE = "vseg_ui"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
READS = ("GET", "HEAD")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host of a Host header, without its port (`[::1]:8080` -> `::1`)."""
    value = header.strip()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Auth:
    """The viewer's access rule for the address it listens on (the module doc)."""

    def __init__(self, host: str, token: str) -> None:
        self.open = is_loopback(host)
        if not self.open and not token:
            raise ConfigError(f"the viewer would listen on {host}, which is not a loopback address: set VSEG_UI_TOKEN "
                              f"to a long random secret (python -c 'import secrets; print(secrets.token_urlsafe(32))') "
                              f"that every user must give, or bind it to 127.0.0.1 (VSEG_UI_HOST, --host)")
        self._token = token.encode()
        self.session = hmac.new(self._token, b"vseg-ui-session", hashlib.sha256).hexdigest().encode() if token else b""

    def token_matches(self, given: str) -> bool:
        return bool(self._token) and hmac.compare_digest(given.encode(), self._token)

    def verdict(self, request: Request) -> int:
        """200: let it through; 401: no token given; 403: a wrong one."""
        if self.open:
            return 200
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return 200 if self.token_matches(header[7:].strip()) else 403
        cookie = request.cookies.get(COOKIE)
        if cookie is not None:
            return 200 if hmac.compare_digest(cookie.encode(), self.session) else 403
        return 401


def error(status: int, message: str) -> JSONResponse:
    """Every refusal of the API: {"error": one line saying what was wrong and what to do}."""
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """The ASGI middleware that applies `Auth` and the write rules to every HTTP request."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self.refusal(Request(scope))
        await (refusal or self.app)(scope, receive, send_secured)

    def refusal(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if self.auth.open and not is_loopback(host_of(host)):
            return error(403, f"this viewer listens on a loopback address and answers requests to 127.0.0.1, ::1 or "
                              f"localhost only, not to {host!r}: open it as http://127.0.0.1:<port>/")
        path = request.url.path
        if path != "/login":
            verdict = self.auth.verdict(request)
            if verdict == 401:
                if request.method in READS and not path.startswith(("/api/", "/media/")):
                    return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
                return error(401, "this viewer needs its token (VSEG_UI_TOKEN): sign in at /login, or send "
                                  "Authorization: Bearer <token>")
            if verdict == 403:
                return error(403, "the token given is not this viewer's (VSEG_UI_TOKEN): sign in again at /login")
        if request.method in READS:
            return None
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and path != "/login":  # the sign-in form posts a form
            return error(415, f"send the request's body as JSON, with Content-Type: application/json (got "
                              f"{kind or 'none'!r})")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return error(403, f"a write from another site ({origin}) is refused: use this viewer's own page")
        if request.headers.get("sec-fetch-site") == "cross-site":
            return error(403, "a write from another site is refused: use this viewer's own page")
        return None


def _next(raw: str | None) -> str:
    """Where to go after signing in: a path of this server only (never `//host` or a URL)."""
    return raw if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw else "/"


_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>vseg viewer: sign in</title>
<meta name="referrer" content="same-origin"><style>body{{font:15px system-ui,sans-serif;margin:4em auto;
max-width:28em}}input{{font:inherit;padding:.3em}}</style></head>
<body><form method="post" action="/login"><h1>vseg viewer</h1><p>{message}</p>
<input type="hidden" name="next" value="{next}"><label>Token (VSEG_UI_TOKEN)
<input type="password" name="token" autofocus required></label> <button>Sign in</button></form></body></html>"""


async def login(request: Request) -> Response:
    """GET /login: the form; /login?token=T, or the form posted (the token then stays out of the URL and the
    browser's history), sets the session cookie and goes on to `next`."""
    auth: Auth = request.app.state.auth
    params: dict[str, str] = dict(request.query_params)
    if request.method == "POST":
        params.update((k, v[-1]) for k, v in parse_qs((await request.body()).decode(errors="replace")).items())
    target = _next(params.get("next"))
    token = params.get("token")
    headers = {"Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
    if auth.open:
        return RedirectResponse(target, status_code=303, headers=headers)
    if token is None:
        return HTMLResponse(_FORM.format(message="This viewer needs its token.", next=html.escape(target)),
                            headers=headers)
    if not auth.token_matches(token):
        return HTMLResponse(_FORM.format(message="That is not this viewer's token.", next=html.escape(target)),
                            status_code=403, headers=headers)
    response = RedirectResponse(target, status_code=303, headers=headers)
    response.set_cookie(COOKIE, auth.session.decode(), max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="strict",
                        path="/")
    return response
