"""The backend against someone guessing or probing, over real HTTP on 127.0.0.1: client
addresses a client cannot choose, sign-ins that back off per account and cost the same
for every name."""

import logging
import os
import re
import statistics
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import robert
from backend import Backend, BackendConfig, publish, verification
from backend.ratelimit import LOGIN_BACKOFF_FIRST_S, LOGIN_FREE_FAILURES
from backend.robert import RobertConfig, RobertServer
from backend.server import BackgroundServer

from .backend_requests import prepared_publish
from .conftest import database_url
from .helpers import wait_until

pytestmark = pytest.mark.integration


def login_form(web: httpx.Client) -> dict:
    """The hidden fields of the sign-in form (its CSRF token, when it has one)."""
    page = web.get("/login").text
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))


def sign_in(web: httpx.Client, username: str, password: str, headers: dict | None = None) -> httpx.Response:
    return web.post("/login", data={**login_form(web), "username": username, "password": password},
                    headers=headers)


# -- point 12: addresses from X-Forwarded-For only through a configured proxy ------------

def test_a_client_cannot_pick_its_address_with_forwarded_for(backend, live):
    """uvicorn believed X-Forwarded-For from 127.0.0.1: each guess with a new header got
    a fresh per-IP budget (200 guesses, none limited)."""
    with httpx.Client(base_url=live.url) as web:
        statuses = [sign_in(web, f"user-{i}", "guess-guess", {"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                    for i in range(30)]
    assert statuses == [401] * 10 + [429] * 20
    backend.config.rate_verify_per_min = 3
    statuses = [httpx.post(live.url + "/api/verify", json={"code": "00000000"},
                           headers={"X-Forwarded-For": f"10.1.0.{i}"}).status_code for i in range(5)]
    assert statuses == [400] * 3 + [429] * 2


@pytest.fixture(params=["sqlite", "postgresql"])
def robert_live(request, tmp_path, clock):
    backend = Backend(BackendConfig(tmp_path / "b", database_url=database_url(request)), clock=clock)
    rs = RobertServer(backend, RobertConfig(register_per_min=3))
    with BackgroundServer(backend, robert_server=rs) as srv:
        yield srv
    backend.engine.dispose()


def test_robert_registration_limit_ignores_forwarded_for(robert_live):
    statuses = []
    for i in range(5):
        key = robert.public_key_b64(ec.generate_private_key(ec.SECP256R1()))
        statuses.append(httpx.post(robert_live.url + "/api/v6/register", json={"clientPublicECDHKey": key},
                                   headers={"X-Forwarded-For": f"10.2.0.{i}"}).status_code)
    assert statuses == [201] * 3 + [429] * 2


def test_behind_a_trusted_proxy_the_forwarded_client_counts(backend, live):
    backend.config.trusted_proxies = ("127.0.0.0/8",)
    backend.config.rate_verify_per_min = 2

    def verify(forwarded):
        return httpx.post(live.url + "/api/verify", json={"code": "00000000"},
                          headers={"X-Forwarded-For": forwarded}).status_code

    assert [verify(f"10.3.0.{i}") for i in range(4)] == [400] * 4  # four clients behind the proxy
    # what a client writes itself stands left of what the proxy appended: never reached
    assert [verify(f"6.6.6.{i}, 10.3.1.1") for i in range(3)] == [400, 400, 429]
    # a chain of trusted proxies is walked through
    assert [verify("10.3.2.1, 127.0.0.9") for _ in range(3)] == [400, 400, 429]


def test_a_wrong_trusted_proxy_setting_is_refused(tmp_path):
    from agent.errors import ConfigError
    with pytest.raises(ConfigError, match="not an IP address or network"):
        Backend(BackendConfig(tmp_path / "b", trusted_proxies=("proxy.example",)))


# -- point 12: back-off per account, the same cost for every name --------------------------

@pytest.mark.parametrize("username", ["dr.who", "no-such-user"])
def test_sign_in_backs_off_per_account_from_any_address(backend, live, clock, username):
    """Guesses spread over many addresses (behind a proxy) still wait, per account name,
    known or not, and the answers are the same for both."""
    backend.config.trusted_proxies = ("127.0.0.1",)
    with httpx.Client(base_url=live.url) as web:
        def attempt(i, password):
            return sign_in(web, username, password, {"X-Forwarded-For": f"10.4.{i // 200}.{i % 200}"})

        statuses = [attempt(i, "guess-guess").status_code for i in range(LOGIN_FREE_FAILURES + 3)]
        assert statuses == [401] * LOGIN_FREE_FAILURES + [429] * 3
        r = attempt(100, "tardis-1963")  # even the right password waits
        assert r.status_code == 429 and "try again in 1 minute" in r.text
        clock.advance(LOGIN_BACKOFF_FIRST_S)
        r = attempt(101, "tardis-1963")
        if username == "dr.who":
            assert r.status_code == 303  # and the count starts afresh
            assert [attempt(200 + i, "guess-guess").status_code for i in range(2)] == [401, 401]
        else:
            assert r.status_code == 401
            assert attempt(102, "guess-guess").status_code == 429  # the wait doubled: 2 minutes
            clock.advance(LOGIN_BACKOFF_FIRST_S)
            assert attempt(103, "guess-guess").status_code == 429
            clock.advance(LOGIN_BACKOFF_FIRST_S)
            assert attempt(104, "guess-guess").status_code == 401


def test_an_unknown_user_name_costs_a_password_hash(backend, live, monkeypatch):
    """A wrong name was answered at once (5 ms against 46 ms for a wrong password):
    which names exist could be read from the time."""
    calls = []
    real = verification.hash_password
    monkeypatch.setattr(verification, "hash_password", lambda *a: calls.append(1) or real(*a))
    backend.config.trusted_proxies = ("127.0.0.1",)
    with httpx.Client(base_url=live.url) as web:
        assert sign_in(web, "nobody", "guess-guess").status_code == 401  # the first may make a hash of no account
        calls.clear()
        assert sign_in(web, "nobody", "guess-guess").status_code == 401
        assert len(calls) == 1
        timings: dict[str, list[float]] = {"dr.who": [], "nobody-at-all": []}
        for i in range(LOGIN_FREE_FAILURES - 1):
            for name, times in timings.items():
                form = login_form(web)
                t = time.perf_counter()
                web.post("/login", data={**form, "username": name, "password": f"wrong-{i}"},
                         headers={"X-Forwarded-For": f"10.5.0.{i}"})
                times.append(time.perf_counter() - t)
    known, unknown = (statistics.median(t) for t in timings.values())
    assert unknown > 0.5 * known, f"unknown name {unknown * 1000:.1f} ms, known {known * 1000:.1f} ms"


# -- point 13: the physicians' page -------------------------------------------------------

def test_every_answer_carries_the_security_headers(backend, live):
    with httpx.Client(base_url=live.url) as web:
        pages = [web.get("/login"), web.get("/", follow_redirects=True)]
        others = [web.get("/healthz"), web.get("/exports/index.txt"), web.post("/api/verify", json={}),
                  web.get("/no-such-page")]
    for r in pages:
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "form-action 'self'" in csp
        assert "script-src" not in csp and "unsafe-inline" not in csp and "style-src 'sha256-" in csp
        assert r.headers["cache-control"] == "no-store"
    for r in pages + others:
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert others[0].headers["content-security-policy"].startswith("default-src 'none'")


def session_cookie(r: httpx.Response) -> str:
    (cookie,) = [c for c in r.headers.get_list("set-cookie") if c.startswith("ctagent_session=")]
    return cookie.lower()


def test_cookies_are_secure_behind_tls(backend, live):
    with httpx.Client(base_url=live.url) as web:
        # a client's own X-Forwarded-Proto means nothing
        r = sign_in(web, "dr.who", "tardis-1963", {"X-Forwarded-Proto": "https"})
        assert r.status_code == 303 and "; secure" not in session_cookie(r)
        backend.config.trusted_proxies = ("127.0.0.1",)  # TLS ends at the proxy in front
        r = sign_in(web, "dr.who", "tardis-1963", {"X-Forwarded-Proto": "https"})
        assert "; secure" in session_cookie(r) and "httponly" in session_cookie(r)
        assert "samesite=strict" in session_cookie(r)
    backend.config.trusted_proxies = ()
    backend.config.secure_cookies = True  # TLS ends where the backend cannot see
    form = httpx.get(live.url + "/login")
    assert "; secure" in form.headers["set-cookie"].lower()
    nonce = form.cookies["ctagent_login"]  # a client would send it back over TLS only
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form.text).group(1)
    r = httpx.post(live.url + "/login", data={"csrf": csrf, "username": "dr.who", "password": "tardis-1963"},
                   headers={"cookie": f"ctagent_login={nonce}"})
    assert r.status_code == 303 and "; secure" in session_cookie(r)


def test_sign_out_ends_the_session(backend, live):
    with httpx.Client(base_url=live.url) as web:
        assert sign_in(web, "dr.who", "tardis-1963").status_code == 303
        stolen = web.cookies["ctagent_session"]
        home = web.get("/").text
        assert 'action="/logout"' in home
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', home).group(1)
        assert web.get("/logout").status_code == 405  # a link cannot sign anyone out
        r = web.post("/logout", data={"csrf": "0" * 64})  # forged: the session lives on
        assert r.status_code == 303 and r.headers["location"] == "/login"
        with httpx.Client(base_url=live.url, cookies={"ctagent_session": stolen}) as other:
            assert other.get("/").status_code == 200
        web.cookies.set("ctagent_session", stolen)
        r = web.post("/logout", data={"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert 'ctagent_session=""' in r.headers["set-cookie"]
    with httpx.Client(base_url=live.url, cookies={"ctagent_session": stolen}) as other:
        r = other.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login"  # revoked on the server


def test_sign_in_form_needs_its_own_token(backend, live):
    """Without it, another site could sign a physician into an account of its choosing."""
    with httpx.Client(base_url=live.url) as web, httpx.Client(base_url=live.url) as attacker:
        r = web.post("/login", data={"username": "dr.who", "password": "tardis-1963"})
        assert r.status_code == 403 and "ctagent_session" not in web.cookies
        theirs = login_form(attacker)  # a token of the attacker's own form, bound to its cookie
        r = web.post("/login", data={**theirs, "username": "dr.who", "password": "tardis-1963"})
        assert r.status_code == 403 and "ctagent_session" not in web.cookies
        assert theirs == login_form(attacker)  # the same form token while its cookie lives
        r = sign_in(web, "dr.who", "tardis-1963")
        assert r.status_code == 303 and "ctagent_session" in web.cookies
        assert 'ctagent_login=""' in ";".join(r.headers.get_list("set-cookie"))  # used up


# -- point 13: files, logs, memory ----------------------------------------------------------

def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_the_data_folder_and_database_files_are_private(backend, clock):
    d = backend.config.data_dir
    backend.publisher.publish(prepared_publish(backend, clock.t)[0])
    assert mode(d) == 0o700
    private = [d / "certificate-signing-key.pem", d / "export-signing-key.pem", d / "code-pepper"]
    if backend.engine.dialect.name == "sqlite":
        private += [d / "backend.db", d / "backend.db-wal", d / "backend.db-shm"]
        clock.advance(3600)
        backend.exports.run()
        private.append(d / "backend.db.export.lock")
    assert {p.name: oct(mode(p)) for p in private} == {p.name: "0o600" for p in private}


def test_an_older_data_folder_is_made_private(tmp_path):
    d = tmp_path / "old"
    Backend(BackendConfig(d)).engine.dispose()
    os.chmod(d, 0o755)
    for name in ("backend.db", "backend.db-wal", "backend.db-shm"):
        if (d / name).exists():
            os.chmod(d / name, 0o644)
    Backend(BackendConfig(d)).engine.dispose()
    assert mode(d) == 0o700 and mode(d / "backend.db") == 0o600
    assert all(mode(p) == 0o600 for p in d.glob("backend.db-*"))


def test_database_errors_never_log_key_bytes(backend, live, clock, monkeypatch):
    """A database error's text held its SQL parameters, and so the first bytes of the
    uploaded keys, in the server's log."""
    body, keys = prepared_publish(backend, clock.t)
    row = publish._row  # a row the database refuses (PostgreSQL's error quotes it whole: "Failing row contains")
    monkeypatch.setattr(publish, "_row", lambda *a: {**row(*a), "health_authority": None})
    caught = logging.getLogger("uvicorn.error")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(logging.Formatter().format(rec))  # type: ignore[method-assign]
    caught.addHandler(handler)
    try:
        r = httpx.post(live.url + "/v1/publish", json=body)
        wait_until(lambda: records, what="the server to log the error")  # it answers first, then logs
    finally:
        caught.removeHandler(handler)
    assert r.status_code == 500
    text = "\n".join(records)
    assert "IntegrityError" in text and "parameters hidden" in text.lower()  # the error was logged
    for k in keys:
        assert repr(k)[2:14] not in text and k.hex()[:8] not in text
