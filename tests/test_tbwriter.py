"""TBWriter: CRC32C check value, an independent TFRecord/protobuf reader, and TensorBoard itself."""

import glob
import math
import os
import random
import struct

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanoseek.train.tbwriter import TBWriter, crc32c, masked_crc32c


# ---- independent reader (bitwise CRC, hand-rolled protobuf parser) ---------------------------

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c_bitwise(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_varint(buf: bytes, i: int):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) for a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise AssertionError(f"unexpected wire type {wt}")
        yield field, wt, v
    assert i == len(buf)


def _read_events(path: str) -> list[dict]:
    data = open(path, "rb").read()
    events, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        assert hcrc == _masked(header)
        payload = data[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        assert dcrc == _masked(payload)
        i += 16 + n
        ev = {"step": 0, "values": []}
        for field, wt, v in _fields(payload):
            if field == 1:
                assert wt == 1
                ev["wall_time"] = struct.unpack("<d", v)[0]
            elif field == 2:
                assert wt == 0
                ev["step"] = v - (1 << 64) if v >= 1 << 63 else v
            elif field == 3:
                assert wt == 2
                ev["file_version"] = v.decode()
            elif field == 5:
                assert wt == 2
                for f, w, val in _fields(v):
                    assert (f, w) == (1, 2)
                    tag, simple = None, None
                    for vf, vw, vv in _fields(val):
                        if vf == 1:
                            assert vw == 2
                            tag = vv.decode()
                        elif vf == 2:
                            assert vw == 5
                            simple = struct.unpack("<f", vv)[0]
                    ev["values"].append((tag, simple))
            else:
                raise AssertionError(f"unexpected Event field {field}")
        events.append(ev)
    assert i == len(data)
    return events


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _event_file(log_dir) -> str:
    (path,) = glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))
    return path


# ---- tests -----------------------------------------------------------------------------------

def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    rng = random.Random(0)
    for n in (1, 7, 8, 100, 1000):
        blob = bytes(rng.randrange(256) for _ in range(n))
        assert crc32c(blob) == _crc32c_bitwise(blob)
        assert masked_crc32c(blob) == _masked(blob)


def test_file_name_and_header(tmp_path):
    log_dir = tmp_path / "runs" / "exp"  # created on demand
    with TBWriter(log_dir) as tb:
        name = os.path.basename(tb.path)
        assert name.startswith("events.out.tfevents.") and name.endswith(f".{os.getpid()}.nanoseek")
        assert os.path.dirname(tb.path) == str(log_dir)
    events = _read_events(_event_file(log_dir))
    assert len(events) == 1
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[0]["values"] == []


def test_roundtrip_independent_reader(tmp_path):
    rng = random.Random(1)
    written = [(f"train/loss", rng.uniform(-10, 10), s, 1000.0 + s) for s in range(1, 40)]
    with TBWriter(tmp_path, flush_secs=0) as tb:
        for tag, v, s, wt in written:
            tb.add_scalar(tag, v, s, wall_time=wt)
        tb.add_scalars({"lr": 3e-4, "grad_norm": 0.8, "ünïcode/标签": 1}, step=2**40)
        tb.add_scalar("neg", -1.5, step=-3)
        tb.add_scalar("zero_step", 7.0, step=0)
    events = _read_events(_event_file(tmp_path))
    assert events[0]["file_version"] == "brain.Event:2"
    body = events[1:]
    assert len(body) == len(written) + 3
    for ev, (tag, v, s, wt) in zip(body, written):
        assert ev["step"] == s and ev["wall_time"] == wt
        assert ev["values"] == [(tag, _f32(v))]
        assert "file_version" not in ev
    multi = body[len(written)]
    assert multi["step"] == 2**40
    assert multi["values"] == [("lr", _f32(3e-4)), ("grad_norm", _f32(0.8)), ("ünïcode/标签", 1.0)]
    assert body[-2]["step"] == -3 and body[-2]["values"] == [("neg", -1.5)]
    assert body[-1]["step"] == 0 and body[-1]["values"] == [("zero_step", 7.0)]


def test_non_finite_and_odd_types_never_raise(tmp_path):
    vals = [math.nan, math.inf, -math.inf, 1e40, -1e300, 1e-50,
            np.float32(2.5), np.float64(3.5), torch.tensor(4.5), 5]
    with TBWriter(tmp_path) as tb:
        for i, v in enumerate(vals):
            tb.add_scalar("x", v, step=i + 1)
    got = [ev["values"][0][1] for ev in _read_events(_event_file(tmp_path))[1:]]
    assert math.isnan(got[0])
    assert got[1:6] == [math.inf, -math.inf, math.inf, -math.inf, 0.0]
    assert got[6:] == [2.5, 3.5, 4.5, 5.0]


def test_flush_close_and_buffering(tmp_path):
    tb = TBWriter(tmp_path, flush_secs=3600)
    path = _event_file(tmp_path)
    assert len(_read_events(path)) == 1  # header is flushed immediately
    tb.add_scalar("a", 1.0, 1)
    tb.flush()
    assert len(_read_events(path)) == 2
    tb.add_scalar("a", 2.0, 2)
    tb.close()
    tb.close()  # idempotent
    assert [e["values"] for e in _read_events(path)[1:]] == [[("a", 1.0)], [("a", 2.0)]]
    with pytest.raises(ValueError):
        tb.add_scalar("a", 3.0, 3)


def test_tensorboard_event_accumulator(tmp_path):
    rng = random.Random(2)
    loss = [(s, rng.uniform(0, 5)) for s in range(0, 200, 5)]
    with TBWriter(tmp_path) as tb:
        for s, v in loss:
            tb.add_scalar("train/loss", v, s, wall_time=1.7e9 + s)
            if s % 20 == 0:
                tb.add_scalars({"lr": s * 1e-6, "special": math.inf if s == 40 else -s}, s)
        tb.add_scalar("nan", math.nan, 1000)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "lr", "special", "nan"}
    got = acc.Scalars("train/loss")
    assert [e.step for e in got] == [s for s, _ in loss]
    assert [e.value for e in got] == [_f32(v) for _, v in loss]
    assert [e.wall_time for e in got] == [1.7e9 + s for s, _ in loss]
    steps = list(range(0, 200, 20))
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(s, _f32(s * 1e-6)) for s in steps]
    assert [(e.step, e.value) for e in acc.Scalars("special")] == [
        (s, math.inf if s == 40 else float(-s)) for s in steps]
    (nan_ev,) = acc.Scalars("nan")
    assert nan_ev.step == 1000 and math.isnan(nan_ev.value)
