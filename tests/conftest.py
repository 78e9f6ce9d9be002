"""Shared fixtures: the clock, stores, the test data folder, a PostgreSQL server.

Markers: ``integration`` for tests that start processes, servers or a browser (the rest
run in seconds: ``pytest -m "not integration"``)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.clock import ManualClock
from agent.store import Store

from .helpers import T0, fast_passphrase


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what they deselect
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The real-stack tests run last, and their VM boots now, in the background: its
    minutes of emulated CPU overlap the rest of the suite instead of adding to it."""
    realstack = [i for i in items if i.get_closest_marker("realstack")]
    if not realstack:
        return
    items[:] = [i for i in items if not i.get_closest_marker("realstack")] + realstack
    if not config.option.collectonly:
        from .realstack import background

        background.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    background = sys.modules.get("tests.realstack.background")
    if background is not None:
        background.stop()  # e.g. after -x: no VM left running

TESTS = pathlib.Path(__file__).parent
DATA = TESTS / "data"


@pytest.fixture(scope="session")
def gaen_vectors() -> Any:
    return json.loads((DATA / "gaen.json").read_text())


@pytest.fixture
def clock() -> ManualClock:
    """Test time, moved by hand (``clock.advance``); starts at ``helpers.T0``."""
    return ManualClock(T0)


@pytest.fixture
def new_store(tmp_path: pathlib.Path, clock: ManualClock) -> Iterator[Callable[..., Store]]:
    """``new_store(name="agent", **kw)``: a fresh encrypted store on the test clock,
    closed at the end of the test."""
    opened: list[Store] = []

    def make(name: str = "agent", **kw: Any) -> Store:
        s = Store.create(tmp_path / f"{name}.db", fast_passphrase(), clock=clock, **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        try:
            s.close()
        except Exception:
            pass


@pytest.fixture
def store(new_store: Callable[..., Store]) -> Store:
    return new_store()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throw-away PostgreSQL server for the whole run (skips when it cannot start)."""
    from .postgres_fixture import PostgresServer
    srv = PostgresServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path, clock: ManualClock) -> Iterator[Any]:
    """The backend on the test clock, on SQLite and on PostgreSQL, with one physician
    account (dr.who / tardis-1963); export files padded to 50 keys."""
    from backend import Backend, BackendConfig

    b = Backend(BackendConfig(tmp_path / "backend", database_url=database_url(request), export_min_keys=50),
                clock=clock)
    b.verification.add_user("dr.who", "tardis-1963")
    yield b
    b.engine.dispose()


@pytest.fixture
def live(backend: Any) -> Iterator[Any]:
    """``backend`` served over real HTTP on 127.0.0.1 (uvicorn in a thread)."""
    from backend.server import BackgroundServer

    with BackgroundServer(backend) as srv:
        yield srv


def database_url(request: pytest.FixtureRequest) -> str | None:
    """None for the 'sqlite' param; a fresh PostgreSQL schema for 'postgresql' (or skip)."""
    if request.param != "postgresql":
        return None
    pg = request.getfixturevalue("postgres")
    if pg.url is None:
        pytest.skip(pg.skip_reason)
    import sqlalchemy as sa
    from backend import db
    engine = sa.create_engine(pg.url)
    db.metadata.drop_all(engine)
    engine.dispose()
    url: str = pg.url
    return url
