"""The virtual controllers with the radio model (agent.ble.bumble.controller), driven by
bumble's own host over in-process HCI, on virtual event-loop time (looptime): what they
transmit, what they report and with which RSSI, what they refuse."""

from __future__ import annotations

import asyncio
import statistics

import pytest

pytest.importorskip("bumble")

from bumble import hci
from bumble.device import AdvertisingEventProperties, AdvertisingParameters, Device

from agent.ble.bumble.controller import ModelledController, RadioLink
from agent.ble.sim.shared import Placement

pytestmark = pytest.mark.looptime

NONCONN = 3  # HCI_LE_Set_Advertising_Parameters_Command.AdvertisingType.ADV_NONCONN_IND
EN_DATA = bytes.fromhex("0201 1a 03036ffd 17166ffd".replace(" ", "")) + bytes(20)  # flags, UUID 0xFD6F, service data


async def host_for(controller: ModelledController) -> Device:
    device = Device.with_hci(controller.name, hci.Address("F0:00:00:00:00:01"), controller, controller)
    await device.power_on()
    return device


async def legacy_advertise(device: Device, data: bytes, address: str) -> None:
    await device.send_command(hci.HCI_LE_Set_Random_Address_Command(random_address=hci.Address(address)),
                              check_result=True)
    await device.send_command(hci.HCI_LE_Set_Advertising_Parameters_Command(
        advertising_interval_min=320, advertising_interval_max=432, advertising_type=NONCONN, own_address_type=1,
        peer_address_type=0, peer_address=hci.Address.ANY, advertising_channel_map=7, advertising_filter_policy=0),
        check_result=True)
    await device.send_command(hci.HCI_LE_Set_Advertising_Data_Command(advertising_data=data), check_result=True)
    await device.send_command(hci.HCI_LE_Set_Advertising_Enable_Command(advertising_enable=1), check_result=True)


def record(device: Device) -> list:
    heard: list = []
    device.on("advertisement", heard.append)
    return heard


async def test_rssi_follows_the_radio_model_and_falls_with_distance() -> None:
    link = RadioLink(seed=3)
    rx = ModelledController("rx", link=link, placement=Placement(0, 0))
    near = ModelledController("near", link=link, placement=Placement(0.5, 0))
    far = ModelledController("far", link=link, placement=Placement(6, 0), legacy=True)
    r, n, f = [await host_for(c) for c in (rx, near, far)]
    heard = record(r)
    await r.start_scanning(active=False)
    await legacy_advertise(n, EN_DATA, "01:00:00:00:00:01")
    await legacy_advertise(f, EN_DATA, "02:00:00:00:00:02")
    await asyncio.sleep(60)
    by = {a: [h.rssi for h in heard if str(h.address).startswith(a)] for a in ("01:", "02:")}
    # every event: 1/0.235 s less 10 % loss -> ~230 a minute for the near one
    assert 180 < len(by["01:"]) < 280, len(by["01:"])
    assert statistics.median(by["01:"]) > statistics.median(by["02:"]) + 15
    # the model's mean for the pair, less the Rayleigh median (-1.6 dB), within shadowing
    expected = link.channel.mean_rssi(0, 1, asyncio.get_running_loop().time())
    assert abs(statistics.median(by["01:"]) - (expected - 1.6)) < 3
    assert all(h.is_legacy and not h.is_connectable and not h.is_scannable for h in heard)
    assert not any(h.is_scan_response for h in heard)


async def test_same_seed_same_draws() -> None:
    async def run() -> list[int]:
        link = RadioLink(seed=9)
        a, b = ModelledController("a", link=link), ModelledController("b", link=link, placement=Placement(2, 0))
        da, db = await host_for(a), await host_for(b)
        heard = record(da)
        await da.start_scanning(active=False)
        await legacy_advertise(db, EN_DATA, "01:00:00:00:00:01")
        await asyncio.sleep(10)
        await da.stop_scanning()
        return [h.rssi for h in heard]

    first, second = await run(), await run()
    assert first == second and len(first) > 20


async def test_legacy_only_controller_has_no_extended_advertising() -> None:
    link = RadioLink()
    pi3, ext = ModelledController("pi3", link=link, legacy=True), ModelledController("ext", link=link)
    d_pi3, d_ext = await host_for(pi3), await host_for(ext)
    assert not d_pi3.supports_le_extended_advertising and d_ext.supports_le_extended_advertising
    assert not d_pi3.host.supports_command(hci.HCI_LE_SET_EXTENDED_ADVERTISING_PARAMETERS_COMMAND)
    assert d_ext.host.supports_command(hci.HCI_LE_SET_EXTENDED_ADVERTISING_PARAMETERS_COMMAND)
    version = await d_pi3.send_command(hci.HCI_Read_Local_Version_Information_Command())
    assert version.return_parameters.hci_version == 0x07  # Bluetooth 4.1
    answer = await d_pi3.send_command(hci.HCI_LE_Set_Advertising_Set_Random_Address_Command(
        advertising_handle=0, random_address=hci.Address("01:02:03:04:05:06")))
    assert answer.return_parameters.status == hci.HCI_ErrorCode.UNKNOWN_HCI_COMMAND_ERROR
    # a 4.1 scanner hears legacy PDUs of an extended set, not extended PDUs
    heard = record(d_pi3)
    await d_pi3.start_scanning(active=False)
    await d_ext.create_advertising_set(
        advertising_parameters=AdvertisingParameters(AdvertisingEventProperties(is_connectable=False),
                                                     primary_advertising_interval_min=200,
                                                     primary_advertising_interval_max=270),
        random_address=hci.Address("03:00:00:00:00:03"), advertising_data=EN_DATA)
    await d_ext.create_advertising_set(
        advertising_parameters=AdvertisingParameters(
            AdvertisingEventProperties(is_connectable=False, is_legacy=True), primary_advertising_interval_min=200,
            primary_advertising_interval_max=270),
        random_address=hci.Address("04:00:00:00:00:04"), advertising_data=EN_DATA)
    await asyncio.sleep(5)
    assert {str(h.address)[:2] for h in heard} == {"04"}


async def test_set_random_address_is_refused_while_scanning_or_advertising() -> None:
    link = RadioLink()
    c = ModelledController("c", link=link, legacy=True)
    d = await host_for(c)

    async def set_address(a: str) -> int:
        answer = await d.send_command(hci.HCI_LE_Set_Random_Address_Command(random_address=hci.Address(a)))
        return int(answer.return_parameters.status)

    assert await set_address("01:00:00:00:00:01") == hci.HCI_ErrorCode.SUCCESS
    await d.start_scanning(active=False)
    assert await set_address("01:00:00:00:00:02") == hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR
    await d.stop_scanning()
    await legacy_advertise(d, EN_DATA, "01:00:00:00:00:03")
    assert await set_address("01:00:00:00:00:04") == hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR
    await d.send_command(hci.HCI_LE_Set_Advertising_Enable_Command(advertising_enable=0), check_result=True)
    assert await set_address("01:00:00:00:00:05") == hci.HCI_ErrorCode.SUCCESS
    assert c.refused_address_changes == 2


async def test_an_extended_set_changes_its_address_while_on_unless_connectable() -> None:
    link = RadioLink()
    d = await host_for(ModelledController("c", link=link))
    params = AdvertisingParameters(AdvertisingEventProperties(is_connectable=False, is_legacy=True),
                                   primary_advertising_interval_min=200, primary_advertising_interval_max=270)
    nonconn = await d.create_advertising_set(advertising_parameters=params, advertising_data=EN_DATA,
                                             random_address=hci.Address("01:00:00:00:00:01"))
    await nonconn.set_random_address(hci.Address("01:00:00:00:00:02"))  # no error
    conn = await d.create_advertising_set(random_address=hci.Address("C1:00:00:00:00:01"))
    with pytest.raises(hci.HCI_Error) as refused:
        await conn.set_random_address(hci.Address("C1:00:00:00:00:02"))
    assert refused.value.error_code == hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR


@pytest.mark.parametrize(("mode", "expected"), [("data", (1, 2)), ("address", (1, 1)), ("off", (20, 40))])
async def test_duplicate_filter_modes(mode: str, expected: tuple[int, int]) -> None:
    link = RadioLink()
    a = ModelledController("a", link=link, duplicate_filter=mode)
    b = ModelledController("b", link=link, placement=Placement(1, 0))
    da, db = await host_for(a), await host_for(b)
    heard = record(da)
    await da.start_scanning(active=False, filter_duplicates=True)
    await legacy_advertise(db, EN_DATA, "01:00:00:00:00:01")
    await asyncio.sleep(10)
    assert len(heard) >= expected[0] and (mode == "off" or len(heard) == expected[0])
    await db.send_command(hci.HCI_LE_Set_Advertising_Data_Command(advertising_data=EN_DATA[:-1] + b"\x01"),
                          check_result=True)
    await asyncio.sleep(10)
    assert len(heard) >= expected[1] and (mode == "off" or len(heard) == expected[1])


async def test_active_scan_gets_scan_responses_of_scannable_advertising_only() -> None:
    link = RadioLink()
    a, b = ModelledController("a", link=link), ModelledController("b", link=link, placement=Placement(1, 0))
    da, db = await host_for(a), await host_for(b)
    heard = record(da)
    await da.start_scanning(active=True)
    await db.start_advertising(advertising_data=EN_DATA[:3], scan_response_data=bytes.fromhex("0409414243"),
                               advertising_interval_min=200, advertising_interval_max=270)
    await asyncio.sleep(3)
    assert heard and all(h.is_connectable for h in heard)
    assert any(h.data.get(0x09) == "ABC" for h in heard)  # the name, from the scan response


async def test_scan_window_limits_what_is_heard() -> None:
    link = RadioLink(seed=1)
    a, b = ModelledController("a", link=link), ModelledController("b", link=link, placement=Placement(1, 0))
    da, db = await host_for(a), await host_for(b)
    heard = record(da)
    await da.start_scanning(active=False, scan_interval=100, scan_window=25, legacy=True)
    await legacy_advertise(db, EN_DATA, "01:00:00:00:00:01")
    await asyncio.sleep(60)
    assert 30 < len(heard) < 90  # a quarter of ~230


def test_the_vhci_runner_reads_its_controllers_and_rejects_mistakes(tmp_path) -> None:
    from agent.ble.bumble.vhci import main, parse_specs
    from agent.errors import InputFileError

    scenario = tmp_path / "s.json"
    scenario.write_text('{"devices": {"carol": {"position": [3, 4], "carriage": "pocket", "room": 1}}}')

    def specs(*argv: str):
        import argparse

        ns = argparse.Namespace(controllers=[], scenario=None, transport=[], tx_power_dbm=[], rx_correction_db=[])
        for a in argv:
            if a.startswith("--scenario="):
                ns.scenario = a.split("=", 1)[1]
            elif a.startswith("--transport="):
                ns.transport.append(a.split("=", 1)[1])
            else:
                ns.controllers.append(a)
        return parse_specs(ns)

    got = specs("alice=0,0", "bob=1.5,-2:legacy", "carol", f"--scenario={scenario}", "--transport=bob=tcp-server:_:9")
    assert [(s.name, s.placement.x, s.placement.y, s.legacy, s.transport) for s in got] == [
        ("alice", 0, 0, False, "vhci"), ("bob", 1.5, -2, True, "tcp-server:_:9"), ("carol", 3, 4, False, "vhci")]
    assert got[2].placement.carriage == "pocket" and got[2].placement.room == 1
    for bad, why in ((("alice=0",), "NAME=X,Y"), (("alice",), "no position"), (("a=0,0", "a=1,1"), "own name"),
                     (("a=0,0", "--transport=b=usb:0"), "NAME=VALUE"), (("a=1e999,0",), "finite")):
        with pytest.raises(InputFileError, match=why):
            specs(*bad)
    assert main(["x=1,2,3"]) == 2
