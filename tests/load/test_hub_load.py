"""Hub ids: offline resolution from a local HF cache we build ourselves, and the offline / network errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qconvert.errors import BadInput, IOFailure
from qconvert.load import open_checkpoint
from qconvert.load.hub import looks_like_hub_id
from qconvert.load.summary import inspect

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The documented hub cache layout: models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/main = <commit>} (what snapshot_download leaves behind)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_syntax():
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    for not_hub in ("model", "./a/b", "/abs/path", "a/b/c", "org/model.safetensors", "org/x.gguf", "../x"):
        assert not looks_like_hub_id(not_hub), not_hub


def test_offline_and_not_cached_is_one_line_bad_input(offline_home):
    with pytest.raises(BadInput) as e:
        open_checkpoint("some-org/not-cached-model")
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in str(e.value)
    assert "some-org/not-cached-model" in str(e.value)


def test_loads_from_a_local_cache_offline(offline_home, build):
    weights = build.safetensors_bytes({"model.norm.weight": np.arange(4, dtype=np.float32)})
    snap = _cache_model(offline_home, "tiny-org/Tiny-LM", {
        "config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "model.safetensors": weights,
        "pytorch_model.bin": b"not fetched, not read",
    })
    ckpt = open_checkpoint("tiny-org/Tiny-LM")
    assert ckpt.name == "Tiny-LM" and ckpt.path == snap
    assert ckpt.config == {"model_type": "llama"} and set(ckpt.tokenizer_files) == {"tokenizer.json"}
    np.testing.assert_array_equal(ckpt.read_numpy("model.norm.weight"), np.arange(4, dtype=np.float32))
    summary = inspect("tiny-org/Tiny-LM")
    assert (summary["source"], summary["name"], summary["path"]) == ("tiny-org/Tiny-LM", "Tiny-LM", str(snap))
    assert summary["parameters"] == 4


def test_sharded_from_the_cache(offline_home, build):
    s1 = build.safetensors_bytes({"a": np.ones(2, np.float32)})
    s2 = build.safetensors_bytes({"b": np.zeros(3, np.float16)})
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    _cache_model(offline_home, "org/sharded", {
        "config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2,
    })
    assert list(open_checkpoint("org/sharded")) == ["a", "b"]


def test_partially_cached_shards_offline(offline_home, build):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    _cache_model(offline_home, "org/partial", {
        "config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": build.safetensors_bytes({"a": np.ones(2, np.float32)}),
    })
    with pytest.raises(BadInput, match="HF_HUB_OFFLINE is set.*model-00002-of-00002.safetensors"):
        open_checkpoint("org/partial")


def test_cached_without_weights_offline(offline_home):
    _cache_model(offline_home, "org/noweights", {"config.json": b"{}"})
    with pytest.raises(BadInput, match="no .safetensors weights cached"):
        open_checkpoint("org/noweights")


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QCONVERT_DEBUG"))}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "qconvert", *args], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=Path(__file__).resolve().parents[2])


def test_cli_offline_not_cached(tmp_path):
    r = _run_cli(["inspect", "some-org/not-cached"], {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "Traceback" not in r.stderr


def test_network_failure_is_io_failure(tmp_path):
    # nothing listens on port 9 of localhost: connection refused, immediately
    t0 = time.perf_counter()
    r = _run_cli(["inspect", "some-org/unreachable"], {"HF_HOME": str(tmp_path),
                                                       "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0] and "Traceback" not in r.stderr
    assert time.perf_counter() - t0 < 60


def test_network_failure_in_process(tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(IOFailure, match="Connection refused"):
        open_checkpoint("org/anything")
