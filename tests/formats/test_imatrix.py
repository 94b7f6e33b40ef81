"""Imatrix files: the format spec (reference/gguf.md §4.3) written out byte by byte, llama.cpp's own gguf
library (libggml-base through ctypes) writing and reading the same files, and llama_model_quantize consuming
the weights we compute."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qconvert.errors import BadInput
from qconvert.formats.gguf.imatrix import (
    Imatrix,
    merge_imatrices,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from tests.oracle.llamacpp import ggml_quantize_chunk, lib_dir, model_quantize

# ---- llama.cpp's gguf/ggml library through ctypes ----------------------------------------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _GgufParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml():
    """libggml-base.so of the llama-cpp-python wheel (the oracle's lib_dir fails if it is not installed)."""
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    P, I64, SZ, S = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_char_p
    sigs = {
        "ggml_init": (P, [_InitParams]),
        "ggml_free": (None, [P]),
        "ggml_tensor_overhead": (SZ, []),
        "ggml_new_tensor_2d": (P, [P, ctypes.c_int, I64, I64]),
        "ggml_set_name": (P, [P, S]),
        "ggml_get_data": (P, [P]),
        "gguf_init_empty": (P, []),
        "gguf_free": (None, [P]),
        "gguf_set_val_str": (None, [P, S, S]),
        "gguf_set_val_u32": (None, [P, S, ctypes.c_uint32]),
        "gguf_set_arr_str": (None, [P, S, ctypes.POINTER(S), SZ]),
        "gguf_add_tensor": (None, [P, P]),
        "gguf_write_to_file": (ctypes.c_bool, [P, S, ctypes.c_bool]),
        "gguf_init_from_file": (P, [S, _GgufParams]),
        "gguf_find_key": (I64, [P, S]),
        "gguf_get_val_str": (S, [P, I64]),
        "gguf_get_val_u32": (ctypes.c_uint32, [P, I64]),
        "gguf_get_arr_n": (SZ, [P, I64]),
        "gguf_get_arr_str": (S, [P, I64, SZ]),
        "gguf_get_n_tensors": (I64, [P]),
        "gguf_get_tensor_name": (S, [P, I64]),
        "gguf_get_tensor_type": (ctypes.c_int, [P, I64]),
        "gguf_get_tensor_ne": (ctypes.POINTER(I64), [P, I64]),
        "gguf_get_tensor_offset": (SZ, [P, I64]),
        "gguf_get_data_offset": (SZ, [P]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def llama_write_imatrix(path: Path, imat: Imatrix) -> None:
    """What llama-imatrix's save_imatrix does, with llama.cpp's own gguf writer."""
    lib = _ggml()
    names = sorted(imat.entries)
    size = sum(2 * lib.ggml_tensor_overhead() + 4 * (s.size + c.size) + 64 for s, c in imat.entries.values())
    ctx = lib.ggml_init(_InitParams(size + 4096, None, False))
    g = lib.gguf_init_empty()
    lib.gguf_set_val_str(g, b"general.type", b"imatrix")
    ds = (ctypes.c_char_p * max(1, len(imat.datasets)))(*[d.encode() for d in imat.datasets])
    lib.gguf_set_arr_str(g, b"imatrix.datasets", ds, len(imat.datasets))
    lib.gguf_set_val_u32(g, b"imatrix.chunk_count", imat.chunk_count)
    lib.gguf_set_val_u32(g, b"imatrix.chunk_size", imat.chunk_size)
    for name in names:
        sums, counts = imat.entries[name]
        n_mat, n_per_row = sums.shape
        for suffix, arr, ne0 in ((".in_sum2", sums, n_per_row), (".counts", counts, 1)):
            t = lib.ggml_new_tensor_2d(ctx, int(T.F32), ne0, n_mat)
            lib.ggml_set_name(t, (name + suffix).encode())
            data = np.ascontiguousarray(arr, dtype=np.float32)
            ctypes.memmove(lib.ggml_get_data(t), data.ctypes.data, data.nbytes)
            lib.gguf_add_tensor(g, t)
    assert lib.gguf_write_to_file(g, str(path).encode(), False)
    lib.gguf_free(g)
    lib.ggml_free(ctx)


def llama_read_imatrix(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, tuple[int, ...]]]]:
    """llama.cpp's gguf parser on a file: (kv of interest, name -> (f32 data, ne)); None if it rejects it."""
    lib = _ggml()
    g = lib.gguf_init_from_file(str(path).encode(), _GgufParams(True, None))
    if not g:
        return None
    kv: dict[str, object] = {}
    k = lib.gguf_find_key(g, b"general.type")
    kv["general.type"] = lib.gguf_get_val_str(g, k).decode() if k >= 0 else None
    k = lib.gguf_find_key(g, b"imatrix.datasets")
    kv["datasets"] = [lib.gguf_get_arr_str(g, k, i).decode() for i in range(lib.gguf_get_arr_n(g, k))]
    for key in ("chunk_count", "chunk_size"):
        kv[key] = lib.gguf_get_val_u32(g, lib.gguf_find_key(g, f"imatrix.{key}".encode()))
    kv["general.architecture"] = lib.gguf_find_key(g, b"general.architecture")
    raw = path.read_bytes()
    base = lib.gguf_get_data_offset(g)
    tensors = {}
    for i in range(lib.gguf_get_n_tensors(g)):
        assert lib.gguf_get_tensor_type(g, i) == int(T.F32)
        ne = tuple(lib.gguf_get_tensor_ne(g, i)[d] for d in range(2))
        off = base + lib.gguf_get_tensor_offset(g, i)
        data = np.frombuffer(raw, dtype="<f4", count=ne[0] * ne[1], offset=off)
        tensors[lib.gguf_get_tensor_name(g, i).decode()] = (data.copy(), ne)
    lib.gguf_free(g)
    return kv, tensors


# ---- sample data -------------------------------------------------------------------------------------------


def sample(seed: int = 0) -> Imatrix:
    rng = np.random.default_rng(seed)
    return Imatrix(
        {
            "blk.0.attn_q.weight": (
                rng.uniform(0, 50, (1, 64)).astype(np.float32),
                np.array([1024], np.float32),
            ),
            "blk.0.ffn_down_exps.weight": (
                rng.uniform(0, 5, (4, 32)).astype(np.float32),
                np.array([10, 0, 3, 700], np.float32),
            ),
            "blk.1.attn_k.weight": (rng.uniform(0, 9, (1, 32)).astype(np.float32), np.array([0], np.float32)),
        },
        ["calib.txt", "more.txt"],
        3,
        512,
    )


def _dat_bytes(entries: list[tuple[str, int, list[float]]], trailer: tuple[int, str] | None) -> bytes:
    """A legacy file laid out exactly as §4.3 says."""
    b = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        b += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        b += struct.pack(f"<{len(values)}f", *values)
    if trailer is not None:
        b += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return b


# ---- legacy .dat -------------------------------------------------------------------------------------------


def test_read_dat_from_spec_bytes(tmp_path):
    p = tmp_path / "m.dat"
    p.write_bytes(
        _dat_bytes([("b.weight", 4, [8.0, 2.0]), ("a.weight", 0, [3.0, 5.0, 7.0])], (12, "wiki.txt"))
    )
    im = read_imatrix(p)
    assert im.legacy and im.chunk_count == 12 and im.datasets == ["wiki.txt"] and im.chunk_size == 0
    assert list(im.entries) == ["b.weight", "a.weight"]
    np.testing.assert_array_equal(im.weights("b.weight"), np.array([2.0, 0.5], np.float32))  # values / ncall
    np.testing.assert_array_equal(
        im.weights("a.weight"), np.array([3.0, 5.0, 7.0], np.float32)
    )  # ncall 0: as is
    assert im.weights("c.weight") is None


def test_read_dat_without_trailer(tmp_path):
    p = tmp_path / "m.dat"
    p.write_bytes(_dat_bytes([("x", 2, [1.0])], None))
    im = read_imatrix(p)
    assert im.chunk_count == 0 and im.datasets == [] and im.weights("x")[0] == np.float32(0.5)


def test_write_dat_matches_spec(tmp_path):
    im = sample()
    p = tmp_path / "o.dat"
    write_imatrix_dat(p, im)
    expected = []
    for name in sorted(im.entries):
        sums, counts = im.entries[name]
        if not counts.any():
            continue  # entries without any data are skipped
        ncall = int(-(-int(counts.max()) // 512))
        vals = []
        for j, row in enumerate(sums):
            c = np.float32(counts[j])
            vals += [float((np.float32(1) if c == 0 else v / c) * np.float32(ncall)) for v in row]
        expected.append((name, ncall, vals))
    assert p.read_bytes() == _dat_bytes(expected, (3, "more.txt"))


def test_dat_round_trip_is_byte_identical(tmp_path):
    a, b = tmp_path / "a.dat", tmp_path / "b.dat"
    write_imatrix_dat(a, sample())
    write_imatrix_dat(b, read_imatrix(a))
    assert a.read_bytes() == b.read_bytes()


# ---- GGUF --------------------------------------------------------------------------------------------------


def test_gguf_is_what_llama_cpp_writes(tmp_path):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    im = sample()
    write_imatrix_gguf(ours, im)
    llama_write_imatrix(theirs, im)
    assert ours.read_bytes() == theirs.read_bytes()


def test_llama_cpp_reads_our_gguf(tmp_path):
    p = tmp_path / "ours.gguf"
    im = sample()
    write_imatrix_gguf(p, im)
    kv, tensors = llama_read_imatrix(p)
    assert kv == {
        "general.type": "imatrix",
        "datasets": ["calib.txt", "more.txt"],
        "chunk_count": 3,
        "chunk_size": 512,
        "general.architecture": -1,
    }
    assert list(tensors) == [n + s for n in sorted(im.entries) for s in (".in_sum2", ".counts")]
    for name, (sums, counts) in im.entries.items():
        data, ne = tensors[name + ".in_sum2"]
        assert ne == (sums.shape[1], sums.shape[0]) and np.array_equal(data, sums.reshape(-1))
        data, ne = tensors[name + ".counts"]
        assert ne == (1, counts.size) and np.array_equal(data, counts)


def test_read_gguf_written_by_llama_cpp(tmp_path):
    p = tmp_path / "theirs.gguf"
    im = sample(1)
    llama_write_imatrix(p, im)
    got = read_imatrix(p)
    assert not got.legacy and got.datasets == im.datasets and (got.chunk_count, got.chunk_size) == (3, 512)
    assert set(got.entries) == set(im.entries)
    for name in im.entries:
        assert np.array_equal(got.entries[name][0], im.entries[name][0])
        assert np.array_equal(got.weights(name), im.weights(name))


def test_gguf_round_trip_and_empty_datasets(tmp_path):
    im = sample()
    im.datasets = []
    p = tmp_path / "a.gguf"
    write_imatrix_gguf(p, im)
    got = read_imatrix(p)
    assert got.datasets == [] and llama_read_imatrix(p)[0]["datasets"] == []
    for name in im.entries:
        assert np.array_equal(got.entries[name][1], im.entries[name][1])
        assert np.array_equal(got.weights(name), im.weights(name))


def test_weights_formula():
    im = sample()
    sums, counts = im.entries["blk.0.ffn_down_exps.weight"]
    w = im.weights("blk.0.ffn_down_exps.weight").reshape(4, 32)
    np.testing.assert_array_equal(w[0], sums[0] / np.float32(10))
    np.testing.assert_array_equal(w[1], np.ones(32, np.float32))  # an expert that saw no token
    np.testing.assert_array_equal(w[3], sums[3] / np.float32(700))
    assert w.dtype == np.float32
    np.testing.assert_array_equal(im.weights("blk.1.attn_k.weight"), np.ones(32, np.float32))
    # counts are read with lround: 2.5 -> 3
    odd = Imatrix({"x": (np.array([[6.0]], np.float32), np.array([2.5], np.float32))})
    assert odd.weights("x")[0] == np.float32(2.0)


def test_weights_for_checks_the_size():
    im = sample()
    assert im.weights_for("blk.0.ffn_down_exps.weight", 32, 4).size == 128
    with pytest.raises(BadInput, match="128 values"):
        im.weights_for("blk.0.ffn_down_exps.weight", 64, 4)
    im.entries["token_embd.weight"] = (np.ones((1, 8), np.float32), np.ones(1, np.float32))
    assert im.weights_for("token_embd.weight", 16) is None


def test_gguf_to_dat_keeps_weights_close(tmp_path):
    im = sample()
    p = tmp_path / "x.dat"
    write_imatrix_dat(p, im)
    back = read_imatrix(p)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"):
        np.testing.assert_allclose(back.weights(name), im.weights(name), rtol=1e-6)
    assert "blk.1.attn_k.weight" not in back.entries  # no data at all: .dat skips it


# ---- merging -----------------------------------------------------------------------------------------------


def test_merge_sums_like_llama_imatrix_in_file(tmp_path):
    a, b = sample(0), sample(1)
    m = merge_imatrices([a, b])
    for name in a.entries:
        assert np.array_equal(m.entries[name][0], a.entries[name][0] + b.entries[name][0])
        assert np.array_equal(m.entries[name][1], a.entries[name][1] + b.entries[name][1])
    assert m.chunk_size == 512 and m.chunk_count == 2 * 1024 // 512  # the largest merged count / chunk size
    assert m.datasets == a.datasets + b.datasets


def test_merge_legacy_scales_by_chunk_size(tmp_path):
    p = tmp_path / "m.dat"
    p.write_bytes(_dat_bytes([("x", 2, [4.0, 6.0])], (2, "d.txt")))
    g = Imatrix({"x": (np.array([[1.0, 1.0]], np.float32), np.array([100], np.float32))}, ["g.txt"], 1, 128)
    m = merge_imatrices([read_imatrix(p), g])
    assert m.chunk_size == 128
    np.testing.assert_array_equal(m.entries["x"][0], [[4.0 * 128 + 1, 6.0 * 128 + 1]])
    np.testing.assert_array_equal(m.entries["x"][1], [2 * 128 + 100])
    assert m.datasets == ["d.txt", "g.txt"] and m.chunk_count == (256 + 100) // 128


def test_merge_broadcasts_a_single_count_to_experts():
    dense = Imatrix({"x": (np.ones((1, 8), np.float32), np.array([5], np.float32))}, [], 1, 4)
    experts = Imatrix({"x": (np.ones((2, 4), np.float32), np.array([1, 2], np.float32))}, [], 1, 4)
    m = merge_imatrices([dense, experts])
    np.testing.assert_array_equal(m.entries["x"][1], [6, 7])
    np.testing.assert_array_equal(m.entries["x"][0], np.full((2, 4), 2, np.float32))


def test_legacy_to_raw_keeps_weights(tmp_path):
    p = tmp_path / "m.dat"
    p.write_bytes(_dat_bytes([("x", 3, [1.5, 6.0])], (3, "d.txt")))
    legacy = read_imatrix(p)
    raw = legacy.to_raw(256)
    assert not raw.legacy and raw.chunk_size == 256 and raw.chunk_count == 3
    np.testing.assert_array_equal(raw.weights("x"), legacy.weights("x"))


def test_merge_mismatch_is_bad_input():
    a = Imatrix({"x": (np.ones((1, 4), np.float32), np.ones(1, np.float32))})
    b = Imatrix({"x": (np.ones((1, 8), np.float32), np.ones(1, np.float32))})
    with pytest.raises(BadInput, match="x"):
        merge_imatrices([a, b])


# ---- bad input ---------------------------------------------------------------------------------------------


def _gguf_with(
    path: Path, tensors: dict[str, np.ndarray], kv: dict | None = None, *, arch: str | None = None
):
    w = gguf.GGUFWriter(path, arch or "")
    if arch is None:
        w.kv_data[0].pop("general.architecture", None)
    for k, v in (kv if kv is not None else {"general.type": "imatrix"}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    if kv is None:
        w.add_array("imatrix.datasets", ["d"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_ONE = np.ones((1, 4), np.float32)
_C = np.ones((1, 1), np.float32)


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", "not an imatrix"),
        ("noise", "not an imatrix"),
        ("dat_truncated", "truncated"),
        ("dat_name_len", "name of"),
        ("dat_nval", "bad sizes"),
        ("dat_nan", "non-finite"),
        ("gguf_truncated", "not a valid GGUF"),
        ("gguf_model", "general.type"),
        ("gguf_no_sums", "no <name>.in_sum2"),
        ("gguf_sums_only", "no matching"),
        ("gguf_f16", "F32"),
        ("gguf_inf", "non-finite"),
        ("gguf_no_metadata", "missing imatrix metadata"),
        ("gguf_split", "do not split"),
        ("missing", "no such"),
        ("directory", "directory"),
    ],
)
def test_bad_input(tmp_path, case, match):
    p = tmp_path / "bad.imatrix"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "noise":
        p.write_bytes(bytes(range(7, 250)) * 3)
    elif case == "dat_truncated":
        p.write_bytes(_dat_bytes([("x", 1, [1.0, 2.0, 3.0, 4.0])], None)[:-6])
    elif case == "dat_name_len":
        p.write_bytes(struct.pack("<ii", 1, 1 << 20) + bytes(40))
    elif case == "dat_nval":
        p.write_bytes(struct.pack("<ii", 1, 1) + b"x" + struct.pack("<ii", 1, 0) + bytes(16))
    elif case == "dat_nan":
        p.write_bytes(_dat_bytes([("x", 1, [1.0, float("nan")])], None))
    elif case == "gguf_truncated":
        write_imatrix_gguf(p, sample())
        p.write_bytes(p.read_bytes()[:150])
    elif case == "gguf_model":
        _gguf_with(p, {"token_embd.weight": _ONE}, {"general.type": "model"}, arch="llama")
    elif case == "gguf_no_sums":
        _gguf_with(p, {"token_embd.weight": _ONE})
    elif case == "gguf_sums_only":
        _gguf_with(p, {"a.in_sum2": _ONE})
    elif case == "gguf_f16":
        _gguf_with(p, {"a.in_sum2": _ONE.astype(np.float16), "a.counts": _C})
    elif case == "gguf_inf":
        _gguf_with(p, {"a.in_sum2": _ONE * np.float32("inf"), "a.counts": _C})
    elif case == "gguf_no_metadata":
        _gguf_with(p, {"a.in_sum2": _ONE, "a.counts": _C}, {"general.type": "imatrix"})
    elif case == "gguf_split":
        _gguf_with(p, {"a.in_sum2": np.ones((1, 5), np.float32), "a.counts": np.ones((2, 1), np.float32)})
    elif case == "missing":
        p = tmp_path / "nope.gguf"
    elif case == "directory":
        p = tmp_path
    with pytest.raises(BadInput, match=match) as e:
        read_imatrix(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_writers_are_atomic_and_clean_up(tmp_path):
    target = tmp_path / "x.gguf"
    target.write_bytes(b"old")
    bad = sample()
    bad.entries["broken"] = (object(), np.ones(1, np.float32))  # fails while writing
    with pytest.raises(Exception):  # noqa: B017 - any failure must leave the old file untouched
        write_imatrix_gguf(target, bad)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    with pytest.raises(BadInput, match="chunk size"):
        write_imatrix_dat(tmp_path / "y.dat", Imatrix(sample().entries, [], 0, 0))
    assert not (tmp_path / "y.dat").exists()


# ---- llama_model_quantize consumes the weights we compute --------------------------------------------------


def _moe_model(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer llama with 8 experts (the imatrix is per expert); returns the f32 tensors by name."""
    rng = np.random.default_rng(3)
    shapes = {"token_embd.weight": (256, 256), "output.weight": (256, 256), "output_norm.weight": (256,)}
    for i in range(2):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (256,),
            p + "ffn_norm.weight": (256,),
            p + "attn_q.weight": (256, 256),
            p + "attn_k.weight": (64, 256),
            p + "attn_v.weight": (64, 256),
            p + "attn_output.weight": (256, 256),
            p + "ffn_gate_inp.weight": (8, 256),
            p + "ffn_gate_exps.weight": (8, 64, 256),
            p + "ffn_up_exps.weight": (8, 64, 256),
            p + "ffn_down_exps.weight": (8, 256, 256),
        }
    w = gguf.GGUFWriter(path, "llama")
    for key, v in (
        ("context_length", 512),
        ("embedding_length", 256),
        ("block_count", 2),
        ("feed_forward_length", 256),
        ("expert_count", 8),
        ("expert_used_count", 2),
    ):
        getattr(w, f"add_{key}")(v)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(256)])
    data = {}
    for name, shape in sorted(shapes.items()):
        data[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(name, data[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return data


@pytest.mark.parametrize("ftype", [gguf.LlamaFileType.MOSTLY_Q4_K_M, gguf.LlamaFileType.MOSTLY_IQ4_XS])
def test_llama_quantize_uses_our_weights(tmp_path, ftype):
    src = tmp_path / "moe.gguf"
    data = _moe_model(src)
    rng = np.random.default_rng(5)
    entries = {}
    for name, x in data.items():
        # llama-imatrix sees only matmul inputs: no norms, router, token_embd or (by default) output
        if x.ndim < 2 or "norm" in name or "gate_inp" in name or name.startswith(("token_embd", "output")):
            continue
        n_mat = x.shape[0] if x.ndim == 3 else 1
        counts = rng.integers(1, 5000, n_mat).astype(np.float32)
        if n_mat > 1:
            counts[2] = 0  # one expert nobody was routed to
        entries[name] = (rng.uniform(0, 10, (n_mat, x.shape[-1])).astype(np.float32), counts)
    f = tmp_path / "im.gguf"
    write_imatrix_gguf(f, Imatrix(entries, ["calib.txt"], 4, 512))
    im = read_imatrix(f)
    weights = {name: im.weights(name) for name in im.entries}
    dst = tmp_path / "q.gguf"
    model_quantize(src, dst, int(ftype), weights, nthread=2)
    checked = 0
    for t in gguf.GGUFReader(dst).tensors:
        x = data[t.name]
        if t.tensor_type in (T.F32, T.F16, T.BF16):
            continue
        w = weights.get(t.name)
        n_mat = x.shape[0] if x.ndim == 3 else 1
        rows = x.reshape(n_mat, -1, x.shape[-1])
        per_expert = [None] * n_mat if w is None else list(w.reshape(n_mat, -1))
        parts = [ggml_quantize_chunk(t.tensor_type, rows[e], per_expert[e]).tobytes() for e in range(n_mat)]
        expected = b"".join(parts)
        assert bytes(t.data.reshape(-1)) == expected, t.name
        checked += w is not None
    assert checked == len(weights)
