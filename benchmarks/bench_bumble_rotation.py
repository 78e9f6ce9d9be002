"""Bumble radio rotation benchmark: what a rotation costs on air, on virtual controllers
with the project's radio model served over TCP (``agent.ble.bumble.vhci`` with
``tcp-server`` transports, so every HCI command crosses a socket as it would cross USB),
in real time.

Three agents rotate address and payload every ``--every`` seconds while they scan: one
on an extended-advertising controller, one on a legacy-only (Raspberry Pi 3) controller,
and the naive reference, which changes its set's address and then its data while the
set stays on (``AdvertisingSet.set_random_address`` + ``set_advertising_data``). A
listener 1 m away counts what it hears: samples per second per peer, and "mixed" reports
(a new address with the old payload), which link two identities.

Run:  .venv/bin/python -m benchmarks.bench_bumble_rotation [--rotations 40] [--every 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

from bumble import hci
from rich.console import Console
from rich.table import Table

from agent.ble.base import RawSighting
from agent.ble.bumble.radio import BumbleAdvertiser, BumbleScanner, HciSession, advertising_data
from agent.ble.bumble.vhci import ControllerSpec, serve
from agent.ble.sim.shared import Placement
from agent.clock import RealClock
from agent.protocol.payload import EN_SERVICE_UUID, EN_SERVICE_UUID16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nrpa(agent: int, i: int) -> str:
    return f"3{agent}:00:00:00:{i // 256:02X}:{i % 256:02X}"


def payload(agent: int, i: int) -> bytes:
    return bytes([agent, i % 256]) + bytes(18)


async def run(rotations: int, every: float) -> list[tuple[str, str, str, str, str]]:
    names = ["extended", "legacy", "naive", "listener"]
    ports = {n: free_port() for n in names}
    specs = [ControllerSpec(n, Placement(0.1 * k, 0) if n != "listener" else Placement(1.0, 0), legacy=n == "legacy",
                            transport=f"tcp-server:127.0.0.1:{ports[n]}") for k, n in enumerate(names)]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(specs, stop=stop, announce=False))
    await asyncio.sleep(0.5)
    sessions = {n: HciSession(f"tcp-client:127.0.0.1:{ports[n]}", clock=RealClock(), uuid16=EN_SERVICE_UUID16)
                for n in names}
    heard: list[RawSighting] = []

    async def listen(scanner: BumbleScanner, keep: bool) -> None:
        async for s in scanner.sightings():
            if keep:
                heard.append(s)

    scanners = {n: BumbleScanner(s) for n, s in sessions.items()}
    tasks = [asyncio.create_task(listen(sc, n == "listener")) for n, sc in scanners.items()]
    advertisers = {n: BumbleAdvertiser(sessions[n]) for n in names[:3]}
    for k, adv in enumerate(advertisers.values()):
        await adv.start(payload(k, 0), nrpa(k, 0))
    naive_set = sessions["naive"].adv_set
    assert naive_set is not None
    t0 = time.monotonic()
    for i in range(1, rotations + 1):
        await asyncio.sleep(every)
        for k, (n, adv) in enumerate(advertisers.items()):
            if n == "naive":  # the reference: the set stays on while address, then data, change
                await naive_set.set_random_address(hci.Address(nrpa(k, i), hci.Address.RANDOM_DEVICE_ADDRESS))
                await asyncio.sleep(0.02)  # the time an HCI round trip takes on a slow UART
                await naive_set.set_advertising_data(advertising_data(EN_SERVICE_UUID16, payload(k, i)))
            else:
                await adv.rotate(payload(k, i), nrpa(k, i))
    await asyncio.sleep(every)
    duration = time.monotonic() - t0
    for n in names:
        await scanners[n].stop()
        if n in advertisers:
            await advertisers[n].stop()
    for t in tasks:
        t.cancel()
    stop.set()
    await server
    rows = []
    for k, n in enumerate(names[:3]):
        mine = [s for s in heard if s.service_data[EN_SERVICE_UUID][0] == k]
        mixed = sum(1 for s in mine if s.address != nrpa(k, s.service_data[EN_SERVICE_UUID][1]))
        gaps = sessions[n].rotation_gaps
        scan = sessions[n].scan_gaps
        rows.append((n, f"{len(mine) / duration:.2f}",
                     f"{statistics.median(gaps) * 1000:.1f} / {max(gaps) * 1000:.1f}" if gaps else "none (stays on)",
                     f"{statistics.median(scan) * 1000:.1f} / {max(scan) * 1000:.1f}" if scan else "none",
                     f"{mixed} of {len(mine)}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=int, default=40)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between rotations")
    args = parser.parse_args()
    rows = asyncio.run(run(args.rotations, args.every))
    table = Table(title=f"{args.rotations} rotations every {args.every:g} s while scanning, over TCP")
    for col in ("controller", "samples/s heard 1 m away", "advertising off per rotation, ms (median / max)",
                "scanning off per rotation, ms", "mixed reports (new address, old payload)"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
