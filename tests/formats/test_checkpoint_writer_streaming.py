"""CheckpointWriter streams tensors to disk: files the safetensors library reads back exactly (every dtype,
0-d and empty tensors, add order in the header), the old shard-splitting rule and index, atomic cleanup on
any failure, OSError → IOFailure, and peak memory of about one tensor, not one shard."""

from __future__ import annotations

import errno
import gc
import json
import os
import struct
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qconvert.errors import IOFailure
from qconvert.formats import safetensors_out
from qconvert.formats.safetensors_out import CheckpointWriter

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024**2


def raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes (NaN-safe comparison, works for bf16/fp8/fp4/bool)."""
    t = t.detach().resolve_conj().contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    bytes_ = torch.randint(0, 256, (3, 5), dtype=torch.uint8, generator=g)
    big = torch.randn(8, 6, generator=g)
    cplx = torch.randn(4, dtype=torch.complex64, generator=g)
    return {
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "f32": torch.randn(5, generator=g),
        "f64": torch.randn(2, 2, generator=g).double(),
        "fp8_e4m3": bytes_.view(torch.float8_e4m3fn),  # every bit pattern, NaNs included
        "fp8_e5m2": bytes_.view(torch.float8_e5m2),
        "fp8_e4m3fnuz": bytes_.view(torch.float8_e4m3fnuz),
        "fp8_e8m0": bytes_.view(torch.float8_e8m0fnu),
        "fp4_x2": bytes_.view(torch.float4_e2m1fn_x2),
        "i8": torch.randint(-128, 128, (9,), dtype=torch.int8, generator=g),
        "u8": bytes_,
        "i16": torch.randint(-(2**15), 2**15, (3, 3), dtype=torch.int16, generator=g),
        "i32": torch.randint(-(2**31), 2**31, (4, 2), dtype=torch.int32, generator=g),
        "i64": torch.randint(-(2**62), 2**62, (3,), dtype=torch.int64, generator=g),
        "u16": torch.randint(0, 2**16, (5,), dtype=torch.int32, generator=g).to(torch.uint16),
        "u32": torch.randint(0, 2**31, (5,), dtype=torch.int64, generator=g).to(torch.uint32),
        "bool": torch.rand(3, 4, generator=g) > 0.5,
        "c64": cplx,
        "c64_conj": cplx.conj(),  # lazy conj bit: the values must be written, not the storage
        "scalar_f32": torch.tensor(1.5),
        "scalar_bf16": torch.tensor(-2.25, dtype=torch.bfloat16),
        "scalar_i64": torch.tensor(7, dtype=torch.int64),
        "scalar_bool": torch.tensor(True),
        "empty_f32": torch.empty(0),
        "empty_bf16_2d": torch.empty(0, 5, dtype=torch.bfloat16),
        "empty_i32_3d": torch.empty(3, 0, 2, dtype=torch.int32),
        "transposed": big.t(),  # non-contiguous
        "slice_of_big": big[2:4],  # a view into a larger storage: only its bytes
        "strided": big[:, ::2],
        "grad": torch.ones(3, requires_grad=True),
    }


def read_header(path: Path) -> tuple[int, dict]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n])


def check_layout(path: Path, names: list[str]) -> None:
    """safetensors layout: LE length, header padded to 8, metadata, entries in add order, contiguous data."""
    n, header = read_header(path)
    assert n % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == names
    end = 0
    for entry in header.values():
        start, stop = entry["data_offsets"]
        assert start == end and stop >= start
        end = stop
    assert path.stat().st_size == 8 + n + end


def test_roundtrip_every_dtype(tmp_path):
    tensors = all_dtypes()
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        for name, t in tensors.items():
            w.add(name, t)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    path = out / "model.safetensors"
    check_layout(path, list(tensors))
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        back = loaded[name]
        assert back.dtype == t.dtype, name
        assert back.shape == t.shape, name
        assert raw(back) == raw(t), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert raw(f.get_tensor(name)) == raw(t), name
    # the same tensors through the safetensors library itself: identical values (header order aside)
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.detach().resolve_conj().contiguous().clone() for k, v in tensors.items()}, ref)
    ref_loaded = load_file(ref)
    for name in tensors:
        assert raw(ref_loaded[name]) == raw(loaded[name]), name
        assert ref_loaded[name].shape == loaded[name].shape, name
    assert read_header(ref)[1]["fp4_x2"]["shape"] == read_header(path)[1]["fp4_x2"]["shape"] == [3, 10]
    assert w.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def old_rule(sizes: list[int], limit: int) -> list[list[int]]:
    """The previous writer's rule: a new shard starts when the tensor would overflow a non-empty shard."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def test_sharding_and_index_match_the_old_rule(tmp_path):
    # float32 element counts: exact fit (250+250=500 floats = 2000 B), an oversized tensor alone,
    # empty tensors, a 0-d scalar
    counts = [250, 250, 1, 0, 1000, 0, 100, 400, 0, 1, 300]
    tensors = {f"w{i}": torch.arange(n, dtype=torch.float32) + i for i, n in enumerate(counts)}
    tensors["scalar"] = torch.tensor(3.0)
    limit = 2000
    expected = old_rule([t.numel() * 4 for t in tensors.values()], limit)
    assert expected == [[0, 1], [2, 3], [4], [5, 6, 7, 8], [9, 10, 11]]  # the cases above all occur

    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=limit) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.write_json("config.json", {"a": 1})
    n = len(expected)
    shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", *shard_names]
    )
    names = list(tensors)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * 4 for t in tensors.values())}
    assert index["weight_map"] == {names[i]: shard_names[s] for s, ids in enumerate(expected) for i in ids}
    for s, ids in enumerate(expected):
        check_layout(out / shard_names[s], [names[i] for i in ids])
        loaded = load_file(out / shard_names[s])
        assert set(loaded) == {names[i] for i in ids}
        for i in ids:
            assert torch.equal(loaded[names[i]], tensors[names[i]])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp leftovers


def test_single_shard_has_no_index_and_usual_modes(tmp_path):
    src = tmp_path / "tokenizer.json"
    src.write_text("{}")
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.add("a", torch.ones(2, 2))
        w.copy_file(src)
        w.write_json("config.json", {"x": 1})
        w.commit()  # explicit commit: the exit then does nothing more
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert torch.equal(load_file(out / "model.safetensors")["a"], torch.ones(2, 2))


def test_duplicates_and_bad_dtypes_are_refused(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=16) as w:
        w.add("a", torch.zeros(4))
        w.add("b", torch.zeros(4))  # second shard
        with pytest.raises(ValueError, match="tensor a written twice"):
            w.add("a", torch.zeros(1))
        with pytest.raises(ValueError, match="tensor b written twice"):
            w.add("b", torch.zeros(1))
        with pytest.raises(ValueError, match="complex128"):
            w.add("c", torch.zeros(2, dtype=torch.complex128))
        with pytest.raises(ValueError, match="0-d float4"):
            w.add("d", torch.tensor(1, dtype=torch.uint8).view(torch.float4_e2m1fn_x2))
        w.add("c", torch.ones(4))  # the refusals changed nothing
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == ["a", "b", "c"]
    assert index["metadata"]["total_size"] == 48


def test_added_tensor_is_not_kept(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        t = torch.randn(1000)
        ref = weakref.ref(t)
        w.add("t", t)
        del t
        gc.collect()
        assert ref() is None  # the writer holds no reference: its bytes are already in the file


def test_exception_inside_with_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(out, max_shard_bytes=64) as w:
        for i in range(5):  # closed shards and an open data file exist when the error comes
            w.add(f"t{i}", torch.zeros(8))
        assert any(p.suffix == ".data" for p in w.tmp.iterdir())
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def no_copy_file_range(*args, **kwargs):
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))


@pytest.mark.parametrize("how", ["exdev", "absent"])
def test_user_space_copy_fallback(tmp_path, monkeypatch, how):
    if how == "exdev":
        monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    else:
        monkeypatch.delattr(os, "copy_file_range")
    monkeypatch.setattr(safetensors_out, "COPY_CHUNK", 1000)  # many chunks
    tensors = {f"t{i}": torch.randn(300 + i) for i in range(6)}
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=4000) as w:
        for name, t in tensors.items():
            w.add(name, t)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, t in tensors.items():
        assert torch.equal(load_file(out / index["weight_map"][name])[name], t)


def test_write_error_becomes_iofailure(tmp_path, monkeypatch):
    def disk_full(f, buf):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    with pytest.raises(IOFailure) as info, CheckpointWriter(out) as w:
        w.add("a", torch.zeros(4))
        monkeypatch.setattr(safetensors_out, "_write_all", disk_full)
        try:
            w.add("b", torch.zeros(4))
        except IOFailure as e:
            first = e
            monkeypatch.undo()
            with pytest.raises(IOFailure, match="write failed earlier: No space left on device"):
                w.add("c", torch.zeros(4))  # the shard is unusable after a half-done write
            raise first from None
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == f"{out}: cannot write checkpoint: No space left on device (partial output removed)"
    assert list(tmp_path.iterdir()) == []


def test_failure_while_assembling_a_shard_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", disk_full)
    out = tmp_path / "out"
    message = r"cannot write checkpoint: No space left on device \(partial output removed\)"
    with pytest.raises(IOFailure, match=message):
        with CheckpointWriter(out) as w:
            w.add("a", torch.zeros(4))
    assert list(tmp_path.iterdir()) == []  # the failure came at commit, in __exit__: cleaned up all the same


def test_disk_full_cleanup_survives_a_failing_close(tmp_path, monkeypatch):
    """On a full disk, closing the buffered data file fails too (its flush): the cleanup must go on."""

    class FullDisk:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, _buf):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_out, "open", FullDisk, raising=False)
    with pytest.raises(IOFailure, match="cannot write checkpoint: No space left on device"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.add("a", torch.zeros(4))
    assert list(tmp_path.iterdir()) == []


def test_metadata_values_must_be_strings(tmp_path):
    stream = safetensors_out.SafetensorsStream(tmp_path / "x.safetensors")
    stream.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="metadata values must be strings: seed"):
        stream.finish({"seed": 0})  # type: ignore[dict-item]
    stream.abort()
    assert list(tmp_path.iterdir()) == []


def run_script(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_real_file_size_limit_becomes_iofailure(tmp_path):
    # a genuine OS write error: RLIMIT_FSIZE makes write() fail with EFBIG once the file passes 1 MiB
    result = run_script(
        """
        import json, resource, signal, sys
        import torch
        from qconvert.errors import IOFailure
        from qconvert.formats.safetensors_out import CheckpointWriter

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            with CheckpointWriter(sys.argv[1]) as w:
                w.add("small", torch.zeros(16))
                w.add("big", torch.zeros(1 << 19))  # 2 MiB
            print(json.dumps({"error": None}))
        except IOFailure as e:
            print(json.dumps({"error": str(e), "code": e.exit_code}))
        """,
        str(tmp_path / "out"),
    )
    assert result["error"] is not None and result["error"].endswith(
        "cannot write checkpoint: File too large (partial output removed)")
    assert result["code"] == 1
    assert list(tmp_path.iterdir()) == []


MEMORY_SCRIPT = """
import json, resource, sys
import torch
from qconvert.formats.safetensors_out import CheckpointWriter

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

n = 2 * 1024 * 1024  # float32: 8 MiB per tensor
t = torch.full((n,), 1.0)  # warm the allocator and numpy's view path before the baseline
t.reshape(-1).view(torch.uint8).numpy()
del t
base = peak_mib()
with CheckpointWriter(sys.argv[1], max_shard_bytes=1 << 30) as w:  # one shard: 320 MiB
    for i in range(40):
        w.add(f"t{i}", torch.full((n,), float(i)))
single = peak_mib()
with CheckpointWriter(sys.argv[2], max_shard_bytes=32 << 20) as w:  # 4 tensors a shard: 3 shard closes
    for i in range(12):
        w.add(f"t{i}", torch.full((n,), float(i)))
sharded = peak_mib()
print(json.dumps({"base": base, "single": single, "sharded": sharded}))
"""


def test_peak_memory_is_one_tensor_not_one_shard(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    m = run_script(MEMORY_SCRIPT, str(one), str(many))
    growth = m["sharded"] - m["base"]
    print(f"peak RSS growth writing 320 MiB + 96 MiB: {growth:.1f} MiB (base {m['base']:.0f} MiB)")
    assert m["single"] - m["base"] < 100, m  # the old writer held the whole 320 MiB shard
    assert growth < 100, m
    # and the files are what was asked for
    path = one / "model.safetensors"
    assert path.stat().st_size > 40 * 8 * MiB
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"t{i}" for i in range(40))
        for i in (0, 17, 39):
            sl = f.get_slice(f"t{i}")
            assert sl.get_shape() == [2 * MiB]  # 8 MiB of float32
            assert torch.equal(sl[-3:], torch.full((3,), float(i)))
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 12 * 8 * MiB
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
