"""The review app's factory: sessions, sign-in, CSRF, security headers, templates.

Starlette with Jinja2: a small, well-kept ASGI toolkit whose signed-cookie sessions, static
files and threadpool for our synchronous SQLAlchemy calls are all it takes, with no front-end
build and no ORM or form layer of its own to reconcile with db/.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from db.vocabulary import DISCLAIMER
from worker.ops.flower import is_loopback
from worker.settings import Settings
from worker.web import auth

SESSION_COOKIE = "cxr_session"
SESSION_MAX_AGE_S = 8 * 3600
"""A working day: a session ends by itself the next morning."""
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
}
MAX_FAILURES, LOCKOUT_S = 5, 300.0
"""Wrong passwords for one user before sign-in pauses for that user (each guess also costs
a 16 MiB scrypt)."""
_DUMMY_HASH = auth.hash_password("not a password", salt=b"\0" * 16)
STATIC = Path(__file__).with_name("static")


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response (pure ASGI, so streaming is untouched)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)



def png_or_404(data: bytes | None, missing: str) -> Response:
    """A picture's PNG, or 404 with what is missing (pages serve pictures by row id only)."""
    if data is None:
        return PlainTextResponse(missing, status_code=404)
    return Response(data, media_type="image/png")

def user_of(request: Request) -> str | None:
    """The signed-in user: the proxy's header, the session's user, or ``local`` when the app
    runs on loopback with no sign-in configured."""
    config = request.app.state
    if config.settings.web_trusted_header:
        name = (request.headers.get(config.settings.web_trusted_header) or "").strip()
        return name if name and len(name) <= 255 and name.isprintable() else None
    if config.users:
        name = request.session.get("user")
        return name if name in config.users else None
    return auth.LOCAL_USER


def csrf_token(request: Request) -> str:
    if "csrf" not in request.session:
        request.session["csrf"] = auth.new_csrf_token()
    return request.session["csrf"]


def signed_in(page: bool = True):
    """Handlers behind sign-in: a page redirects to /login, anything else answers 401."""

    def wrap(handler: Callable[..., Awaitable[Response]]):
        @wraps(handler)
        async def checked(request: Request) -> Response:
            user = user_of(request)
            if user is None:
                if page and request.method == "GET" and request.app.state.users:
                    return RedirectResponse("/login", status_code=303)
                return PlainTextResponse("sign in first", status_code=401)
            request.state.user = user
            return await handler(request)

        return checked

    return wrap


async def checked_form(request: Request) -> dict[str, str] | None:
    """The posted form when its CSRF token is the session's, else None."""
    form = await request.form()
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    if not auth.csrf_matches(request.session.get("csrf"), values.get("csrf")):
        return None
    return values


def render(request: Request, template: str, status_code: int = 200, **context: Any
           ) -> HTMLResponse:
    env: Environment = request.app.state.templates
    flash = request.session.pop("flash", None)
    html = env.get_template(template).render(
        request=request, user=getattr(request.state, "user", None), csrf=csrf_token(request),
        disclaimer=DISCLAIMER, flash=flash, sign_in=bool(request.app.state.users),
        **context)
    return HTMLResponse(html, status_code=status_code)


async def login_page(request: Request) -> Response:
    if not request.app.state.users:
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html")


def _locked_out(request: Request, name: str, failed: bool = False) -> bool:
    """Whether ``name`` (a configured user) had ``MAX_FAILURES`` wrong passwords in the last
    ``LOCKOUT_S``; ``failed`` records one more. Only known names are tracked (bounded memory)."""
    failures: dict[str, list[float]] = request.app.state.failures
    if name not in request.app.state.users:
        return False
    now = time.monotonic()
    recent = [t for t in failures.get(name, []) if now - t < LOCKOUT_S]
    failures[name] = [*recent, now] if failed else recent
    return len(recent) >= MAX_FAILURES


async def login(request: Request) -> Response:
    users = request.app.state.users
    form = await checked_form(request)
    if not users or form is None:
        return PlainTextResponse("bad or missing CSRF token", status_code=403)
    name, password = form.get("user", ""), form.get("password", "")
    if _locked_out(request, name):
        return render(request, "login.html", status_code=429,
                      error="too many wrong passwords; try again in a few minutes")
    ok = await run_in_threadpool(auth.verify_password, password, users.get(name, _DUMMY_HASH))
    if not ok or name not in users:
        _locked_out(request, name, failed=True)
        return render(request, "login.html", status_code=401, error="wrong name or password")
    request.session.clear()
    request.session.update(user=name, csrf=auth.new_csrf_token())
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    if await checked_form(request) is None:
        return PlainTextResponse("bad or missing CSRF token", status_code=403)
    request.session.clear()
    return RedirectResponse("/login" if request.app.state.users else "/", status_code=303)


def create_app(settings: Settings) -> Starlette:
    """The app for ``settings`` (checked: no open app beyond loopback)."""
    from worker.web import models_page, pages

    auth.check_web_settings(settings)
    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET"]),
        Route("/healthz", lambda request: PlainTextResponse("ok"), methods=["GET"]),
        *pages.routes(),
        *models_page.routes(),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(SessionMiddleware, secret_key=auth.session_secret(settings),
                   session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE_S,
                   same_site="strict", https_only=not is_loopback(settings.web_address)),
    ]
    if not settings.web_users and not settings.web_trusted_header:
        # no sign-in (loopback only): answer only to this machine's names, so a web page whose
        # DNS name is re-pointed at 127.0.0.1 (DNS rebinding) cannot read the worklist
        hosts = sorted({"127.0.0.1", "localhost", "[::1]", settings.web_address})
        middleware.insert(1, Middleware(TrustedHostMiddleware, allowed_hosts=hosts))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.settings = settings
    app.state.users = auth.parse_users(settings.web_users)
    app.state.failures = {}
    app.state.templates = Environment(loader=PackageLoader("worker.web", "templates"),
                                      autoescape=True)
    app.state.templates.filters["when"] = when
    return app


def when(value: Any) -> str:
    """A timestamp to the second (SQLite hands the view's times back as text)."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ")[:19]
