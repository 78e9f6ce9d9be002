"""The physicians' page: sign in, issue a verification code, show it with a QR code.
Plain HTML forms; the session is an HttpOnly, SameSite=Strict cookie and the issue form
carries a token bound to it (CSRF)."""

from __future__ import annotations

import datetime as dt
import hmac
import html
import io

import qrcode
import qrcode.image.svg
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from agent.protocol import gaen

from .errors import ApiError
from .httputil import client_host
from .service import Backend
from .verification import LONG_CODE_TTL, SESSION_TTL, SHORT_CODE_TTL

SESSION_COOKIE = "ctagent_session"
LOGIN_PER_MIN = 10

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ctagent: {title}</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}} .code{{font-size:2em;letter-spacing:.1em}}
.err{{color:#b00}} label{{display:block;margin:.5em 0}}</style></head><body><h1>{title}</h1>{body}</body></html>"""

_LOGIN_FORM = """<form method="post" action="/login">
<label>User <input name="username" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form>"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body), status_code=status)


def _error(message: str) -> str:
    return f'<p class="err">{html.escape(message)}</p>'


def _qr_svg(text: str) -> str:
    img = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, box_size=24)  # ~200 px: scannable
    buf = io.BytesIO()
    img.save(buf)
    return buf.getvalue().decode()


def onset_interval(date_text: str) -> int:
    """The ENIntervalNumber of the start of a ``YYYY-MM-DD`` day (UTC); ValueError if not a date."""
    d = dt.date.fromisoformat(date_text)
    start = dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()
    return gaen.en_interval_number(start)


def _duration(seconds: int) -> str:
    return f"{seconds // 3600} hours" if seconds % 3600 == 0 else f"{seconds // 60} minutes"


def web_router(backend: Backend) -> APIRouter:
    router = APIRouter()
    verification = backend.verification

    @router.get("/login", response_class=HTMLResponse)
    def login_form(error: str = ""):
        return page("Sign in", (_error(error) if error else "") + _LOGIN_FORM)

    @router.post("/login")
    def login(request: Request, username: str = Form(max_length=64), password: str = Form(max_length=256)):
        try:
            backend.limiter.check("login", client_host(request), LOGIN_PER_MIN)
            token = verification.login(username, password)
        except ApiError as e:
            return page("Sign in", _error(e.message) + '<p><a href="/login">Try again</a></p>', status=e.status)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", max_age=SESSION_TTL)
        return resp

    @router.get("/", response_class=HTMLResponse)
    def home(request: Request):
        session = request.cookies.get(SESSION_COOKIE)
        user = verification.session_user(session)
        if session is None or user is None:
            return RedirectResponse("/login", status_code=303)
        return page("Issue a verification code", f"""<p>Signed in as {html.escape(user)}.</p>
<form method="post" action="/issue"><input type="hidden" name="csrf" value="{verification.csrf_token(session)}">
<label>Test type <select name="test_type"><option value="confirmed">confirmed test</option>
<option value="likely">clinical diagnosis</option></select></label>
<label>Symptom onset (date, optional) <input type="date" name="onset"></label>
<button type="submit">Issue code</button></form>""")

    @router.post("/issue", response_class=HTMLResponse)
    def issue(request: Request, csrf: str = Form(), test_type: str = Form("confirmed"), onset: str = Form("")):
        session = request.cookies.get(SESSION_COOKIE)
        user = verification.session_user(session)
        if session is None or user is None or not hmac.compare_digest(csrf, verification.csrf_token(session)):
            return RedirectResponse("/login", status_code=303)
        try:
            onset_i = onset_interval(onset) if onset else None
        except ValueError:
            return page("Issue a verification code", _error("The onset date is not a date."), 400)
        try:
            c = verification.issue_code(user, test_type=test_type, symptom_onset_interval=onset_i)
        except ApiError as e:
            return page("Issue a verification code", _error(e.message), e.status)
        return page("Verification code", f"""<p>Give this code to the patient. It works once.</p>
<p class="code" id="code">{c['code']}</p><p>valid {_duration(SHORT_CODE_TTL)}</p>{_qr_svg(c['code'])}
<p>Long code (valid {_duration(LONG_CODE_TTL)}): <span id="long-code">{c['longCode']}</span></p>
<p><a href="/">Issue another</a></p>""")

    return router
