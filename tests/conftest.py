import json
import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent
DATA = TESTS / "data"


@pytest.fixture(scope="session")
def gaen_vectors():
    return json.loads((DATA / "gaen.json").read_text())
