"""BlueZ's D-Bus names, in one place; and the one sentence for an unreachable bus."""

import os

from ...errors import RadioError

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
ADVERTISING_MANAGER = "org.bluez.LEAdvertisingManager1"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
#: where our own objects live: outside /org/bluez, which bleak watches
OBJECT_ROOT = "/ctagent"

ERROR_DOES_NOT_EXIST = "org.bluez.Error.DoesNotExist"
#: ours, decided before registering: BlueZ itself answers a plain org.bluez.Error.Failed
ERROR_TOO_LONG = "org.ctagent.Error.AdvertisementTooLong"
#: refusals that a retry cannot fix
PERMANENT_ERRORS = (ERROR_TOO_LONG, "org.bluez.Error.InvalidLength", "org.bluez.Error.InvalidArguments")


def adapter_path(adapter: str) -> str:
    return f"/org/bluez/{adapter}"


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/var/run/dbus/system_bus_socket")


def bus_unreachable(e: BaseException) -> RadioError:
    """What to say when the system bus (and so BlueZ) cannot be reached."""
    why = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return RadioError("org.freedesktop.DBus.Error.NoServer",
                      f"cannot reach the system D-Bus at {system_bus_address()} ({why}); is dbus running and "
                      "bluetoothd installed? `ctagent doctor` checks both")
