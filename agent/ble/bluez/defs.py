"""BlueZ's D-Bus names, in one place."""

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
ADVERTISING_MANAGER = "org.bluez.LEAdvertisingManager1"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES = "org.freedesktop.DBus.Properties"
#: where our own objects live: outside /org/bluez, which bleak watches
OBJECT_ROOT = "/ctagent"

ERROR_DOES_NOT_EXIST = "org.bluez.Error.DoesNotExist"
#: refusals that a retry cannot fix
PERMANENT_ERRORS = ("org.bluez.Error.InvalidLength", "org.bluez.Error.InvalidArguments")


def adapter_path(adapter: str) -> str:
    return f"/org/bluez/{adapter}"
