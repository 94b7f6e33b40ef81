"""Lazy loading: opening reads headers only, reading one tensor touches only that tensor's bytes."""

from __future__ import annotations

import json
import resource
import struct
import time

import numpy as np

from qconvert.load import open_checkpoint
from qconvert.load.summary import inspect

HUGE = 64 * 1024**3  # a 64 GiB tensor that exists only as a hole in a sparse file


def _sparse_checkpoint(path):
    """small tensor 'a', then a 64 GiB tensor 'big' (a hole: reading it would fault in 64 GiB of zero pages),
    then small tensor 'z' behind it."""
    a = np.arange(16, dtype=np.float32)
    z = np.arange(8, dtype=np.int32) * 3
    header = {
        "a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
        "big": {"dtype": "BF16", "shape": [HUGE // 2], "data_offsets": [64, 64 + HUGE]},
        "z": {"dtype": "I32", "shape": [8], "data_offsets": [64 + HUGE, 96 + HUGE]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + a.tobytes())
        f.seek(start + 64 + HUGE)
        f.write(z.tobytes())
    return a, z


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_reading_one_tensor_does_not_read_the_others(tmp_path):
    path = tmp_path / "model.safetensors"
    a, z = _sparse_checkpoint(path)
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    assert ckpt.tensors["big"].nbytes == HUGE
    np.testing.assert_array_equal(ckpt.read("a").numpy(), a)
    np.testing.assert_array_equal(ckpt.read_numpy("z"), z)  # lies beyond the 64 GiB region
    elapsed = time.perf_counter() - t0
    # touching 'big' would take minutes and 64 GiB of page faults; reading around it takes milliseconds
    assert elapsed < 2.0, elapsed
    assert _maxrss_mb() - rss0 < 200
    ckpt.close()


def test_inspect_of_a_sparse_64_gib_checkpoint_is_fast(tmp_path):
    path = tmp_path / "model.safetensors"
    _sparse_checkpoint(path)
    t0 = time.perf_counter()
    summary = inspect(path)
    assert time.perf_counter() - t0 < 1.0
    assert summary["total_bytes"] == 64 + HUGE + 32
    assert summary["parameters"] == 16 + HUGE // 2 + 8
