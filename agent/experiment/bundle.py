"""The research bundle: one device's research log as a folder of Parquet tables (one
table per file) and a ``manifest.json`` with provenance. ``docs/experiments.md`` is the
reference; :data:`TABLES` is the schema in code (the writer and the reader use it).

An *experiment folder* holds one bundle per device (sub-folders) and, optionally, the
ground truth (``truth/``). ``ctagent experiment analyze`` reads either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputFileError
from .parquet import Column, write_table

FORMAT = "ctagent-research-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: table name -> columns. Times are Unix seconds on the recording device's own clock.
TABLES: dict[str, tuple[Column, ...]] = {
    # every received advertisement of the family's service
    "sightings": (Column("t", "double"), Column("advert", "int32"), Column("rssi", "int32"),
                  Column("tx_power", "int32", nullable=True)),
    # each distinct (address, service data) heard; transmitter: filled only by imports
    # of data sets that name the transmitter themselves
    "adverts": (Column("advert", "int32"), Column("address", "string"), Column("payload", "binary"),
                Column("transmitter", "string", nullable=True)),
    # this device's identifiers, handed over with consent: "tek" (GAEN: key, rolling start
    # interval, rolling period) or "ebid" (ROBERT: EBID, epoch, 1)
    "own_ids": (Column("kind", "string"), Column("id", "binary"), Column("start", "int64"),
                Column("period", "int32")),
    # what this device put on air, from when (until the next row)
    "broadcasts": (Column("t", "double"), Column("address", "string"), Column("payload", "binary"),
                   Column("new_identity", "bool")),
    # one row per flush window: seconds listening and advertising, sightings, the clock
    "windows": (Column("start", "double"), Column("end", "double"), Column("scanning_s", "double"),
                Column("advertising_s", "double"), Column("received", "int64"),
                Column("clock_synchronized", "bool", nullable=True), Column("clock_source", "string"),
                Column("clock_offset_s", "double", nullable=True), Column("clock_error_s", "double", nullable=True)),
    # intervals when the radio could not hear (scan_*) or be heard (advertise_*)
    "radio_down": (Column("kind", "string"), Column("start", "double"), Column("end", "double"),
                   Column("detail", "string")),
    # sync markers this device logged (`ctagent experiment mark`)
    "markers": (Column("t", "double"), Column("marker", "string")),
}


@dataclass
class Manifest:
    experiment_id: str
    device_label: str
    device_model: str
    protocol: str
    consent_at: str
    collected_at: str
    host: str
    software_version: str
    carriage: str = ""
    first_t: float | None = None
    last_t: float | None = None
    #: the radio's advertising interval (s) and scan duty, for loss accounting
    radio: dict[str, Any] = field(default_factory=dict)
    #: this device's calibration: rssi_correction (dB), tx_power (dBm), confidence
    calibration: dict[str, Any] = field(default_factory=dict)
    #: the device's [proximity] settings: the analysis applies the rule with them
    proximity: dict[str, Any] = field(default_factory=dict)
    #: file -> {"rows", "bytes", "sha256"}
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: where an imported bundle came from
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.__dict__}

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> Manifest:
        if doc.get("format") != FORMAT:
            raise InputFileError(f"{where}: not a ctagent research bundle manifest")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise InputFileError(f"{where}: bundle format {doc['format_version']} is newer than this ctagent "
                                 f"reads ({FORMAT_VERSION}); upgrade ctagent")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in doc.items() if k in known})
        except TypeError as e:
            raise InputFileError(f"{where}: incomplete manifest ({e})") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle(folder: Path, manifest: Manifest, tables: dict[str, dict[str, Any]], *, level: int = 6
                 ) -> Manifest:
    """Write every table of :data:`TABLES` (missing ones empty) and the manifest with
    each file's rows, size and SHA-256. Files are 0600: they hold identifiers and keys."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for name, schema in TABLES.items():
        cols = tables.get(name) or {c.name: [] for c in schema}
        path = folder / f"{name}.parquet"
        rows = write_table(path, schema, cols, key_value={"ctagent.table": name}, level=level)
        os.chmod(path, 0o600)
        manifest.tables[path.name] = {"rows": rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    target = folder / MANIFEST
    target.write_text(json.dumps(manifest.to_json(), indent=1))
    os.chmod(target, 0o600)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the manifest: {e.strerror}") from None
    except ValueError as e:
        raise InputFileError(f"{path}: not JSON: {e}") from None
    return Manifest.from_json(doc, str(path))


def verify_bundle(folder: Path) -> Manifest:
    """The manifest, after checking every table's size and checksum against it."""
    m = read_manifest(folder)
    for name in TABLES:
        entry = m.tables.get(f"{name}.parquet")
        path = Path(folder) / f"{name}.parquet"
        if entry is None or not path.exists():
            raise InputFileError(f"{folder}: {name}.parquet is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise InputFileError(f"{path}: its checksum differs from the manifest's (changed or truncated)")
    return m


def bundle_folders(path: Path) -> list[Path]:
    """The device bundles in ``path``: itself when it is one, else its sub-folders that are."""
    path = Path(path)
    if not path.is_dir():
        raise InputFileError(f"{path}: no such folder")
    if (path / MANIFEST).exists():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / MANIFEST).exists())
    if not found:
        raise InputFileError(f"{path}: no research bundle here (a folder with {MANIFEST}, or folders of them)")
    return found


def safe_name(text: str) -> str:
    """A label as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:64] or "device"
