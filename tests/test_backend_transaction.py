"""The roles' transactions (backend.transaction): one body of code run on a thread or
awaited on the event loop, on SQLite and PostgreSQL. Where a declaration's statements run,
that a failed step rolls back, that a code colliding with a stored one is drawn again,
and that a server's asyncio connections close with it."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from agent.protocol.verification import tek_hmac
from backend import db
from backend import verification as verification_module
from backend.errors import ApiError, Code
from backend.server import BackgroundServer
from backend.transaction import Sql, Transaction, run_on

from .backend_requests import HMAC_KEY, publish_body, random_keys


def _declare(url: str, api_key: str, now: float) -> dict:
    """The whole declaration over HTTP: lab issue -> verify -> certificate -> publish."""
    keys = random_keys(now, 3)
    with httpx.Client(base_url=url) as h:
        r = h.post("/api/issue", json={"testType": "confirmed"}, headers={"X-API-Key": api_key})
        assert r.status_code == 200, r.text
        r = h.post("/api/verify", json={"code": r.json()["code"]})
        assert r.status_code == 200, r.text
        r = h.post("/api/certificate", json={"token": r.json()["token"], "ekeyhmac": tek_hmac(HMAC_KEY, keys)})
        assert r.status_code == 200, r.text
        r = h.post("/v1/publish", json=publish_body(keys, r.json()["certificate"]))
        assert r.status_code == 200, r.text
        return r.json()


def test_a_declaration_awaits_its_statements_on_the_event_loop_on_postgresql(backend, clock):
    """On PostgreSQL the four routes run their statements on the server's event-loop
    thread (an asyncio connection); on SQLite on the thread pool, never on the loop."""
    api_key = backend.verification.add_api_key("lab")
    statements: list[tuple[sa.Engine, str]] = []

    def seen(conn: sa.Connection, *_args: Any) -> None:
        statements.append((conn.engine, threading.current_thread().name))

    with BackgroundServer(backend) as srv:
        sa.event.listen(sa.Engine, "before_cursor_execute", seen)
        try:
            assert _declare(srv.url, api_key, clock.now())["insertedExposures"] == 3
        finally:
            sa.event.remove(sa.Engine, "before_cursor_execute", seen)
        engines = {engine for engine, _ in statements}
        threads = {thread for _, thread in statements}
        if backend.engine.dialect.name == "postgresql":
            asyncio_engine = backend.transactions._async[1]
            assert engines == {asyncio_engine.sync_engine} and threads == {"ctagent-backend"}
        else:
            assert backend.transactions._async is None
            assert engines == {backend.engine} and "ctagent-backend" not in threads
    assert backend.transactions._async is None  # closed with the server


def test_a_server_closes_its_asyncio_connections_and_the_next_one_opens_its_own(backend, clock):
    """The asyncio connections belong to a server's event loop: they close when it stops
    (none left open on PostgreSQL), and the same backend served again (a new loop) works."""
    if backend.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's transactions run on the thread pool")
    api_key = backend.verification.add_api_key("lab")

    def connections() -> int:
        with backend.engine.connect() as c:
            return int(c.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                         "AND pid <> pg_backend_pid()")).scalar_one())

    backend.engine.dispose()
    before = connections()
    for _ in range(2):
        with BackgroundServer(backend) as srv:
            _declare(srv.url, api_key, clock.now())
            assert connections() > before
        backend.engine.dispose()
        assert connections() <= before


def _insert_then_fail(dialect: str) -> Transaction[None]:
    yield from db.insert_new(dialect, db.certificates, [{"jti": "f" * 32}], "jti")
    raise ApiError(Code.INVALID_REQUEST, "a check after the first step")


def test_a_transaction_that_raises_after_a_step_stores_nothing_either_way(backend):
    dialect = backend.engine.dialect.name
    with pytest.raises(ApiError):
        backend.transactions.run(_insert_then_fail(dialect))

    async def on_a_loop() -> None:
        try:
            await backend.transactions.run_async(_insert_then_fail(dialect))
        finally:
            await backend.transactions.aclose()

    with pytest.raises(ApiError):
        asyncio.run(on_a_loop())
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.certificates)).scalar_one() == 0


def test_a_transaction_answered_before_its_first_step_takes_no_connection(backend):
    def cached() -> Transaction[str]:
        return "answer"
        yield Sql(sa.select(1))  # never reached

    checkouts: list[Any] = []
    sa.event.listen(backend.engine, "checkout", lambda *a: checkouts.append(a))
    assert backend.transactions.run(cached()) == "answer"
    assert asyncio.run(backend.transactions.run_async(cached())) == "answer"
    assert checkouts == [] and backend.transactions._async is None


def test_the_same_steps_run_in_an_open_transaction(backend):
    """``run_on``: a role's step inside a caller's transaction (ROBERT claims a code so)."""
    with backend.engine.begin() as c:
        assert run_on(c, db.insert_new(c.dialect.name, db.certificates, [{"jti": "a" * 32}], "jti")) == 1
        c.rollback()
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.certificates)).scalar_one() == 0


def test_a_code_that_collides_with_a_stored_one_is_drawn_again(backend, monkeypatch):
    """A drawn code whose short or long form is stored already is not inserted (ON CONFLICT
    DO NOTHING: no error, the transaction goes on) and another is drawn; when every draw
    collides the answer is 503 code_space_exhausted and nothing is stored."""
    first = backend.verification.issue_code("lab")
    draws = iter([int(first["code"]), 12345678])  # the stored code, then a new one
    monkeypatch.setattr(verification_module.secrets, "randbelow", lambda _n: next(draws))
    second = backend.verification.issue_code("lab")
    assert second["code"] == "12345678"

    monkeypatch.setattr(verification_module.secrets, "randbelow", lambda _n: 12345678)
    with pytest.raises(ApiError) as refused:
        backend.verification.issue_code("lab")
    assert refused.value.code is Code.CODE_SPACE_EXHAUSTED
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.codes)).scalar_one() == 2
    # the long code collides alone: drawn again as well
    distinct = random.Random(7)
    monkeypatch.setattr(verification_module.secrets, "randbelow", distinct.randrange)
    monkeypatch.setattr(verification_module.secrets, "choice", lambda seq: seq[0])
    long_first = backend.verification.issue_code("lab")
    with pytest.raises(ApiError) as refused:
        backend.verification.issue_code("lab")
    assert refused.value.code is Code.CODE_SPACE_EXHAUSTED and long_first["longCode"] == "a" * 16
