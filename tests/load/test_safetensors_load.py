"""Safetensors reading: dtypes, zero-copy reads, and the header validation (in-process)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.errors import BadInput, IOFailure
from qconvert.load import open_checkpoint
from qconvert.load import safetensors as st


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g) * 10
    return {
        "bf16": x.to(torch.bfloat16), "f16": x.to(torch.float16), "f32": x, "f64": x.double(),
        "i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8, generator=g),
        "i16": torch.randint(-3000, 3000, (7,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=g),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3) * (1 << 40),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "bool": torch.tensor([True, False, True]),
        "f8_e4m3": x.clamp(-448, 448).to(torch.float8_e4m3fn),
        "f8_e5m2": x.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def test_reads_every_dtype_like_the_safetensors_library(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_all_dtypes(), str(path), metadata={"format": "pt"})
    ref = load_file(str(path))
    with open_checkpoint(path) as ckpt:
        assert set(ckpt) == set(ref)
        assert ckpt.metadata == {"format": "pt"}
        assert ckpt.config == {}
        for name, want in ref.items():
            info = ckpt.tensors[name]
            assert info.shape == tuple(want.shape)
            assert info.nbytes == want.numel() * want.element_size()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. torch's "non-writable buffer" warning
                got = ckpt.read(name)
            assert got.dtype == want.dtype
            assert got.shape == want.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_dtype_names_in_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_all_dtypes(), str(path))
    dtypes = {n: t.dtype for n, t in open_checkpoint(path).tensors.items()}
    assert dtypes["bf16"] == "BF16" and dtypes["f8_e4m3"] == "F8_E4M3" and dtypes["f8_e5m2"] == "F8_E5M2"
    assert dtypes["bool"] == "BOOL" and dtypes["u8"] == "U8"
    assert dtypes["i16"] == "I16" and dtypes["i64"] == "I64"


def test_read_numpy_widens_floats_exactly_and_keeps_ints(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _all_dtypes()
    save_file(tensors, str(path))
    ckpt = open_checkpoint(path)
    for name in ("bf16", "f16", "f32", "f8_e4m3", "f8_e5m2"):
        got = ckpt.read_numpy(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tensors[name].float().numpy())
    assert ckpt.read_numpy("i32").dtype == np.int32
    np.testing.assert_array_equal(ckpt.read_numpy("i64"), tensors["i64"].numpy())
    np.testing.assert_array_equal(ckpt.read_numpy("bool"), tensors["bool"].numpy())


def test_file_order_and_membership(tmp_path, build):
    tensors = {"z": np.zeros(2, np.float32), "a": np.ones(3, np.float32), "m": np.arange(4, dtype=np.int32)}
    path = build.write(tmp_path / "x.safetensors", build.safetensors_bytes(tensors))
    ckpt = open_checkpoint(path)
    assert list(ckpt) == ["z", "a", "m"]
    assert "a" in ckpt and "b" not in ckpt and len(ckpt) == 3
    with pytest.raises(KeyError):
        ckpt.read("b")


def test_read_is_a_private_copy_on_write_view(tmp_path, build):
    data = build.safetensors_bytes({"w": np.arange(8, dtype=np.float32)})
    path = build.write(tmp_path / "x.safetensors", data)
    before = path.read_bytes()
    ckpt = open_checkpoint(path)
    t = ckpt.read("w")
    t.add_(100)  # writable (no torch warning) but never written back to the file
    assert path.read_bytes() == before
    assert ckpt.read_numpy("w")[0] == 0.0  # a private mapping: the change is invisible to later reads
    del t
    ckpt.close()


def test_unaligned_offsets_are_read_correctly(tmp_path, build):
    tensors = {"b": np.array([7], np.uint8), "w": np.arange(5, dtype=np.float32)}  # w starts at an odd offset
    path = build.write(tmp_path / "x.safetensors", build.safetensors_bytes(tensors))
    assert open_checkpoint(path).tensors["w"].offset % 4 != 0
    assert open_checkpoint(path).read("w").tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("case", [
    "tiny file", "length past EOF", "header not JSON", "header not UTF-8", "header is a list",
    "entry not object", "unknown dtype", "shape not list", "negative dim", "float dim", "bool dim",
    "offsets one int",
    "offsets strings", "offsets reversed", "size mismatch", "past EOF", "overlap", "duplicate name",
    "metadata not object",
])
def test_bad_headers_are_bad_input_naming_the_file(tmp_path, build, case):
    data, fragment = build.bad_safetensors()[case]
    path = build.write(tmp_path / "bad.safetensors", data)
    with pytest.raises(BadInput) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg


def test_header_over_100_mb_is_refused_without_reading_it(tmp_path, build):
    path = tmp_path / "huge-header.safetensors"
    with open(path, "wb") as f:
        f.write(build.raw_safetensors_bytes(b"{}", length=150 * 1024 * 1024)[:8])
        f.truncate(200 * 1024 * 1024)  # sparse: the length fits the file but exceeds the cap
    with pytest.raises(BadInput, match="limit"):
        open_checkpoint(path)


def test_permission_error_is_io_failure(tmp_path, build, monkeypatch):
    path = build.write(tmp_path / "x.safetensors", build.safetensors_bytes({"w": np.zeros(2, np.float32)}))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(st, "open", denied, raising=False)  # root ignores chmod, so fake the OS answer
    with pytest.raises(IOFailure, match="Permission denied"):
        open_checkpoint(path)


def test_sub_byte_dtype_sizes_are_validated(tmp_path, build):
    ok = build.Raw("F4", [4, 8], b"\0" * 16)  # 32 4-bit values = 16 bytes
    path = build.write(tmp_path / "f4.safetensors", build.safetensors_bytes({"w": ok}))
    ckpt = open_checkpoint(path)
    assert ckpt.tensors["w"].nbytes == 16 and ckpt.read_raw("w").shape == (16,)
    bad = build.Raw("F4", [4, 8], b"\0" * 32)
    path = build.write(tmp_path / "f4bad.safetensors", build.safetensors_bytes({"w": bad}))
    with pytest.raises(BadInput, match="needs 16 bytes"):
        open_checkpoint(path)
