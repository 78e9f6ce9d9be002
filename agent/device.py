"""What machine this is: its model, as the kernel names it (a Raspberry Pi's device tree,
a laptop's DMI vendor and product). Read at ``ctagent init`` to pick the device's
calibration."""

from __future__ import annotations

from pathlib import Path


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b"").decode(errors="replace").strip()
    except OSError:
        return ""


def detect_device_model(root: Path = Path("/")) -> str | None:
    """``Raspberry Pi 3 Model B Rev 1.2`` (``/proc/device-tree/model``), ``LENOVO
    20XW0026GE`` (DMI vendor and product), or None when the machine does not say."""
    model = _read(root / "proc/device-tree/model")
    if model:
        return model
    dmi = root / "sys/class/dmi/id"
    product = _read(dmi / "product_name")
    if product:
        vendor = _read(dmi / "sys_vendor")
        return f"{vendor} {product}".strip()
    return None
