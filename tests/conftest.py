import json
import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent
DATA = TESTS / "data"


@pytest.fixture(scope="session")
def gaen_vectors():
    return json.loads((DATA / "gaen.json").read_text())


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for the whole run (skips when it cannot start)."""
    from .postgres_fixture import PostgresServer
    srv = PostgresServer()
    srv.start()
    yield srv
    srv.stop()


def database_url(request, clock=None) -> str | None:
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
    return pg.url
