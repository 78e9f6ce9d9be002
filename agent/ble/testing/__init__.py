"""Test support for the real BlueZ code paths: a fake bluetoothd on a private D-Bus."""
