"""Minimal TensorBoard scalar writer: pure Python, no tensorboard/tensorflow/protobuf at run time.

An event file is a sequence of TFRecords: uint64-LE length, masked CRC32C of those 8 bytes, the
payload, masked CRC32C of the payload. Each payload is a serialized `tensorflow.Event`, encoded
here by hand (only the fields TensorBoard needs for scalars):

    Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}
    Summary {repeated Value value = 1}
    Value   {string tag = 1; float simple_value = 2}

The first record is the header Event with file_version "brain.Event:2". Scalars are stored as
float32 `simple_value`s; NaN/inf are written as such and finite values beyond the float32 range
become +-inf, so `add_scalar` never raises on a number. Records are buffered and flushed at most
every `flush_secs` seconds (0 = after every write), on `flush()` and on `close()`.

    with TBWriter("runs/exp1") as tb:
        tb.add_scalar("train/loss", 2.31, step=10)
        tb.add_scalars({"lr": 3e-4, "grad_norm": 0.8}, step=10)
"""

from __future__ import annotations

import math
import os
import socket
import struct
import threading
import time

__all__ = ["TBWriter", "crc32c", "masked_crc32c"]


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _f32(value) -> bytes:
    v = float(value)
    try:
        return struct.pack("<f", v)
    except OverflowError:  # finite but outside float32 range
        return struct.pack("<f", math.copysign(math.inf, v))


def _event(wall_time: float, step: int = 0, file_version: str | None = None,
           values: dict | None = None) -> bytes:
    out = bytearray(b"\x09" + struct.pack("<d", float(wall_time)))  # field 1, wire type 1
    if step:
        out += b"\x10" + _varint(int(step))  # field 2, wire type 0
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if values:
        summary = b"".join(
            _len_field(1, _len_field(1, str(tag).encode()) + b"\x15" + _f32(val))  # 2<<3|5
            for tag, val in values.items())
        out += _len_field(5, summary)
    return bytes(out)


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


class TBWriter:
    """Appends scalar summaries to `log_dir/events.out.tfevents.<time>.<host>.<pid>.nanoseek`."""

    def __init__(self, log_dir: str | os.PathLike, flush_secs: float = 2.0):
        self.log_dir = os.fspath(log_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.nanoseek"
        self.path = os.path.join(self.log_dir, name)
        self.flush_secs = flush_secs
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")
        self._last_flush = now
        self._write(_event(now, file_version="brain.Event:2"), force_flush=True)

    def _write(self, data: bytes, force_flush: bool = False) -> None:
        with self._lock:
            if self._file is None:
                raise ValueError("TBWriter is closed")
            self._file.write(_record(data))
            now = time.time()
            if force_flush or now - self._last_flush >= self.flush_secs:
                self._file.flush()
                self._last_flush = now

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        self.add_scalars({tag: value}, step, wall_time)

    def add_scalars(self, scalars: dict[str, float], step: int,
                    wall_time: float | None = None) -> None:
        """Write several scalars as one Event (one step, one wall time)."""
        if scalars:
            wt = time.time() if wall_time is None else wall_time
            self._write(_event(wt, step=step, values=scalars))

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._last_flush = time.time()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "TBWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
