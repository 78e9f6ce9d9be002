"""Reference backend, split by role: verification (accounts, codes, certificates),
publish (validation and storage of uploaded keys), exports (signed key files), the
physicians' web page and the ROBERT server role. The API shapes follow the public
Exposure Notifications verification and key servers, and ROBERT's API v6.

    from backend import Backend, BackendConfig
    backend = Backend(BackendConfig(Path("backend-data")))
    backend.verification.issue_code("lab")
"""

from .config import BackendConfig
from .service import Backend

__all__ = ["Backend", "BackendConfig"]
