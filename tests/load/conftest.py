"""Builders for tiny (and deliberately broken) safetensors and GGUF files, shared by the load tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

_ST_DTYPE = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
    np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


class Raw:
    """A tensor given as (safetensors dtype, shape, raw bytes), for dtypes numpy lacks (BF16, F8)."""

    def __init__(self, dtype: str, shape: list[int], data: bytes):
        self.dtype, self.shape, self.data = dtype, list(shape), data


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file, tensors stored in the given order."""
    header: dict[str, Any] = {}
    blobs, pos = [], 0
    for name, t in tensors.items():
        if isinstance(t, Raw):
            dtype, shape, data = t.dtype, t.shape, t.data
        else:
            arr = np.ascontiguousarray(t)
            dtype, shape, data = _ST_DTYPE[arr.dtype], list(arr.shape), arr.tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    return raw_safetensors_bytes(json.dumps(header).encode(), b"".join(blobs))


def raw_safetensors_bytes(header: bytes | dict | list | str, data: bytes = b"",
                          length: int | None = None) -> bytes:
    """Header bytes as given (padded to 8), with an optional lying length field."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- GGUF, byte by byte (for broken files; good files come from gguf.GGUFWriter) ----

def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, value)


def kv_str(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def kv_strings(key: str, values: list[str], count: int | None = None) -> bytes:
    n = len(values) if count is None else count
    return gstr(key) + struct.pack("<IIQ", 9, 8, n) + b"".join(gstr(v) for v in values)


def tensor_info(name: str, ne: list[int], type_id: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne) \
        + struct.pack("<IQ", type_id, offset)


def gguf_bytes(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", version: int = 3,
               magic: bytes = b"GGUF", n_tensors: int | None = None, n_kv: int | None = None,
               alignment: int = 32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    if data:
        body += b"\0" * (-len(body) % alignment) + data
    return body


def write_gguf_good(path: Path) -> Path:
    """A small valid GGUF from gguf-py's writer: Q8_0 (real quantizer), Q4_K (random blocks), F32, F16."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(1)
    w.add_token_list([f"<tok{i}>" for i in range(300)])
    w.add_token_scores([float(i) for i in range(300)])
    w.add_chat_template("{% for m in messages %}\n{{ m['content'] }}{% endfor %}")
    w.add_array("test.short", [1, 2, 3])
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4k = rng.integers(0, 256, size=(3, 2 * 144), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_down.weight", q4k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((300, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- broken files: (bytes, expected message fragment) ----

def bad_safetensors() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, fragment of the expected message)."""
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "tiny file": (b"\x01\x02", "only 2 bytes"),
        "length past EOF": (raw_safetensors_bytes({"w": ok}, b"\0" * 8, length=10**9), "header length"),
        "header not JSON": (raw_safetensors_bytes(b"{not json"), "not valid JSON"),
        "header not UTF-8": (raw_safetensors_bytes(b'{"\xff": 1}'), "UTF-8"),
        "header is a list": (raw_safetensors_bytes([1, 2]), "expected an object"),
        "entry not object": (raw_safetensors_bytes({"w": 3}), "not an object"),
        "unknown dtype": (raw_safetensors_bytes({"w": {**ok, "dtype": "Q4"}}, b"\0" * 8),
                          "unknown dtype"),
        "shape not list": (raw_safetensors_bytes({"w": {**ok, "shape": "2"}}, b"\0" * 8), "shape"),
        "negative dim": (raw_safetensors_bytes({"w": {**ok, "shape": [-2]}}, b"\0" * 8), "shape"),
        "float dim": (raw_safetensors_bytes({"w": {**ok, "shape": [2.0]}}, b"\0" * 8), "shape"),
        "bool dim": (raw_safetensors_bytes({"w": {**ok, "shape": [True]}}, b"\0" * 8), "shape"),
        "offsets one int": (raw_safetensors_bytes({"w": {**ok, "data_offsets": [0]}}, b"\0" * 8),
                            "data_offsets"),
        "offsets strings": (raw_safetensors_bytes({"w": {**ok, "data_offsets": ["0", "8"]}}, b"\0" * 8),
                            "data_offsets"),
        "offsets reversed": (raw_safetensors_bytes({"w": {**ok, "data_offsets": [8, 0]}}, b"\0" * 8),
                             "data_offsets"),
        "size mismatch": (raw_safetensors_bytes({"w": {**ok, "data_offsets": [0, 6]}}, b"\0" * 8),
                          "needs 8 bytes"),
        "past EOF": (raw_safetensors_bytes({"w": {**ok, "data_offsets": [4, 12]}}, b"\0" * 8),
                     "past the end of the file"),
        "overlap": (raw_safetensors_bytes({"a": ok, "b": {**ok, "data_offsets": [4, 12]}}, b"\0" * 12),
                    "overlap"),
        "duplicate name": (raw_safetensors_bytes(
            b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
            b'"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'), "duplicate"),
        "metadata not object": (raw_safetensors_bytes({"__metadata__": [1]}), "__metadata__"),
    }


def bad_gguf() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, fragment of the expected message)."""
    arch = kv_str("general.architecture", "llama")
    f32 = tensor_info("w", [4], 0, 0)
    good_data = b"\0" * 16
    return {
        "bad magic": (b"GGML" + b"\0" * 40, "not a GGUF file"),
        "tiny": (b"GGUF\x03\0", "truncated GGUF header"),
        "version 1": (gguf_bytes([arch], version=1), "unsupported GGUF version 1"),
        "version 4": (gguf_bytes([arch], version=4), "unsupported GGUF version 4"),
        "big endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        "absurd tensor count": (gguf_bytes([arch], n_tensors=2**62), "cannot fit"),
        "absurd kv count": (gguf_bytes([arch], n_kv=10**15), "cannot fit"),
        "truncated kv": (gguf_bytes([arch])[:-3], "truncated GGUF header"),
        "string past EOF": (gguf_bytes([gstr("k") + struct.pack("<IQ", 8, 10**6) + b"abc"]),
                            "truncated GGUF header"),
        "key past EOF": (gguf_bytes([struct.pack("<Q", 2**63) + b"x" * 20]), "truncated GGUF header"),
        "absurd array": (gguf_bytes([kv_strings("tokenizer.ggml.tokens", ["a"], count=2**40)]),
                         "array claims"),
        "absurd numeric array": (gguf_bytes([gstr("k") + struct.pack("<IIQ", 9, 6, 2**50)]),
                                 "array claims"),
        "unknown value type": (gguf_bytes([gstr("k") + struct.pack("<I", 77) + b"\0" * 8]),
                               "unknown GGUF value type 77"),
        "duplicate key": (gguf_bytes([arch, arch]), "duplicate metadata key"),
        "bad alignment": (gguf_bytes([arch, kv_u32("general.alignment", 48)]), "power-of-two"),
        "unknown ggml type": (gguf_bytes([arch], [tensor_info("w", [4], 99, 0)], good_data),
                              "unknown ggml type 99"),
        "too many dims": (gguf_bytes([arch], [tensor_info("w", [1] * 5, 0, 0)], good_data),
                          "5 dimensions"),
        "tensor data past EOF": (gguf_bytes([arch], [f32], b"\0" * 8), "past the end of the file"),
        "tensor offset past EOF": (gguf_bytes([arch], [tensor_info("w", [4], 0, 2**40)],
                                                    good_data), "past the end of the file"),
        "misaligned offset": (gguf_bytes([arch], [tensor_info("w", [4], 0, 4)], b"\0" * 64),
                              "not a multiple of the alignment"),
        "partial block": (gguf_bytes([arch], [tensor_info("w", [48], 8, 0)], b"\0" * 64),
                          "not a multiple of the Q8_0 block"),
        "duplicate tensor": (gguf_bytes([arch], [f32, tensor_info("w", [4], 0, 32)], b"\0" * 64),
                             "duplicate tensor name"),
    }


@pytest.fixture
def build() -> SimpleNamespace:
    return SimpleNamespace(
        Raw=Raw, safetensors_bytes=safetensors_bytes, raw_safetensors_bytes=raw_safetensors_bytes,
        write=write,
        gstr=gstr, kv_u32=kv_u32, kv_str=kv_str, kv_strings=kv_strings, tensor_info=tensor_info,
        gguf_bytes=gguf_bytes, write_gguf_good=write_gguf_good, bad_safetensors=bad_safetensors,
        bad_gguf=bad_gguf,
    )
