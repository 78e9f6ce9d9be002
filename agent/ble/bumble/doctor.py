"""``ctagent doctor --radio bumble``: checks a dedicated HCI controller through the bumble
radio itself: the transport opens, what the controller is (Bluetooth version, maker,
extended advertising or legacy only), advertising starts and rotates while scanning (the
case a legacy controller refuses without our scan pause; the measured gaps), and what
scanning hears. Each check says what to fix."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version

from bumble import hci
from bumble.company_ids import COMPANY_IDENTIFIERS

from ...clock import RealClock
from ...errors import RadioError
from ...protocol.payload import EN_SERVICE_UUID16
from ..base import Check
from .radio import BumbleAdvertiser, BumbleScanner, HciSession, TransportOpener

#: Core spec version numbers (Assigned Numbers 2.1)
_VERSIONS = {6: "4.0", 7: "4.1", 8: "4.2", 9: "5.0", 10: "5.1", 11: "5.2", 12: "5.3", 13: "5.4", 14: "6.0"}
_TEST_ADDRESSES = ("3A:00:00:00:00:01", "3A:00:00:00:00:02")  # non-resolvable private, for the check only


def doctor(transport: str, *, listen_s: float = 3.0, opener: TransportOpener | None = None) -> tuple[bool, list[Check]]:
    """(all ok, the checks)."""
    return asyncio.run(check(transport, listen_s=listen_s, opener=opener))


async def check(transport: str, *, listen_s: float = 3.0,
                opener: TransportOpener | None = None) -> tuple[bool, list[Check]]:
    checks: list[Check] = []
    try:
        bumble_version = version("bumble")
    except PackageNotFoundError:
        bumble_version = "?"
    checks.append(Check("bumble", True, f"bumble {bumble_version}"))
    session = HciSession(transport, clock=RealClock(), uuid16=EN_SERVICE_UUID16, opener=opener)
    advertiser, scanner = BumbleAdvertiser(session), BumbleScanner(session)
    try:
        try:
            device = await session.ensure_open()
        except RadioError as e:
            checks.append(Check(f"transport {transport}", False, e.text))
            return False, checks
        info = await device.send_sync_command(hci.HCI_Read_Local_Version_Information_Command())
        maker = COMPANY_IDENTIFIERS.get(info.company_identifier, f"company 0x{info.company_identifier:04X}")
        kind = "extended advertising" if session.extended else "legacy advertising only (scan paused per rotation)"
        checks.append(Check(f"transport {transport}", True,
                            f"Bluetooth {_VERSIONS.get(info.hci_version, hex(info.hci_version))} controller by "
                            f"{maker}, {kind}, address {device.public_address.to_string(False)}"))
        heard: list[str] = []
        session.on_report = lambda adv: heard.append(adv.address.to_string(False))
        try:
            session.scan = True
            await session.run(session._scan_on)
            await advertiser.start(bytes(20), _TEST_ADDRESSES[0])
            await advertiser.rotate(bytes([1]) * 20, _TEST_ADDRESSES[1])
            gaps = f"advertising off {session.rotation_gaps[-1] * 1000:.1f} ms"
            if session.scan_gaps:
                gaps += f", scanning off {session.scan_gaps[-1] * 1000:.1f} ms"
            checks.append(Check("rotation while scanning", True, f"address and payload changed together ({gaps})"))
        except RadioError as e:
            checks.append(Check("rotation while scanning", False, f"{e.name}: {e.text}; report this controller "
                                "(hardware/bumble.md lists the tested ones)"))
        await asyncio.sleep(listen_s)
        others = len(set(heard))
        checks.append(Check("scanning", True, f"{len(heard)} advertisements from {others} devices in {listen_s:g} s"
                            + ("" if heard else "; none: is anything advertising nearby? (the antenna?)")))
    finally:
        await scanner.stop()
        await advertiser.stop()
    return all(c.ok for c in checks), checks
