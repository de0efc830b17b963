"""A program's answers cross the sandbox by value, as plain data the program cannot have made.

`encode` runs in the program's process and writes objects of exact builtin types only (None, bool,
int, float, complex, str, bytes, and tuples, lists, dicts, sets and frozensets of them); anything
else, subclasses of those types included, is written as an `Opaque` stand-in that equals nothing.
`decode` runs in the harness on bytes the program may have forged: it builds fresh objects of those
types and nothing else, within a depth bound, so no object of the program's making ever reaches the
tests. An answer whose `__eq__` always returns True cannot exist on the harness side.
"""

import struct

MAX_DEPTH = 100
_LEN = struct.Struct("<I")
_FLOAT, _COMPLEX = struct.Struct("<d"), struct.Struct("<dd")
_SEQUENCES = {list: b"l", tuple: b"t", set: b"e", frozenset: b"z"}
_BUILD = {b"l": list, b"t": tuple, b"e": set, b"z": frozenset}


class Opaque:
    """A value the program answered that is not plain data. It equals only itself."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<opaque {self.type_name} answer>"


def encode(value) -> bytes:
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value, out: bytearray, depth: int) -> None:
    kind = type(value)  # exact types only: a subclass could carry its own __eq__
    if depth >= MAX_DEPTH:  # the decoder's bound
        _encode_opaque("value nested too deep", out)
    elif value is None or kind is bool:
        out += b"N" if value is None else (b"T" if value else b"F")
    elif kind is int:
        out += b"i" + _bytes_of(value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True))
    elif kind is float:
        out += b"f" + _FLOAT.pack(value)
    elif kind is complex:
        out += b"c" + _COMPLEX.pack(value.real, value.imag)
    elif kind is str:
        out += b"s" + _bytes_of(value.encode("utf-8", "surrogatepass"))
    elif kind is bytes:
        out += b"b" + _bytes_of(value)
    elif kind in _SEQUENCES:
        out += _SEQUENCES[kind] + _LEN.pack(len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif kind is dict:
        out += b"d" + _LEN.pack(len(value))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    else:
        _encode_opaque(f"{kind.__module__}.{kind.__qualname__}", out)


def _encode_opaque(type_name, out: bytearray) -> None:
    out += b"o" + _bytes_of(str.encode(str(type_name), "utf-8", "replace"))


def _bytes_of(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def decode(data: bytes):
    """The value `data` encodes; ValueError for anything malformed, trailing bytes included."""
    view = memoryview(data)
    try:
        value, end = _decode(view, 0, 0)
    except (IndexError, struct.error, UnicodeDecodeError, TypeError, OverflowError) as e:
        raise ValueError(f"malformed answer: {e}") from None
    if end != len(view):
        raise ValueError(f"malformed answer: {len(view) - end} trailing bytes")
    return value


def _decode(view: memoryview, at: int, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError(f"malformed answer: nested deeper than {MAX_DEPTH}")
    tag, at = bytes(view[at:at + 1]), at + 1
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], at
    if tag == b"f":
        return _FLOAT.unpack_from(view, at)[0], at + _FLOAT.size
    if tag == b"c":
        return complex(*_COMPLEX.unpack_from(view, at)), at + _COMPLEX.size
    if tag in (b"i", b"s", b"b", b"o"):
        raw, at = _chunk(view, at)
        if tag == b"i":
            return int.from_bytes(raw, "little", signed=True), at
        if tag == b"b":
            return bytes(raw), at
        text = str(raw, "utf-8", "surrogatepass")
        return (text if tag == b"s" else Opaque(text)), at
    if tag in _BUILD or tag == b"d":
        count, at = _count(view, at)
        items = []
        for _ in range(count * (2 if tag == b"d" else 1)):
            item, at = _decode(view, at, depth + 1)
            items.append(item)
        if tag == b"d":  # unhashable keys raise TypeError: malformed
            return dict(zip(items[::2], items[1::2])), at
        return _BUILD[tag](items), at
    raise ValueError(f"malformed answer: unknown tag {tag!r}")


def _count(view: memoryview, at: int) -> tuple[int, int]:
    (count,) = _LEN.unpack_from(view, at)
    if count > len(view) - at:  # every item takes at least one byte: a bigger count is a lie
        raise ValueError(f"malformed answer: {count} items in {len(view) - at} bytes")
    return count, at + _LEN.size


def _chunk(view: memoryview, at: int) -> tuple[memoryview, int]:
    size, at = _count(view, at)
    return view[at:at + size], at + size
