"""Optional parts of the install (pyproject's extras): the base install is what a device
needs; a command that needs more names the extra to install, in one sentence, instead of
failing with an import traceback."""

from __future__ import annotations

import importlib

from .errors import UserError

#: extra -> the modules it brings (import names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "backend": ("fastapi", "uvicorn", "sqlalchemy", "jwt", "qrcode", "multipart"),
    "postgresql": ("psycopg",),
    "plots": ("matplotlib",),
    "bumble": ("bumble",),
    "experiment": ("duckdb",),
    "fleet": ("ansible",),
}


def missing_module(extra: str) -> str | None:
    """The first module of ``extra`` that cannot be imported, or None."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def require(*extras: str, what: str, install: str | None = None) -> None:
    """Raise a :class:`UserError` naming the extra to install (``install``, else the one
    missing) when ``what`` (e.g. "`ctagent backend`") needs one that is missing."""
    for extra in extras:
        module = missing_module(extra)
        if module is not None:
            name = install or extra
            raise UserError(f"{what} needs the [{name}] extra, which is not installed ({module} is missing): "
                            f"pip install 'ctagent[{name}]'")
