"""Virtual Bluetooth LE controllers with the project's radio model, on bumble.

Stock bumble controllers hear each other at a fixed -50 dBm, never transmit legacy
non-connectable advertising, always offer extended advertising and accept every address
change. :class:`ModelledController` changes only that (a small subclass of
``bumble.controller.Controller``, bumble pinned exactly in pyproject):

- (a) every advertising event goes through a :class:`RadioLink`, which draws per
  receiver whether the packet arrives and its RSSI from the project's one radio model
  (``agent.ble.sim.medium.PacketChannel``: path loss, body and wall loss, shadowing,
  Rayleigh fading, loss, sensitivity; placements given to the link; seeded);
- (b) it transmits what the host asked for: legacy ``ADV_IND``, ``ADV_SCAN_IND``,
  ``ADV_NONCONN_IND`` (legacy commands, or an extended set with legacy PDUs) and
  extended PDUs, every advertising interval plus the 0-10 ms advDelay (Core v5.3 Vol 6
  Part B 4.4.2.2.1); scanners report them with the right event type, passive or active
  (scan responses only to an active scan of a scannable PDU), with or without duplicate
  filtering (``duplicate_filter``: per address and data, as many chips do; per address
  only, the spec's minimum; or ``off``, a chip whose filter forgets at once), and hear
  only for the scan window's share of the interval;
- (c) ``legacy=True`` models a Raspberry Pi 3's controller (Broadcom BCM43438,
  Bluetooth 4.1): no extended advertising or scanning commands or feature bits, no 4.2/5.0
  LE features (data length extension, LL privacy, 2M/Coded PHY);
- (d) it refuses ``HCI_LE_Set_Random_Address`` with Command Disallowed (0x0C) while
  scanning or legacy advertising is enabled (Core v5.2 Vol 4 Part E 7.8.4), and
  ``HCI_LE_Set_Advertising_Set_Random_Address`` while that set advertises connectably
  (7.8.52), as real chips do.

Controllers on one :class:`RadioLink` hear each other in-process (tests); ``vhci``
attaches them to Linux (``python -m agent.ble.bumble.vhci``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any

from bumble import hci, ll
from bumble.controller import Controller
from bumble.link import LocalLink

from ..sim.medium import MediumConfig, PacketChannel, SimDevice
from ..sim.shared import Placement

log = logging.getLogger("ctagent.bumble")

_Props = hci.HCI_LE_Set_Extended_Advertising_Parameters_Command.AdvertisingProperties
_LegacyType = hci.HCI_LE_Set_Advertising_Parameters_Command.AdvertisingType
_Report = hci.HCI_LE_Advertising_Report_Event
_ExtReport = hci.HCI_LE_Extended_Advertising_Report_Event

#: what a controller's duplicate filter compares, when the host turns it on
DUPLICATE_FILTERS = ("data", "address", "off")
#: Core v5.3 Vol 6 Part B 4.4.2.2.1: advDelay, a pseudo-random 0-10 ms added to every event
ADV_DELAY_MAX_S = 0.010
#: legacy advertising data and scan response: 31 bytes (Vol 6 Part B 2.3.1)
LEGACY_DATA_MAX = 31

#: commands a Bluetooth 4.1 controller does not have (extended advertising, scanning and
#: connection, periodic advertising: 5.0; PHY, data length, LL privacy, P-256: 4.2/5.0)
_NOT_IN_4_1 = (
    "le_set_advertising_set_random_address", "le_set_extended_advertising_parameters",
    "le_set_extended_advertising_data", "le_set_extended_scan_response_data", "le_set_extended_advertising_enable",
    "le_read_maximum_advertising_data_length", "le_read_number_of_supported_advertising_sets",
    "le_remove_advertising_set", "le_clear_advertising_sets", "le_set_periodic_advertising_parameters",
    "le_set_periodic_advertising_data", "le_set_periodic_advertising_enable", "le_set_extended_scan_parameters",
    "le_set_extended_scan_enable", "le_extended_create_connection", "le_periodic_advertising_create_sync",
    "le_periodic_advertising_create_sync_cancel", "le_periodic_advertising_terminate_sync",
    "le_read_phy", "le_set_default_phy", "le_set_phy", "le_set_data_length",
    "le_read_suggested_default_data_length", "le_write_suggested_default_data_length",
    "le_read_maximum_data_length", "le_add_device_to_resolving_list", "le_remove_device_from_resolving_list",
    "le_clear_resolving_list", "le_read_resolving_list_size", "le_set_address_resolution_enable",
    "le_set_resolvable_private_address_timeout", "le_read_peer_resolvable_address",
    "le_read_local_resolvable_address", "le_read_local_p_256_public_key", "le_set_privacy_mode",
    "le_read_transmit_power", "le_read_buffer_size_v2", "le_receiver_test_v2", "le_transmitter_test_v2",
)
#: commands an extended-advertising controller announces (stock bumble handles them but
#: leaves them out of its Supported Commands, and Linux looks there)
_EXTENDED_COMMANDS = (
    "le_set_advertising_set_random_address", "le_set_extended_advertising_parameters",
    "le_set_extended_advertising_data", "le_set_extended_scan_response_data", "le_set_extended_advertising_enable",
    "le_read_maximum_advertising_data_length", "le_read_number_of_supported_advertising_sets",
    "le_remove_advertising_set", "le_clear_advertising_sets", "le_set_extended_scan_parameters",
    "le_set_extended_scan_enable", "le_extended_create_connection",
)
#: LE features of a Bluetooth 4.1 controller (Vol 6 Part B 4.6)
_LE_FEATURES_4_1 = (hci.LeFeatureMask.LE_ENCRYPTION | hci.LeFeatureMask.CONNECTION_PARAMETERS_REQUEST_PROCEDURE
                    | hci.LeFeatureMask.EXTENDED_REJECT_INDICATION
                    | hci.LeFeatureMask.PERIPHERAL_INITIATED_FEATURE_EXCHANGE | hci.LeFeatureMask.LE_PING)
BROADCOM = 0x000F
HCI_VERSION_4_1 = 0x07


def _opcode(name: str) -> int:
    opcode: int = getattr(hci, f"HCI_{name.upper()}_COMMAND")
    return opcode


def public_address_for(name: str) -> hci.Address:
    """A stable public address for a named controller (so a harness finds it by name)."""
    raw = bytearray(hashlib.sha256(name.encode()).digest()[:6])
    raw[5] &= 0xFC  # a unicast, globally administered-looking address (top byte, bit order of hci.Address)
    return hci.Address(bytes(raw), hci.Address.PUBLIC_DEVICE_ADDRESS)


@dataclass(frozen=True)
class AirPacket:
    """One advertising PDU on air, as the link carries it (what a receiver can report)."""

    address: hci.Address
    data: bytes
    legacy: bool
    connectable: bool = False
    scannable: bool = False
    scan_response: bytes = b""
    sid: int = 0
    tx_power: int | None = None

    @property
    def legacy_type(self) -> int:
        """The legacy report's event type (Vol 4 Part E 7.7.65.2)."""
        if self.connectable:
            return int(_Report.EventType.ADV_IND)
        return int(_Report.EventType.ADV_SCAN_IND if self.scannable else _Report.EventType.ADV_NONCONN_IND)


class RadioLink(LocalLink):
    """The air between :class:`ModelledController` instances of one process: every
    advertising event reaches each other controller that is scanning, with the RSSI the
    project's radio model draws for that sender->receiver pair at their placements."""

    def __init__(self, *, seed: int = 0, config: MediumConfig | None = None) -> None:
        super().__init__()
        self.seed, self.config = seed, config or MediumConfig()
        self.order: list[ModelledController] = []
        self._channel: PacketChannel | None = None
        self.transmitted = 0
        self.delivered = 0

    def add_controller(self, controller: Controller) -> None:
        if not isinstance(controller, ModelledController):
            raise TypeError("a RadioLink carries ModelledController instances only")
        super().add_controller(controller)
        self.order.append(controller)
        self._channel = None  # rebuilt with the new member

    def remove_controller(self, controller: Controller) -> None:
        super().remove_controller(controller)
        self.order.remove(controller)  # type: ignore[arg-type]
        self._channel = None

    @property
    def channel(self) -> PacketChannel:
        if self._channel is None:
            devices = [SimDevice(c.name, c.tx_power_dbm, c.rx_correction_db, c.placement.carriage) for c in self.order]
            self._channel = PacketChannel(devices, [(c.placement.x, c.placement.y) for c in self.order],
                                          [c.placement.room for c in self.order], self.config, seed=self.seed)
        return self._channel

    def move(self, controller: ModelledController, x: float, y: float) -> None:
        controller.placement = Placement(x, y, controller.placement.carriage, controller.placement.room)
        self.channel.move(self.order.index(controller), x, y)

    def transmit(self, sender: ModelledController, packet: AirPacket) -> None:
        """One advertising event of ``sender``: delivered to every receiver it reaches."""
        self.transmitted += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        tx = self.order.index(sender)
        for rx, receiver in enumerate(self.order):
            if receiver is sender or not receiver.listening():
                continue
            rssi = self.channel.packet_rssi(rx, tx, now)
            if rssi is not None:
                self.delivered += 1
                loop.call_soon(receiver.on_air_packet, packet, rssi)

    def find_le_controller(self, address: hci.Address) -> Controller | None:
        # an advertising set has its own address: connections to it must find it too
        for c in self.order:
            if any(s.random_address == address for s in c.advertising_sets.values()):
                return c
        return super().find_le_controller(address)


class ModelledController(Controller):
    """A bumble controller on a :class:`RadioLink` (see the module's docstring)."""

    def __init__(self, name: str, *, link: RadioLink, placement: Placement | None = None,
                 legacy: bool = False, tx_power_dbm: float = 4.0, rx_correction_db: float = 0.0,
                 host_source: Any = None, host_sink: Any = None, seed: int | None = None,
                 duplicate_filter: str = "data") -> None:
        if duplicate_filter not in DUPLICATE_FILTERS:
            raise ValueError(f"duplicate_filter must be one of {DUPLICATE_FILTERS}")
        self.duplicate_filter = duplicate_filter
        self.placement = placement or Placement(0.0, 0.0)
        self.legacy = legacy
        self.tx_power_dbm, self.rx_correction_db = tx_power_dbm, rx_correction_db
        self._rng = random.Random(f"{link.seed}/{name}" if seed is None else seed)
        self._tx_timers: dict[int | str, asyncio.TimerHandle] = {}
        self._scan_duty = 1.0
        self._extended_scan = False
        self._reported: set[tuple[bytes, bytes]] = set()
        self.refused_address_changes = 0
        if legacy:
            self.hci_version = self.lmp_version = HCI_VERSION_4_1
            self.manufacturer_company_identifier = BROADCOM
            self.le_features = _LE_FEATURES_4_1
            self.supported_commands = self.supported_commands - {_opcode(n) for n in _NOT_IN_4_1}
            for name_ in _NOT_IN_4_1:  # the dispatcher then answers Unknown HCI Command
                setattr(self, f"on_hci_{name_}_command", self.on_hci_command)
        else:
            self.supported_commands = self.supported_commands | {_opcode(n) for n in _EXTENDED_COMMANDS}
        super().__init__(name, host_source=host_source, host_sink=host_sink, link=link,
                         public_address=public_address_for(name))
        self.link: RadioLink = link

    # -- transmitting -----------------------------------------------------------------------
    def _schedule(self, key: int | str, interval_units: tuple[int, int]) -> None:
        self._cancel(key)
        low, high = sorted(interval_units)
        delay = self._rng.uniform(low, high) * 0.625e-3 + self._rng.uniform(0, ADV_DELAY_MAX_S)
        self._tx_timers[key] = asyncio.get_running_loop().call_later(max(delay, 0.02), self._advertising_event, key)

    def _cancel(self, key: int | str) -> None:
        if (timer := self._tx_timers.pop(key, None)) is not None:
            timer.cancel()

    def _first_event(self, key: int | str) -> None:
        self._cancel(key)
        self._tx_timers[key] = asyncio.get_running_loop().call_later(
            self._rng.uniform(0, ADV_DELAY_MAX_S), self._advertising_event, key)

    def _advertising_event(self, key: int | str) -> None:
        self._tx_timers.pop(key, None)
        if key == "legacy":
            adv = self.le_legacy_advertiser
            if not adv.enabled:
                return
            if adv.advertising_type in (_LegacyType.ADV_DIRECT_IND, _LegacyType.ADV_DIRECT_IND_LOW_DUTY):
                pass  # directed advertising carries no data to report to scanners
            else:
                self.link.transmit(self, AirPacket(
                    adv.address, bytes(adv.advertising_data), legacy=True,
                    connectable=adv.advertising_type == _LegacyType.ADV_IND,
                    scannable=adv.advertising_type in (_LegacyType.ADV_IND, _LegacyType.ADV_SCAN_IND),
                    scan_response=bytes(adv.scan_response_data)))
            self._schedule(key, (adv.advertising_interval_min, adv.advertising_interval_max))
            return
        assert isinstance(key, int)
        adv_set = self.advertising_sets.get(key)
        if adv_set is None or not adv_set.enabled or adv_set.parameters is None or adv_set.address is None:
            return
        params = adv_set.parameters
        props = _Props(params.advertising_event_properties)
        self.link.transmit(self, AirPacket(
            adv_set.address, bytes(adv_set.data), legacy=bool(props & _Props.USE_LEGACY_ADVERTISING_PDUS),
            connectable=bool(props & _Props.CONNECTABLE_ADVERTISING),
            scannable=bool(props & _Props.SCANNABLE_ADVERTISING), scan_response=bytes(adv_set.scan_response_data),
            sid=params.advertising_sid,
            tx_power=int(self.tx_power_dbm) if props & _Props.INCLUDE_TX_POWER else None))
        self._schedule(key, (params.primary_advertising_interval_min, params.primary_advertising_interval_max))

    def on_hci_le_set_advertising_enable_command(
            self, command: hci.HCI_LE_Set_Advertising_Enable_Command) -> hci.HCI_StatusReturnParameters:
        adv = self.le_legacy_advertiser
        adv.enabled = bool(command.advertising_enable)
        if adv.enabled:
            self._first_event("legacy")
        else:
            self._cancel("legacy")
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    def on_hci_le_set_extended_advertising_enable_command(
            self, command: hci.HCI_LE_Set_Extended_Advertising_Enable_Command) -> hci.HCI_StatusReturnParameters:
        handles = list(command.advertising_handles) or (list(self.advertising_sets) if not command.enable else [])
        if any(h not in self.advertising_sets for h in handles):
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.UNKNOWN_ADVERTISING_IDENTIFIER_ERROR)
        for h in handles:
            adv_set = self.advertising_sets[h]
            if command.enable:
                legacy_pdus = adv_set.parameters is not None and (
                    _Props(adv_set.parameters.advertising_event_properties) & _Props.USE_LEGACY_ADVERTISING_PDUS)
                if legacy_pdus and len(adv_set.data) > LEGACY_DATA_MAX:
                    return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.INVALID_COMMAND_PARAMETERS_ERROR)
                adv_set.enabled = True
                self._first_event(h)
            else:
                adv_set.enabled = False
                self._cancel(h)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    @property
    def is_advertising(self) -> bool:
        return bool(self._tx_timers)

    # -- addresses (d) ----------------------------------------------------------------------
    def on_hci_le_set_random_address_command(
            self, command: hci.HCI_LE_Set_Random_Address_Command) -> hci.HCI_StatusReturnParameters:
        # Core v5.2 Vol 4 Part E 7.8.4: Command Disallowed while scanning or legacy advertising
        if self.le_scan_enable or self.le_legacy_advertiser.enabled:
            self.refused_address_changes += 1
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        return super().on_hci_le_set_random_address_command(command)

    def on_hci_le_set_advertising_set_random_address_command(
            self, command: hci.HCI_LE_Set_Advertising_Set_Random_Address_Command) -> hci.HCI_StatusReturnParameters:
        # 7.8.52: Command Disallowed while that set advertises connectably
        adv_set = self.advertising_sets.get(command.advertising_handle)
        if (adv_set is not None and adv_set.enabled and adv_set.parameters is not None
                and _Props(adv_set.parameters.advertising_event_properties) & _Props.CONNECTABLE_ADVERTISING):
            self.refused_address_changes += 1
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        return super().on_hci_le_set_advertising_set_random_address_command(command)

    # -- scanning -----------------------------------------------------------------------------
    def on_hci_le_set_scan_parameters_command(
            self, command: hci.HCI_LE_Set_Scan_Parameters_Command) -> hci.HCI_StatusReturnParameters:
        result = super().on_hci_le_set_scan_parameters_command(command)
        if result.status == hci.HCI_ErrorCode.SUCCESS:
            self._scan_duty = min(1.0, command.le_scan_window / max(1, command.le_scan_interval))
        return result

    def on_hci_le_set_extended_scan_parameters_command(
            self, command: hci.HCI_LE_Set_Extended_Scan_Parameters_Command) -> hci.HCI_StatusReturnParameters:
        if self.le_scan_enable:  # Vol 4 Part E 7.8.64: Command Disallowed while scanning
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        result = super().on_hci_le_set_extended_scan_parameters_command(command)
        if command.scan_intervals:
            self.le_scan_type = command.scan_types[0]
            self._scan_duty = min(1.0, command.scan_windows[0] / max(1, command.scan_intervals[0]))
        return result

    def on_hci_le_set_scan_enable_command(
            self, command: hci.HCI_LE_Set_Scan_Enable_Command) -> hci.HCI_StatusReturnParameters:
        if command.le_scan_enable and not self.le_scan_enable:
            self._reported.clear()
        self._extended_scan = False
        return super().on_hci_le_set_scan_enable_command(command)

    def on_hci_le_set_extended_scan_enable_command(
            self, command: hci.HCI_LE_Set_Extended_Scan_Enable_Command) -> hci.HCI_StatusReturnParameters:
        if command.enable and not self.le_scan_enable:
            self._reported.clear()
        self._extended_scan = True
        return super().on_hci_le_set_extended_scan_enable_command(command)

    def listening(self) -> bool:
        """Scanning now, and inside a scan window (its share of the scan interval)."""
        return self.le_scan_enable and (self._scan_duty >= 1.0 or self._rng.random() < self._scan_duty)

    def on_air_packet(self, packet: AirPacket, rssi: int) -> None:
        """A packet the link delivered with the modelled ``rssi``: report it to the host."""
        if not self.le_scan_enable or (self.legacy and not packet.legacy):
            return  # a 4.x scanner does not receive extended PDUs
        if self.filter_duplicates and self.duplicate_filter != "off":  # Vol 6 Part B 4.4.3.5
            key = (bytes(packet.address.address_bytes), packet.data if self.duplicate_filter == "data" else b"")
            if key in self._reported:
                return
            self._reported.add(key)
        rssi = max(-127, min(20, rssi))
        active = self.le_scan_type == hci.HCI_LE_Set_Scan_Parameters_Command.ACTIVE_SCANNING
        self._report(packet, rssi, scan_response=False)
        if active and packet.scannable:
            self._report(packet, rssi, scan_response=True)
        if (self.pending_le_connection is not None and packet.connectable
                and self.pending_le_connection.peer_address == packet.address):
            self.create_le_connection(packet.address)

    def _report(self, packet: AirPacket, rssi: int, *, scan_response: bool) -> None:
        data = packet.scan_response if scan_response else packet.data
        if not self._extended_scan:
            event_type = int(_Report.EventType.SCAN_RSP) if scan_response else packet.legacy_type
            self.send_hci_packet(_Report([_Report.Report(
                event_type=event_type, address_type=packet.address.address_type, address=packet.address, data=data,
                rssi=rssi)]))
            return
        flags = _ExtReport.EventType(0)
        if packet.connectable:
            flags |= _ExtReport.EventType.CONNECTABLE_ADVERTISING
        if packet.scannable:
            flags |= _ExtReport.EventType.SCANNABLE_ADVERTISING
        if scan_response:
            flags |= _ExtReport.EventType.SCAN_RESPONSE
        if packet.legacy:
            flags |= _ExtReport.EventType.LEGACY_ADVERTISING_PDU_USED
        self.send_hci_packet(_ExtReport([_ExtReport.Report(
            event_type=int(flags), address_type=packet.address.address_type, address=packet.address,
            primary_phy=hci.Phy.LE_1M, secondary_phy=0 if packet.legacy else hci.Phy.LE_1M,
            advertising_sid=_ExtReport.NO_ADI_FIELD_PROVIDED if packet.legacy else packet.sid,
            tx_power=(_ExtReport.TX_POWER_INFORMATION_NOT_AVAILABLE if packet.tx_power is None
                      else packet.tx_power & 0xFF),
            rssi=rssi, periodic_advertising_interval=0, direct_address_type=0, direct_address=hci.Address.ANY,
            data=data)]))

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        # as bumble's, without formatting every packet for a debug log nobody reads
        # (a third of the time of a busy link)
        if self.host:
            asyncio.get_running_loop().call_soon(self.host.on_packet, bytes(packet))

    def on_ll_advertising_pdu(self, packet: ll.AdvertisingPdu) -> None:
        # the link sends advertising events through transmit(); only connection
        # requests (CONNECT_IND) still come this way
        if isinstance(packet, ll.ConnectInd):
            super().on_ll_advertising_pdu(packet)

    def send_advertising_pdu(self, packet: ll.AdvertisingPdu) -> None:
        # stock timers never run here; a CONNECT_IND from create_le_connection does
        if isinstance(packet, ll.ConnectInd):
            super().send_advertising_pdu(packet)

    def on_hci_reset_command(self, command: hci.HCI_Reset_Command) -> hci.HCI_StatusReturnParameters:
        for key in list(self._tx_timers):
            self._cancel(key)
        self.le_legacy_advertiser.enabled = False
        self.advertising_sets.clear()
        self.le_scan_enable = False
        return super().on_hci_reset_command(command)

    def detach(self) -> None:
        """Stop transmitting and leave the link (a controller unplugged)."""
        for key in list(self._tx_timers):
            self._cancel(key)
        if self in self.link.order:
            self.link.remove_controller(self)
