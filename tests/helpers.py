"""Shared helpers for tests (not fixtures)."""

from agent.store import Passphrase

#: scrypt parameters small enough for fast tests (the default is n=2**15)
FAST_SCRYPT = {"n": 2**10, "r": 8, "p": 1}


def fast_passphrase(p: str = "correct horse battery staple") -> Passphrase:
    return Passphrase(p, scrypt=FAST_SCRYPT)


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
