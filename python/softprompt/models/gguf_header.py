"""The header of a GGUF file: its metadata and where each tensor lies, read without the tensors.

`gguf.GGUFReader` memory-maps the file and builds NumPy views for every metadata value, one set per
vocabulary string: for SmolLM2's 49,152 tokens and 48,900 merges that is about 160 MB of objects
(measured here), more than the model's Q4_1 weights, and Llama 3's 128k-token vocabulary takes
proportionally more. Loading reads the header with this module instead (metadata as plain Python
values) and then reads each tensor once (`loading.FileTensor`). The format is GGUF v2/v3
(little-endian), as gguf's `constants.py` and llama.cpp's `gguf.c` define it:

    "GGUF", u32 version, u64 tensor count, u64 metadata count,
    metadata: (string key, u32 value type, value) ..., value types as gguf.GGUFValueType
              (strings: u64 length + UTF-8 bytes; arrays: u32 element type, u64 count, elements),
    tensor infos: (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type, u64 offset) ...,
    padding to `general.alignment` (default 32), then the tensor data (offsets relative to it).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# gguf.GGUFValueType codes -> (struct format, size); 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple  # NumPy order (outermost first): the file's dims reversed
    offset: int  # absolute, in bytes
    n_bytes: int


class GGUFHeader:
    """`fields` {key: value} (str, int, float, bool, or a list of them) and `tensors` [TensorInfo]
    of a GGUF file. A file that is not a readable GGUF raises a ValueError naming it."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            self.size = self.path.stat().st_size
            magic, version, n_tensors, n_kv = self._unpack("<4sIQQ", 24)
            if magic != b"GGUF" or version not in (2, 3):
                raise self._bad(f"magic {magic!r}, version {version}: expected b'GGUF', version 2 or 3 "
                                "(little-endian)")
            self.fields = {}
            for _ in range(n_kv):
                key = self._string()
                self.fields[key] = self._value(self._unpack("<I", 4)[0])
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._unpack("<I", 4)
                if n_dims > 8:
                    raise self._bad(f"tensor {name!r} has {n_dims} dimensions")
                dims = self._unpack(f"<{n_dims}Q", 8 * n_dims)
                code, offset = self._unpack("<IQ", 12)
                infos.append((name, dims, code, offset))
            align = self.fields.get("general.alignment", 32)
            if isinstance(align, bool) or not isinstance(align, int) or align < 1:
                raise self._bad(f"general.alignment {align!r}: expected a positive integer")
            start = -(-self._f.tell() // align) * align
            self.tensors = []
            for name, dims, code, offset in infos:
                try:
                    qtype = gguf.GGMLQuantizationType(code)
                    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    raise self._bad(f"tensor {name!r} has an unknown type {code}") from None
                count = math.prod(int(d) for d in dims)  # Python ints: a damaged file cannot overflow them
                if count % block:
                    raise self._bad(f"tensor {name!r}: {count} values are not whole {qtype.name} blocks of {block}")
                n_bytes = count // block * type_size
                if start + offset + n_bytes > self.size:
                    raise self._bad(f"tensor {name!r} ends past the file's end")
                self.tensors.append(TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start + offset,
                                               n_bytes))
        finally:
            self._f.close()

    def _bad(self, reason):
        return ValueError(f"{self.path}: not a readable GGUF file ({reason})")

    def _read(self, n):
        b = self._f.read(n)
        if len(b) != n:
            raise self._bad("cut short")
        return b

    def _unpack(self, fmt, n):
        return struct.unpack(fmt, self._read(n))

    def _string(self):
        (n,) = self._unpack("<Q", 8)
        if n > self.size:
            raise self._bad(f"a string of {n} bytes")
        try:
            return self._read(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._bad(f"a string is not UTF-8 ({exc.reason})") from None

    def _value(self, kind, depth=0):
        if kind in _SCALARS:
            fmt, n = _SCALARS[kind]
            return self._unpack(fmt, n)[0]
        if kind == 8:
            return self._string()
        if kind == 9:
            elem, count = self._unpack("<IQ", 12)
            if elem in _NUMPY:  # numbers in one read
                size = np.dtype(_NUMPY[elem]).itemsize
                if count * size > self.size:
                    raise self._bad(f"an array of {count} values")
                return np.frombuffer(self._read(count * size), dtype=_NUMPY[elem]).tolist()
            if count > self.size or (elem == 9 and depth >= 4):
                raise self._bad(f"an array of {count} values" if count > self.size else "arrays nested too deep")
            return [self._value(elem, depth + 1) for _ in range(count)]
        raise self._bad(f"an unknown metadata value type {kind}")
