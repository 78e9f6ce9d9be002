"""The physicians' page: sign in, issue a verification code, show it with a QR code,
sign out. Plain HTML forms; the session is an HttpOnly, SameSite=Strict cookie (Secure
behind TLS) and every form carries a token bound to a cookie (CSRF): the sign-in form to
a pre-session cookie, the others to the session. Pages allow no script, no framing and
only their own style (Content-Security-Policy), and are never cached."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import secrets

import qrcode
import qrcode.image.svg
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from .errors import ApiError
from .httputil import client_host, is_https
from .service import Backend
from .verification import LONG_CODE_TTL, SESSION_TTL, SHORT_CODE_TTL, date_interval

SESSION_COOKIE = "ctagent_session"
#: the sign-in form's pre-session cookie: the form's CSRF token is bound to it
LOGIN_COOKIE = "ctagent_login"
LOGIN_FORM_TTL = 3600
LOGIN_PER_MIN = 10

_STYLE = """body{font-family:sans-serif;max-width:40em;margin:2em auto} .code{font-size:2em;letter-spacing:.1em}
.err{color:#b00} label{display:block;margin:.5em 0} form.out{margin-top:2em}"""
_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ctagent: {title}</title>
<style>{style}</style></head><body><h1>{title}</h1>{body}</body></html>"""
#: the pages' policy: their one inline style (by its hash), forms to this site only, no
#: script, no plug-in, no framing (OWASP Secure Headers Project)
PAGE_CSP = ("default-src 'none'; style-src 'sha256-"
            + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
            + "'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

_LOGIN_FORM = """<form method="post" action="/login"><input type="hidden" name="csrf" value="{csrf}">
<label>User <input name="username" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form>"""

_LOGOUT_FORM = """<form class="out" method="post" action="/logout"><input type="hidden" name="csrf" value="{csrf}">
<button type="submit">Sign out</button></form>"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    resp = HTMLResponse(_PAGE.format(title=html.escape(title), style=_STYLE, body=body), status_code=status)
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    resp.headers["Cache-Control"] = "no-store"  # codes and sessions stay out of caches
    return resp


def _error(message: str) -> str:
    return f'<p class="err">{html.escape(message)}</p>'


def _qr_svg(text: str) -> str:
    img = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, box_size=24)  # ~200 px: scannable
    buf = io.BytesIO()
    img.save(buf)
    return buf.getvalue().decode()


def _duration(seconds: int) -> str:
    return f"{seconds // 3600} hours" if seconds % 3600 == 0 else f"{seconds // 60} minutes"


def web_router(backend: Backend) -> APIRouter:
    router = APIRouter()
    verification = backend.verification

    def secure(request: Request) -> bool:
        """Cookies are Secure behind TLS: over HTTPS, or when the configuration says so."""
        return backend.config.secure_cookies or is_https(request)

    def to_login() -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, error: str = ""):
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
        resp = page("Sign in", (_error(error) if error else "")
                    + _LOGIN_FORM.format(csrf=verification.login_form_token(nonce)))
        resp.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=secure(request),
                        max_age=LOGIN_FORM_TTL, path="/login")
        return resp

    @router.post("/login")
    def login(request: Request, username: str = Form(max_length=64), password: str = Form(max_length=256),
              csrf: str = Form("", max_length=128)):
        try:
            backend.limiter.check("login", client_host(request), LOGIN_PER_MIN)
        except ApiError as e:
            return page("Sign in", _error(e.message) + '<p><a href="/login">Try again</a></p>', status=e.status)
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or not hmac.compare_digest(csrf, verification.login_form_token(nonce)):
            return page("Sign in", _error("This sign-in form has expired or was not sent from this site.")
                        + '<p><a href="/login">Sign in again</a></p>', status=403)
        try:
            token = verification.login(username, password)
        except ApiError as e:
            return page("Sign in", _error(e.message) + '<p><a href="/login">Try again</a></p>', status=e.status)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=secure(request),
                        max_age=SESSION_TTL)
        resp.delete_cookie(LOGIN_COOKIE, path="/login")
        return resp

    @router.post("/logout")
    def logout(request: Request, csrf: str = Form("", max_length=128)):
        session = request.cookies.get(SESSION_COOKIE)
        if session and hmac.compare_digest(csrf, verification.csrf_token(session)):
            verification.logout(session)
        resp = to_login()
        resp.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=secure(request))
        return resp

    @router.get("/", response_class=HTMLResponse)
    def home(request: Request):
        session = request.cookies.get(SESSION_COOKIE)
        user = verification.session_user(session)
        if session is None or user is None:
            return to_login()
        csrf = verification.csrf_token(session)
        return page("Issue a verification code", f"""<p>Signed in as {html.escape(user)}.</p>
<form method="post" action="/issue"><input type="hidden" name="csrf" value="{csrf}">
<label>Test type <select name="test_type"><option value="confirmed">confirmed test</option>
<option value="likely">clinical diagnosis</option></select></label>
<label>Symptom onset (date, optional) <input type="date" name="onset"></label>
<button type="submit">Issue code</button></form>{_LOGOUT_FORM.format(csrf=csrf)}""")

    @router.post("/issue", response_class=HTMLResponse)
    def issue(request: Request, csrf: str = Form(), test_type: str = Form("confirmed"), onset: str = Form("")):
        session = request.cookies.get(SESSION_COOKIE)
        user = verification.session_user(session)
        if session is None or user is None or not hmac.compare_digest(csrf, verification.csrf_token(session)):
            return to_login()
        try:
            onset_i = date_interval(onset) if onset else None
        except ValueError:
            return page("Issue a verification code", _error("The onset date is not a date."), 400)
        try:
            c = verification.issue_code(user, test_type=test_type, symptom_onset_interval=onset_i)
        except ApiError as e:
            return page("Issue a verification code", _error(e.message), e.status)
        return page("Verification code", f"""<p>Give this code to the patient. It works once.</p>
<p class="code" id="code">{c['code']}</p><p>valid {_duration(SHORT_CODE_TTL)}</p>{_qr_svg(c['code'])}
<p>Long code (valid {_duration(LONG_CODE_TTL)}): <span id="long-code">{c['longCode']}</span></p>
<p><a href="/">Issue another</a></p>{_LOGOUT_FORM.format(csrf=verification.csrf_token(session))}""")

    return router
