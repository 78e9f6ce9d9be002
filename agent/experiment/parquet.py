"""A small Parquet writer (numpy and zlib only), so that a device writes its research
bundle without the analysis engine installed.

It writes the subset of Apache Parquet (parquet-format, ``parquet.thrift``) that flat
tables need: one row group per call of :meth:`ParquetWriter.write` is avoided by writing
each column as one or more PLAIN-encoded V1 data pages of one row group, GZIP-compressed
(stdlib zlib, codec 2), columns REQUIRED or OPTIONAL (definition levels as the RLE/bit-
packed hybrid with bit width 1, bit-packed runs). Physical types: INT32, INT64, DOUBLE,
BYTE_ARRAY (UTF-8 strings, annotated STRING, or raw bytes), FIXED_LEN_BYTE_ARRAY. The file
metadata is Thrift compact protocol. Readers (DuckDB in the analysis, any other) are the
independent check: ``tests/test_experiment.py`` reads every type back with DuckDB.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"PAR1"
# parquet.thrift enums
_BOOLEAN, _INT32, _INT64, _DOUBLE, _BYTE_ARRAY, _FIXED = 0, 1, 2, 5, 6, 7
_REQUIRED, _OPTIONAL = 0, 1
_PLAIN, _RLE = 0, 3
_GZIP = 2
_DATA_PAGE = 0
_CONVERTED_UTF8 = 0
#: rows per data page: pages stay a few MB, so memory stays bounded on a device
PAGE_ROWS = 256 * 1024

#: column kind in a table schema -> (physical type, numpy dtype, fixed length)
KINDS: dict[str, tuple[int, str | None]] = {
    "int32": (_INT32, "<i4"), "int64": (_INT64, "<i8"), "double": (_DOUBLE, "<f8"), "bool": (_BOOLEAN, None),
    "string": (_BYTE_ARRAY, None), "binary": (_BYTE_ARRAY, None),
}


@dataclass(frozen=True)
class Column:
    name: str
    #: "int32", "int64", "double", "bool", "string", "binary" or "fixed<N>" (N bytes)
    kind: str
    nullable: bool = False

    @property
    def fixed_len(self) -> int | None:
        return int(self.kind[5:]) if self.kind.startswith("fixed") else None

    @property
    def physical(self) -> int:
        return _FIXED if self.fixed_len else KINDS[self.kind][0]


# -- Thrift compact protocol (just what FileMetaData needs) ---------------------------------
_T_I32, _T_I64, _T_BINARY, _T_LIST, _T_STRUCT = 5, 6, 8, 9, 12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


class _Struct:
    """Fields in increasing id order: (id, type, value); nested structs are _Struct, lists
    are (element type, [values])."""

    def __init__(self, *fields: tuple[int, int, Any]) -> None:
        self.fields = [f for f in fields if f[2] is not None]

    def encode(self) -> bytes:
        out, last = bytearray(), 0
        for fid, ftype, value in self.fields:
            delta = fid - last
            out += bytes([(delta << 4) | ftype]) if 0 < delta <= 15 else bytes([ftype]) + _varint(_zigzag(fid))
            out += _value(ftype, value)
            last = fid
        out.append(0)  # stop
        return bytes(out)


def _value(ftype: int, value: Any) -> bytes:
    if ftype in (_T_I32, _T_I64):
        return _varint(_zigzag(int(value)))
    if ftype == _T_BINARY:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return _varint(len(raw)) + raw
    if ftype == _T_STRUCT:
        return bytes(value.encode())
    if ftype == _T_LIST:
        etype, items = value
        head = bytes([(len(items) << 4) | etype]) if len(items) < 15 else bytes([0xF0 | etype]) + _varint(len(items))
        return head + b"".join(_value(etype, v) for v in items)
    raise ValueError(f"thrift type {ftype}")


# -- values -> PLAIN bytes ----------------------------------------------------------------------
def _plain(col: Column, values: Any) -> bytes:
    """PLAIN encoding of the non-null values."""
    fixed = col.fixed_len
    if fixed:
        raw = b"".join(bytes(v) for v in values)
        if len(raw) != fixed * len(values):
            raise ValueError(f"{col.name}: every value must be {fixed} bytes")
        return raw
    if col.kind == "bool":
        return np.packbits(np.asarray(values, dtype=bool), bitorder="little").tobytes()
    if col.kind in ("string", "binary"):
        parts = []
        for v in values:
            b = v.encode() if isinstance(v, str) else bytes(v)
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    dtype = KINDS[col.kind][1]
    return np.ascontiguousarray(np.asarray(values), dtype=dtype).tobytes()


def _def_levels(present: np.ndarray) -> bytes:
    """Definition levels (bit width 1) as one bit-packed run of the RLE hybrid, with the
    V1 page's 4-byte length prefix."""
    groups = (len(present) + 7) // 8
    packed = np.packbits(np.pad(present.astype(np.uint8), (0, groups * 8 - len(present))), bitorder="little")
    body = _varint((groups << 1) | 1) + packed.tobytes()
    return struct.pack("<I", len(body)) + body


def _split_nulls(col: Column, values: Any) -> tuple[Any, np.ndarray | None]:
    if not col.nullable:
        return values, None
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        present = ~np.isnan(values)
        return values[present], present
    present = np.array([v is not None for v in values], dtype=bool)
    if isinstance(values, np.ndarray):
        return values[present], present
    return [v for v in values if v is not None], present


def write_table(path: str | Path, schema: Sequence[Column], columns: dict[str, Any], *,
                key_value: dict[str, str] | None = None, level: int = 6) -> int:
    """Write one table: ``columns`` maps each schema column to a sequence (a numpy array
    for numbers; None or NaN for a null in a nullable column). Returns the row count."""
    n = len(columns[schema[0].name]) if schema else 0
    for c in schema:
        if len(columns[c.name]) != n:
            raise ValueError(f"column {c.name} has {len(columns[c.name])} values, expected {n}")
    path = Path(path)
    chunks = []
    with open(path, "wb") as f:
        f.write(MAGIC)
        for c in schema:
            offset = f.tell()
            values = columns[c.name]
            raw_total = comp_total = 0
            for start in range(0, max(n, 1), PAGE_ROWS):
                part = values[start:start + PAGE_ROWS]
                nonnull, present = _split_nulls(c, part)
                body = (_def_levels(present) if present is not None else b"") + _plain(c, nonnull)
                comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: the gzip wrapper Parquet's GZIP means
                data = comp.compress(body) + comp.flush()
                header = _Struct((1, _T_I32, _DATA_PAGE), (2, _T_I32, len(body)), (3, _T_I32, len(data)),
                                 (5, _T_STRUCT, _Struct((1, _T_I32, len(part)), (2, _T_I32, _PLAIN),
                                                        (3, _T_I32, _RLE), (4, _T_I32, _RLE)))).encode()
                f.write(header)
                f.write(data)
                raw_total += len(header) + len(body)
                comp_total += len(header) + len(data)
                if n == 0:
                    break
            meta = _Struct((1, _T_I32, c.physical), (2, _T_LIST, (_T_I32, [_PLAIN, _RLE])),
                           (3, _T_LIST, (_T_BINARY, [c.name])), (4, _T_I32, _GZIP), (5, _T_I64, n),
                           (6, _T_I64, raw_total), (7, _T_I64, comp_total), (9, _T_I64, offset))
            chunks.append((_Struct((2, _T_I64, offset), (3, _T_STRUCT, meta)), comp_total))
        root = _Struct((4, _T_BINARY, "schema"), (5, _T_I32, len(schema)))
        elements = [root] + [_Struct(
            (1, _T_I32, c.physical), (2, _T_I32, c.fixed_len), (3, _T_I32, _OPTIONAL if c.nullable else _REQUIRED),
            (4, _T_BINARY, c.name), (6, _T_I32, _CONVERTED_UTF8 if c.kind == "string" else None)) for c in schema]
        row_group = _Struct((1, _T_LIST, (_T_STRUCT, [ch for ch, _ in chunks])),
                            (2, _T_I64, sum(size for _, size in chunks)), (3, _T_I64, n))
        kv = [_Struct((1, _T_BINARY, k), (2, _T_BINARY, v)) for k, v in (key_value or {}).items()]
        footer = _Struct((1, _T_I32, 1), (2, _T_LIST, (_T_STRUCT, elements)), (3, _T_I64, n),
                         (4, _T_LIST, (_T_STRUCT, [row_group])), (5, _T_LIST, (_T_STRUCT, kv)) if kv else (5, 0, None),
                         (6, _T_BINARY, "ctagent")).encode()
        f.write(footer)
        f.write(struct.pack("<I", len(footer)))
        f.write(MAGIC)
    return n
