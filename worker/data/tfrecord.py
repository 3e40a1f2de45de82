"""TFRecord files of ``tf.train.Example``, read without TensorFlow: the record framing and the protobuf wire format.

A TFRecord file is a sequence of records, each ``uint64 length | uint32 masked crc32c(length) | data |
uint32 masked crc32c(data)`` (little-endian).  The length's checksum is verified (8 bytes: cheap in Python), so a
file cut short or overwritten mid-record is found where it breaks; the data's checksum is not (a pure-Python CRC
over every image would cost more than decoding it): a damaged record surfaces as an Example that does not parse or
an image that does not decode, each an error row.

``tf.train.Example`` is ``Features features = 1``; ``Features`` is ``map<string, Feature> feature = 1``; a
``Feature`` is one of ``BytesList bytes_list = 1``, ``FloatList float_list = 2``, ``Int64List int64_list = 3``,
each ``repeated ... value = 1`` (packed or not).  :func:`parse_example` reads exactly that.

Example:
    >>> record = example_bytes({"image/encoded": [b"\\x89PNG"], "image/class/label": [3], "w": [0.5, 2.0]})
    >>> parse_example(record) == {"image/encoded": ("bytes", [b"\\x89PNG"]), "image/class/label": ("int64", [3]),
    ...                           "w": ("float", [0.5, 2.0])}
    True
    >>> import io
    >>> framed = frame(record) + frame(b"")
    >>> list(read_records(io.BytesIO(framed), 2)) == [record, b""]
    True
"""

from __future__ import annotations

import struct

KINDS = {1: "bytes", 2: "float", 3: "int64"}


class RecordError(ValueError):
    """A record cannot be framed or parsed; the message becomes its row's ``error``."""


# --- crc32c (Castagnoli), for the 8-byte length checksums ---------------------------------------------------------

def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``.

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    c = 0xFFFFFFFF
    for byte in data:
        c = _CRC_TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record as TFRecord framing writes it (tests and examples)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def _header(head: bytes, offset: int) -> int:
    """The data length from a record's 12-byte header, or RecordError."""
    if len(head) < 12:
        raise RecordError(f"file ends inside a record header at byte {offset} (truncated file)")
    length_bytes, (crc,) = head[:8], struct.unpack("<I", head[8:12])
    if masked_crc(length_bytes) != crc:
        raise RecordError(f"record header at byte {offset} fails its checksum (not a TFRecord file, or damaged)")
    return struct.unpack("<Q", length_bytes)[0]


def scan(handle, size: int, seekable: bool) -> tuple[list[int], str | None]:
    """The byte offset of every whole record of a file and, where the file breaks off, why (else None).

    ``handle`` is read from its start; ``seekable`` handles skip the data (local files: only the headers are read),
    the others read through it in large chunks (object stores: one sequential download)."""
    offsets: list[int] = []
    position = 0
    buffer, buffer_start = b"", 0
    chunk = 8 << 20
    while position < size:
        if seekable:
            handle.seek(position)
            head = handle.read(12)
        else:
            while buffer_start + len(buffer) < min(size, position + 12):
                more = handle.read(chunk)
                if not more:
                    break
                buffer = buffer[position - buffer_start:] + more
                buffer_start = position
            head = buffer[position - buffer_start:position - buffer_start + 12]
        try:
            length = _header(head, position)
        except RecordError as exc:
            return offsets, str(exc)
        end = position + 12 + length + 4
        if end > size:
            return offsets, f"file ends inside record {len(offsets)} at byte {position} (truncated file)"
        offsets.append(position)
        if not seekable and end > buffer_start + len(buffer):
            # skip the data without keeping it: read up to the record's end
            remaining = end - (buffer_start + len(buffer))
            while remaining > 0:
                got = len(handle.read(min(chunk, remaining)))
                if not got:
                    break
                remaining -= got
            buffer, buffer_start = b"", end
        position = end
    return offsets, None


def read_records(handle, count: int):
    """Yield ``count`` record payloads from ``handle`` positioned at a record; a record that cannot be read is
    yielded as a :class:`RecordError` (and the rest are not read)."""
    for _ in range(count):
        head = handle.read(12)
        try:
            length = _header(head, -1)
        except RecordError as exc:
            yield exc
            return
        data = handle.read(length)
        tail = handle.read(4)
        if len(data) < length or len(tail) < 4:
            yield RecordError("file ends inside the record (truncated file)")
            return
        yield data


# --- protobuf wire format ----------------------------------------------------------------------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise RecordError("protobuf varint runs past the end of the record")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise RecordError("protobuf varint longer than 10 bytes")


def _fields(buf):
    """Yield (field number, wire type, value) of a message: ints for varint/fixed, memoryview slices for LEN."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise RecordError(f"protobuf wire type {wire} is not used by tf.train.Example")
        if pos > end:
            raise RecordError("protobuf field runs past the end of the record")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _values(kind: str, buf) -> list:
    out: list = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if kind == "bytes":
            out.append(bytes(value))
        elif kind == "float":
            if wire == 2:
                out.extend(struct.unpack(f"<{len(value) // 4}f", value))
            else:
                out.append(struct.unpack("<f", value)[0])
        elif wire == 2:
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                out.append(_signed(v))
        else:
            out.append(_signed(value))
    return out


def parse_example(data) -> dict[str, tuple[str, list]]:
    """A serialized ``tf.train.Example`` as ``{key: (kind, values)}``, kind one of bytes, float, int64."""
    buf = memoryview(data)
    features: dict[str, tuple[str, list]] = {}
    try:
        for number, wire, message in _fields(buf):
            if number != 1 or wire != 2:
                continue
            for entry_number, entry_wire, entry in _fields(message):
                if entry_number != 1 or entry_wire != 2:
                    continue
                key, feature = None, None
                for n, w, v in _fields(entry):
                    if n == 1 and w == 2:
                        key = bytes(v).decode("utf-8")
                    elif n == 2 and w == 2:
                        feature = v
                if key is None:
                    continue
                kind, values = "bytes", []  # a Feature with no list set: an empty one
                for n, w, v in _fields(feature if feature is not None else b""):
                    if n in KINDS and w == 2:
                        kind, values = KINDS[n], _values(KINDS[n], v)
                features[key] = (kind, values)
    except (UnicodeDecodeError, struct.error) as exc:
        raise RecordError(f"not a tf.train.Example: {exc}") from None
    except RecordError as exc:
        raise RecordError(f"not a tf.train.Example: {exc}") from None
    return features


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint_bytes(len(payload)) + payload


def example_bytes(features: dict[str, list]) -> bytes:
    """A serialized ``tf.train.Example`` of lists of bytes, floats or ints (examples and tests; TensorFlow's own
    writer is what the tests compare against)."""
    entries = b""
    for key, values in features.items():
        if values and isinstance(values[0], (bytes, bytearray)):
            inner = _len(1, b"".join(_len(1, bytes(v)) for v in values))
        elif values and isinstance(values[0], float):
            inner = _len(2, _len(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            inner = _len(3, _len(1, b"".join(_varint_bytes(int(v)) for v in values)))
        entries += _len(1, _len(1, key.encode()) + _len(2, inner))
    return _len(1, entries)
