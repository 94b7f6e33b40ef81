"""GGUF header reader: agreement with gguf-py, validation of broken headers, speed on a 100 GB sparse file."""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest

from qconvert.errors import BadInput
from qconvert.load import open_gguf
from qconvert.load.gguf_file import FILE_TYPES, GGML_TYPES, ValueType
from qconvert.load.summary import inspect


def test_type_tables_match_gguf_py():
    for t in gguf.GGMLQuantizationType:
        assert t.value in GGML_TYPES, t
        name, block, size = GGML_TYPES[t.value]
        assert (name, block, size) == (t.name, *gguf.GGML_QUANT_SIZES[t])
    assert len(GGML_TYPES) == len(gguf.GGMLQuantizationType)
    for ft in gguf.LlamaFileType:
        assert FILE_TYPES[ft.value] == ft.name.removeprefix("MOSTLY_").replace("ALL_", ""), ft
    assert [v.name for v in ValueType] == [v.name for v in gguf.GGUFValueType]


def test_agrees_with_gguf_reader(tmp_path, build):
    path = build.write_gguf_good(tmp_path / "good.gguf")
    ref = gguf.GGUFReader(str(path))
    g = open_gguf(path)
    assert g.version == 3 and g.alignment == 32
    assert list(g.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        t = g.tensors[rt.name]
        assert t.type_id == rt.tensor_type.value
        assert t.ne == tuple(int(n) for n in rt.shape)  # gguf-py reports ggml ne order
        assert t.shape == tuple(reversed(t.ne))
        assert t.nbytes == rt.n_bytes
        assert t.offset == rt.data_offset
        want = np.asarray(rt.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(g.read_raw(rt.name).reshape(-1), want)
    assert set(g.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    assert g.value("general.architecture") == "llama"
    assert g.value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert g.value("tokenizer.ggml.tokens")[:2] == ["<tok0>", "<tok1>"]
    assert g.fields["tokenizer.ggml.scores"].item_type == ValueType.FLOAT32
    np.testing.assert_array_equal(g.value("tokenizer.ggml.scores"), np.arange(300, dtype=np.float32))
    assert g.value("test.short").tolist() == [1, 2, 3]
    q8 = g.tensors["blk.0.attn_q.weight"]
    assert (q8.type_name, q8.shape, q8.nbytes) == ("Q8_0", (4, 64), 4 * 2 * 34)
    q4k = g.tensors["blk.0.ffn_down.weight"]
    assert (q4k.type_name, q4k.shape, q4k.nbytes) == ("Q4_K", (3, 512), 3 * 2 * 144)
    g.close()


def test_100_gb_sparse_file_inspects_in_under_a_second(tmp_path, build):
    rows, cols = 25 * 1024 * 1024, 1024  # F32: 100 GiB of tensor data
    info = build.tensor_info("huge.weight", [cols, rows], 0, 0)
    head = build.gguf_bytes([build.kv_str("general.architecture", "llama")], [info])
    data_start = len(head) + (-len(head) % 32)
    path = tmp_path / "huge.gguf"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(data_start + rows * cols * 4)  # sparse: nothing is written
    t0 = time.perf_counter()
    summary = inspect(path)
    assert time.perf_counter() - t0 < 1.0
    assert summary["total_bytes"] == 100 * 1024**3
    assert summary["tensors"] == [{"name": "huge.weight", "type": "F32", "shape": [rows, cols],
                                   "nbytes": 100 * 1024**3}]


CASES = ["bad magic", "tiny", "version 1", "version 4", "big endian", "absurd tensor count",
         "absurd kv count", "truncated kv", "string past EOF", "key past EOF", "absurd array",
         "absurd numeric array",
         "unknown value type", "duplicate key", "bad alignment", "unknown ggml type", "too many dims",
         "tensor data past EOF", "tensor offset past EOF", "misaligned offset", "partial block",
         "duplicate tensor"]


@pytest.mark.parametrize("case", CASES)
def test_broken_headers_are_one_line_bad_input(tmp_path, build, case):
    data, fragment = build.bad_gguf()[case]
    path = build.write(tmp_path / "bad.gguf", data)
    t0 = time.perf_counter()
    with pytest.raises(BadInput) as e:
        open_gguf(path)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert fragment in msg and str(path) in msg and "\n" not in msg, msg


def test_a_valid_minimal_file_parses(tmp_path, build):
    arch = build.kv_str("general.architecture", "llama")
    path = build.write(tmp_path / "ok.gguf", build.gguf_bytes([arch], [build.tensor_info("w", [4], 0, 0)],
                                                              np.arange(4, dtype=np.float32).tobytes()))
    g = open_gguf(path)
    assert g.read_raw("w").view(np.float32).tolist() == [[0, 1, 2, 3]]
