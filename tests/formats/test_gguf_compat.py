"""qconvert.formats.gguf.compat: the ggml type ids PyPI gguf-py lacks exist once qconvert is imported."""

from __future__ import annotations

import pickle
from pathlib import Path

import gguf
import numpy as np

import qconvert  # noqa: F401  (installs the members)
from qconvert.formats.gguf import compat as gguf_compat
from tests.oracle.llamacpp import _ggml

T = gguf.GGMLQuantizationType


def test_q2_0_is_a_full_member() -> None:
    q2 = T(42)
    assert q2 is T.Q2_0 is T["Q2_0"] and q2.name == "Q2_0" and q2 == 42
    assert q2 in list(T) and pickle.loads(pickle.dumps(q2)) is q2
    assert gguf.GGML_QUANT_SIZES[q2] == (64, 18)
    assert gguf.LlamaFileType(41) is gguf.LlamaFileType.MOSTLY_Q2_0
    gguf_compat.install()  # idempotent
    assert [t for t in T if t == 42] == [q2]


def test_sizes_agree_with_ggml() -> None:
    lib = _ggml()
    for name in gguf_compat._SIZES:
        block, size = gguf.GGML_QUANT_SIZES[T[name]]
        assert lib.ggml_row_size(int(T[name]), block) == size


def test_gguf_reader_reads_a_q2_0_tensor(tmp_path: Path) -> None:
    path = tmp_path / "q2_0.gguf"
    data = np.arange(4 * 18, dtype=np.uint8).reshape(2, 36)  # 2 rows of 128 weights
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("t", data, raw_dtype=T.Q2_0)  # shape in bytes: 2 x 36
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = gguf.GGUFReader(path).tensors
    assert t.tensor_type is T.Q2_0 and list(t.shape) == [128, 2]
    assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), data.reshape(-1))
