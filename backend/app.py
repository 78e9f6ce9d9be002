"""HTTP face of the backend (FastAPI). Error bodies: ``{"code": ..., "error": ...}``."""

from __future__ import annotations

import hashlib
import hmac
import html
import io
import json

import qrcode
import qrcode.image.svg
from fastapi import FastAPI, Form, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.base import BaseHTTPMiddleware

from .core import MAX_KEYS_PER_PUBLISH, ApiError, Backend

MAX_BODY = 64 * 1024
#: a ROBERT proximity list holds every HELLO heard in 14 days
MAX_REPORT_BODY = 32 * 1024 * 1024
SESSION_COOKIE = "ctagent_session"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VerifyRequest(_Strict):
    code: str = Field(max_length=64)
    accept: list[str] | None = None


class CertificateRequest(_Strict):
    token: str = Field(max_length=256)
    ekeyhmac: str = Field(max_length=128)


class IssueRequest(_Strict):
    testType: str = "confirmed"
    symptomOnsetInterval: int | None = None


class ExposureKey(_Strict):
    key: str = Field(max_length=64)
    rollingStartNumber: int = Field(ge=0)
    rollingPeriod: int = 144
    transmissionRisk: int = Field(0, ge=0, le=8)


class PublishRequest(_Strict):
    temporaryExposureKeys: list[ExposureKey] = Field(min_length=1)
    healthAuthorityID: str = Field("", max_length=128)
    verificationPayload: str = Field(max_length=8192)
    hmacKey: str = Field(max_length=128)
    symptomOnsetInterval: int | None = None
    traveler: bool = False
    revisionToken: str = Field("", max_length=4096)
    padding: str = Field("", max_length=MAX_BODY)


class _BodyLimit(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        if request.method in ("POST", "PUT"):
            limit = MAX_REPORT_BODY if request.url.path == "/api/v6/report" else MAX_BODY
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return _error(413, "body_too_large", f"request body over {limit} bytes")
            body = await request.body()  # cached by Starlette for the handler
            if len(body) > limit:
                return _error(413, "body_too_large", f"request body over {limit} bytes")
        return await call_next(request)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "error": message}, status_code=status)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _qr_svg(text: str) -> str:
    img = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, box_size=24)  # ~200 px: scannable
    buf = io.BytesIO()
    img.save(buf)
    return buf.getvalue().decode()


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ctagent: {title}</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}} .code{{font-size:2em;letter-spacing:.1em}}
.err{{color:#b00}} label{{display:block;margin:.5em 0}}</style></head><body><h1>{title}</h1>{body}</body></html>"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body), status_code=status)


def create_app(backend: Backend, robert_server=None) -> FastAPI:
    app = FastAPI(title="ctagent reference backend", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit)
    app.state.backend = backend

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error(400, "unparsable_request", "the body is not valid JSON")
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return _error(400, "invalid_request", f"{where or 'body'}: {first.get('msg', 'invalid')}")

    def csrf_for(session: str) -> str:
        return hmac.new(backend._pepper, b"csrf|" + session.encode(), hashlib.sha256).hexdigest()

    # -- API ----------------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/public-key")
    def public_key():
        c = backend.config
        return {"publicKey": backend.public_key_b64, "keyId": c.key_id, "keyVersion": c.key_version,
                "region": c.region, "algorithm": "ECDSA P-256 SHA-256"}

    @app.post("/api/issue")
    def api_issue(body: IssueRequest, x_api_key: str | None = Header(default=None)):
        who = backend.api_key_owner(x_api_key)
        return backend.issue_code(f"api:{who}", test_type=body.testType, symptom_onset_interval=body.symptomOnsetInterval)

    @app.post("/api/verify")
    def api_verify(body: VerifyRequest, request: Request):
        return backend.verify_code(body.code, _client(request))

    @app.post("/api/certificate")
    def api_certificate(body: CertificateRequest):
        return backend.certificate(body.token, body.ekeyhmac)

    @app.post("/v1/publish")
    def publish(body: PublishRequest):
        if len(body.temporaryExposureKeys) > MAX_KEYS_PER_PUBLISH:
            raise ApiError(400, "too_many_keys", f"at most {MAX_KEYS_PER_PUBLISH} keys per request")
        return backend.publish(body.model_dump())

    app.mount("/exports", StaticFiles(directory=backend.config.exports_dir), name="exports")

    if robert_server is not None:  # the ROBERT role (deployed API shape, /api/v6)
        rs = robert_server

        async def _json(request: Request) -> dict:
            try:
                doc = json.loads(await request.body())
            except ValueError:
                raise ApiError(400, "unparsable_request", "the body is not valid JSON") from None
            if not isinstance(doc, dict):
                raise ApiError(400, "invalid_request", "the body must be a JSON object")
            return doc

        @app.post("/api/v6/register")
        async def robert_register(request: Request, x_api_key: str | None = Header(default=None)):
            doc = await _json(request)
            return rs.register(str(doc.get("clientPublicECDHKey", "")), _client(request), x_api_key)

        @app.post("/api/v6/status")
        async def robert_status(request: Request):
            return rs.status(await _json(request))

        @app.post("/api/v6/report")
        async def robert_report(request: Request):
            return rs.report(await _json(request), _client(request))

        @app.post("/api/v6/unregister")
        async def robert_unregister(request: Request):
            return rs.unregister(await _json(request))

        @app.post("/api/v6/deleteExposureHistory")
        async def robert_delete(request: Request):
            return rs.delete_history(await _json(request))

        @app.get("/api/v6/clock")
        def robert_clock():
            return {"serverTime": rs.now_ntp(), "epochId": rs.current_epoch(), "timeStart": rs.start_ntp}

    # -- the physicians' page -------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse)
    def login_form(error: str = ""):
        err = f'<p class="err">{html.escape(error)}</p>' if error else ""
        return page("Sign in", err + """<form method="post" action="/login">
<label>User <input name="username" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form>""")

    @app.post("/login")
    def login(request: Request, username: str = Form(max_length=64), password: str = Form(max_length=256)):
        try:
            backend.limiter.check("login", _client(request), 10)
            token = backend.login(username, password)
        except ApiError as e:
            return page("Sign in", f'<p class="err">{html.escape(e.message)}</p><p><a href="/login">Try again</a></p>',
                        status=e.status)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", max_age=8 * 3600)
        return resp

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        session = request.cookies.get(SESSION_COOKIE)
        user = backend.session_user(session)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return page("Issue a verification code", f"""<p>Signed in as {html.escape(user)}.</p>
<form method="post" action="/issue"><input type="hidden" name="csrf" value="{csrf_for(session)}">
<label>Test type <select name="test_type"><option value="confirmed">confirmed test</option>
<option value="likely">clinical diagnosis</option></select></label>
<label>Symptom onset (date, optional) <input type="date" name="onset"></label>
<button type="submit">Issue code</button></form>""")

    @app.post("/issue", response_class=HTMLResponse)
    def issue(request: Request, csrf: str = Form(), test_type: str = Form("confirmed"), onset: str = Form("")):
        session = request.cookies.get(SESSION_COOKIE)
        user = backend.session_user(session)
        if user is None or not hmac.compare_digest(csrf, csrf_for(session)):
            return RedirectResponse("/login", status_code=303)
        onset_interval = None
        if onset:
            import datetime as _dt
            try:
                d = _dt.date.fromisoformat(onset)
            except ValueError:
                return page("Issue a verification code", '<p class="err">The onset date is not a date.</p>', 400)
            onset_interval = int(_dt.datetime(d.year, d.month, d.day, tzinfo=_dt.timezone.utc).timestamp()) // 600
        try:
            c = backend.issue_code(user, test_type=test_type, symptom_onset_interval=onset_interval)
        except ApiError as e:
            return page("Issue a verification code", f'<p class="err">{html.escape(e.message)}</p>', e.status)
        return page("Verification code", f"""<p>Give this code to the patient. It works once.</p>
<p class="code" id="code">{c['code']}</p><p>valid 15 minutes</p>{_qr_svg(c['code'])}
<p>Long code (valid 24 hours): <span id="long-code">{c['longCode']}</span></p><p><a href="/">Issue another</a></p>""")

    return app



