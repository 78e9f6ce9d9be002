"""Device calibration: per-model RSSI correction and TX power.

attenuation = TX power of the transmitter - (RSSI measured + RSSI correction of the receiver)
(Exposure Notification Bluetooth spec v1.2, "Attenuation"; Google's calibration list).

The file format is Google's Exposure Notification calibration list of 2020-09-30 /
2020-12-14 (``oem,device,model,rssi_correction,tx,calibration_confidence``); the older
2020-06-13 list (``oem,model,rssi correction (...),tx (...),has direct measurement``) is
read too. The lists use different sign conventions between versions: use one version
consistently for all devices of an experiment.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import CalibrationError

#: Google's confidence scale: 0 none/estimated, 1 low, 2 medium, 3 high.
CONFIDENCE_UNKNOWN = 0


@dataclass(frozen=True)
class DeviceCalibration:
    model: str
    rssi_correction: float
    tx_power: float
    confidence: int
    oem: str = ""
    device: str = ""


#: Used for a model nobody calibrated: the median of Google's 2020-12-14 list
#: (correction +4 dB, TX -26 dBm), confidence 0. See docs/proximity.md.
DEFAULT_CALIBRATION = DeviceCalibration("unknown", 4.0, -26.0, CONFIDENCE_UNKNOWN)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


class CalibrationTable:
    def __init__(self, entries: list[DeviceCalibration], default: DeviceCalibration = DEFAULT_CALIBRATION):
        self.default = default
        self._by_key: dict[str, DeviceCalibration] = {}
        for e in entries:
            for k in (e.model, e.device):
                if k:
                    self._by_key.setdefault(k.strip().lower(), e)

    def __len__(self) -> int:
        return len({id(v) for v in self._by_key.values()})

    def _find(self, model: str | None) -> DeviceCalibration | None:
        if not model:
            return None
        name = model.strip().lower()
        e = self._by_key.get(name)
        if e is not None:
            return e
        # "/proc/device-tree/model" adds a revision: "Raspberry Pi 3 Model B Rev 1.2"
        prefixes = [k for k in self._by_key if name.startswith(k + " ")]
        return self._by_key[max(prefixes, key=len)] if prefixes else None

    def lookup(self, model: str | None) -> DeviceCalibration:
        """Calibration for a model (case-insensitive, by model or device name); the
        documented default with confidence 0 when unknown."""
        return self._find(model) or self.default

    def known(self, model: str | None) -> bool:
        return self._find(model) is not None

    def nearest(self, model: str, n: int = 3) -> list[str]:
        """The known model names closest to ``model`` (a misspelling, a near model)."""
        names = {e.model.lower(): e.model for e in self.entries()}
        return [names[k] for k in difflib.get_close_matches(model.strip().lower(), list(names), n=n, cutoff=0.5)]

    def entries(self) -> list[DeviceCalibration]:
        return list(dict.fromkeys(self._by_key.values()))

    def warning(self, model: str) -> str | None:
        """One sentence when ``model`` is not in the list (the default calibration is used)."""
        if self.known(model):
            return None
        near = self.nearest(model)
        return (f"[agent] device_model {model!r} is not in the calibration list, so the default calibration "
                f"(confidence 0) is used" + (f"; did you mean {', '.join(map(repr, near))}?" if near else
                                               "; `ctagent calibration list` shows the known models"))

    @classmethod
    def from_csv_text(cls, text: str, *, source: str = "<text>") -> CalibrationTable:
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise CalibrationError(f"{source}: not a CSV file: {e}") from None
        if not rows:
            raise CalibrationError(f"{source}: empty calibration file")
        header = [h.strip().lower() for h in rows[0]]
        entries = []
        try:
            if header[:6] == ["oem", "device", "model", "rssi_correction", "tx", "calibration_confidence"]:
                for r in rows[1:]:
                    if not r or r[0].lstrip().startswith("#"):
                        continue
                    entries.append(DeviceCalibration(r[2], _finite(r[3]), _finite(r[4]), int(r[5]), r[0], r[1]))
            elif (len(header) >= 5 and header[0] == "oem" and header[1] == "model"
                  and header[2].startswith("rssi correction")):
                for r in rows[1:]:
                    if not r:
                        continue
                    conf = 2 if r[4].strip().lower() == "yes" else 1
                    entries.append(DeviceCalibration(r[1], _finite(r[2]), _finite(r[3]), conf, r[0]))
            else:
                raise CalibrationError(f"{source}: unknown calibration header {rows[0]}")
        except (IndexError, ValueError) as e:
            raise CalibrationError(f"{source}: bad row in calibration file: {e}") from None
        return cls(entries)

    @classmethod
    def load(cls, *paths: str | Path) -> CalibrationTable:
        """Load and merge files; earlier files win for a model listed twice."""
        entries: list[DeviceCalibration] = []
        for p in paths:
            try:
                text = Path(p).read_text(encoding="utf-8")
            except OSError as e:
                raise CalibrationError(f"cannot read calibration file {p}: {e.strerror}") from None
            entries.extend(cls.from_csv_text(text, source=str(p)).entries())
        return cls(entries)


def bundled_calibration_path() -> Path:
    """The project's calibration list (``agent/exposure/calibration.csv``, shipped in the package)."""
    return Path(__file__).with_name("calibration.csv")
