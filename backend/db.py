"""Tables (SQLAlchemy Core: SQLite embedded by default, PostgreSQL from a URL)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(64), unique=True, nullable=False),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("health_authority", sa.String(64), nullable=False),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("health_authority", sa.String(64), nullable=False),
)

codes = sa.Table(
    "codes", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("short_hash", sa.String(64), unique=True, nullable=False),
    sa.Column("long_hash", sa.String(64), unique=True, nullable=False),
    sa.Column("short_expires_at", sa.Float, nullable=False),
    sa.Column("long_expires_at", sa.Float, nullable=False),
    sa.Column("test_type", sa.String(16), nullable=False),
    sa.Column("symptom_onset_interval", sa.Integer, nullable=True),
    sa.Column("issued_by", sa.String(64), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=True),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("code_id", sa.Integer, sa.ForeignKey("codes.id"), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
)

certificates = sa.Table(
    "certificates", metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("used_at", sa.Float, nullable=True),
    sa.Column("response", sa.Text, nullable=True),  # for idempotent re-publish
)

exposures = sa.Table(
    "exposures", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key_data", sa.LargeBinary(16), nullable=False, unique=True),
    sa.Column("rolling_start", sa.Integer, nullable=False),
    sa.Column("rolling_period", sa.Integer, nullable=False),
    sa.Column("transmission_risk", sa.Integer, nullable=False),
    sa.Column("report_type", sa.Integer, nullable=False),
    sa.Column("days_since_onset", sa.Integer, nullable=True),
    sa.Column("health_authority", sa.String(64), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("export_after", sa.Float, nullable=False, index=True),
    # the batch the key was exported in; NULL: not yet; 0: cannot be exported (quarantined)
    sa.Column("batch_id", sa.Integer, nullable=True, index=True),
)

batches = sa.Table(
    "export_batches", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("end", sa.Integer, nullable=False),
    sa.Column("files", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


def make_engine(url: str) -> sa.Engine:
    kw = {}
    if url.startswith("sqlite"):
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = sa.create_engine(url, **kw)
    if url.startswith("sqlite"):
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _rec):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    metadata.create_all(engine)
    return engine
