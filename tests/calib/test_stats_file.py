"""`calibrate` output: one safetensors file with provenance; `load_stats` refuses another model's stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qconvert.calib.stats import load_stats, save_stats
from qconvert.errors import BadInput
from qconvert.load import open_checkpoint
from qconvert.pipelines.calibrate import CalibrateOptions, calibrate


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, calib_text: Path) -> Path:
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text(calib_text.read_text()[:20000])
    return f


def test_stats_file_round_trip(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(synthetic_dir("llama"))
    stats = calibrate(ckpt, str(small_text),
        CalibrateOptions(num_samples=3, seq_len=32, dtype="f32", device="cpu", lm_head=True))
    out = save_stats(tmp_path / "stats.safetensors", stats)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model"] == "llama" and meta["num_samples"] == "3" and meta["seq_len"] == "32"
    assert meta["tokens"] == "96" and meta["dataset"] == str(small_text) and len(meta["config_sha256"]) == 64
    assert "model.layers.0.self_attn.q_proj.hessian" in keys
    assert "model.layers.0.self_attn.k_proj.hessian" not in keys  # stored once, k/v are aliases
    assert json.loads(meta["aliases"])["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"

    back = load_stats(out, ckpt)
    assert set(back.linears) == set(stats.linears)
    for name, st in stats.linears.items():
        b = back.linears[name]
        assert b.count == st.count == 96
        for kind in ("hessian", "abs_sum", "sq_sum", "abs_max"):
            assert torch.equal(getattr(b, kind), getattr(st, kind)), (name, kind)
    assert back.linears["model.layers.1.self_attn.v_proj"] is back.linears["model.layers.1.self_attn.q_proj"]


def test_subset_of_statistics(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(synthetic_dir("qwen2"))
    stats = calibrate(ckpt, str(small_text),
        CalibrateOptions(num_samples=1, seq_len=32, kinds="sq_sum", device="cpu"))
    out = save_stats(tmp_path / "s.safetensors", stats)
    with safe_open(str(out), framework="pt") as f:
        kinds = {k.rsplit(".", 1)[1] for k in f.keys()}
    assert kinds == {"sq_sum", "count"}


def test_stats_for_another_model_are_refused(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    llama = open_checkpoint(synthetic_dir("llama"))
    stats = calibrate(llama, str(small_text),
        CalibrateOptions(num_samples=1, seq_len=32, kinds="abs_max", device="cpu"))
    out = save_stats(tmp_path / "s.safetensors", stats)
    with pytest.raises(BadInput, match=r"stats were collected on model 'llama' .*not on 'qwen3'"):
        load_stats(out, open_checkpoint(synthetic_dir("qwen3")))
    load_stats(out, llama)  # the right model is accepted


def test_not_a_stats_file(tmp_path: Path, synthetic_dir) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 32)
    with pytest.raises(BadInput, match="junk.safetensors"):
        load_stats(junk)
    other = next(synthetic_dir("llama").glob("*.safetensors"))
    with pytest.raises(BadInput, match="not a qconvert calibration stats file"):
        load_stats(other)
    with pytest.raises(BadInput, match="stats file not found"):
        load_stats(tmp_path / "nope.safetensors")


def test_calibrate_to_file_streams_layer_by_layer(synthetic_dir, small_text: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    """The CLI's path: each layer's statistics are written as the layer finishes (never all in memory), and
    the file holds exactly what the in-memory pass + save_stats writes."""
    from qconvert.calib.stats import StatsFileWriter
    from qconvert.pipelines import calibrate as calibrate_mod
    from qconvert.pipelines.calibrate import CalibrateOptions

    ckpt = open_checkpoint(synthetic_dir("qwen3"))
    opts = CalibrateOptions(num_samples=2, seq_len=32, dtype="f32", device="cpu", lm_head=True)
    seen: list[list[str]] = []
    real_add = StatsFileWriter.add

    def spy(self, linears):  # one call per layer (+ lm_head), never the whole model at once
        seen.append(sorted(linears))
        real_add(self, linears)

    monkeypatch.setattr(StatsFileWriter, "add", spy)
    meta = calibrate_mod.calibrate_to_file(tmp_path / "streamed.safetensors", ckpt, str(small_text), opts)
    n_layers = ckpt.config["num_hidden_layers"]
    assert len(seen) == n_layers + 1 and seen[-1] == ["lm_head"]
    assert all({n.split(".")[2] for n in names} == {str(i)} for i, names in enumerate(seen[:-1]))

    in_memory = save_stats(tmp_path / "memory.safetensors", calibrate(ckpt, str(small_text), opts))
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as a, \
            safe_open(str(in_memory), framework="pt") as b:
        assert a.metadata() == b.metadata() == meta
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    assert int(meta["linears"]) == 7 * n_layers + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors", "streamed.safetensors"]


def test_failed_calibration_leaves_no_file(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    from qconvert.pipelines.calibrate import CalibrateOptions, calibrate_to_file

    ckpt = open_checkpoint(synthetic_dir("llama"))
    out = tmp_path / "stats.safetensors"

    def boom(step):
        if step.index == 1:
            raise KeyboardInterrupt  # Ctrl-C after layer 0's statistics were written

    with pytest.raises(KeyboardInterrupt):
        calibrate_to_file(out, ckpt, str(small_text),
            CalibrateOptions(num_samples=1, seq_len=32, device="cpu"), on_layer=boom)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadInput, match="tokens"):  # too little text: refused before anything is written
        calibrate_to_file(out, ckpt, str(small_text),
            CalibrateOptions(num_samples=10_000, seq_len=32, device="cpu"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadInput, match="is a directory"):  # refused before the pass, not after it
        calibrate_to_file(tmp_path, ckpt, str(small_text),
            CalibrateOptions(num_samples=10_000, seq_len=32, device="cpu"))


def test_stats_file_mode_follows_umask(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    import os

    ckpt = open_checkpoint(synthetic_dir("llama"))
    stats = calibrate(ckpt, str(small_text),
        CalibrateOptions(num_samples=1, seq_len=32, kinds="abs_max", device="cpu"))
    old = os.umask(0o022)
    try:
        out = save_stats(tmp_path / "s.safetensors", stats)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_stats_file_reads_one_linear_at_a_time(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    """quantize --stats reads each Linear's statistics when its turn comes (all Hessians can outweigh the
    model): the header gives names and kinds; `read` returns one linear, all or only the kinds asked for."""
    from qconvert.calib.stats import StatsFile

    ckpt = open_checkpoint(synthetic_dir("llama"))
    opts = CalibrateOptions(num_samples=2, seq_len=32, kinds="hessian,abs_max,token_max", device="cpu")
    stats = calibrate(ckpt, str(small_text), opts)
    out = save_stats(tmp_path / "s.safetensors", stats)
    sf = StatsFile(out, ckpt)
    assert sorted(sf.names()) == sorted(stats.linears)
    k = "model.layers.0.self_attn.k_proj"  # an alias of q_proj
    assert sf.kinds(k) == {"hessian", "abs_max", "token_max"} and sf.kinds("lm_head") == frozenset()
    one = sf.read(k)
    assert torch.equal(one.hessian, stats.linears[k].hessian) and one.count == 64
    small = sf.read(k, ["token_max"])
    assert small.hessian is None and small.abs_max is None and small.count == 64
    assert torch.equal(small.token_max, stats.linears[k].token_max)
    with pytest.raises(BadInput, match="not on 'qwen3'"):
        StatsFile(out, open_checkpoint(synthetic_dir("qwen3")))


def test_disk_full_while_writing_stats_leaves_nothing(synthetic_dir, small_text: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    """ENOSPC: a one-line IOFailure, and neither the data file nor the temp file stays behind, even though
    closing the buffered data file fails again (a full disk must not stay full of our leftovers)."""
    import errno

    from qconvert.errors import IOFailure
    from qconvert.formats import safetensors_out
    from qconvert.pipelines.calibrate import CalibrateOptions, calibrate_to_file

    class FullDisk:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, _buf):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_out, "open", FullDisk, raising=False)
    ckpt = open_checkpoint(synthetic_dir("llama"))
    with pytest.raises(IOFailure, match="cannot write stats file: No space left on device"):
        calibrate_to_file(tmp_path / "s.safetensors", ckpt, str(small_text),
            CalibrateOptions(num_samples=1, seq_len=32, device="cpu"))
    assert list(tmp_path.iterdir()) == []


def test_missing_output_directory_is_refused(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    from qconvert.pipelines.calibrate import CalibrateOptions, calibrate_to_file

    ckpt = open_checkpoint(synthetic_dir("llama"))
    with pytest.raises(BadInput, match="output directory does not exist"):  # not created, not after the pass
        calibrate_to_file(tmp_path / "new" / "s.safetensors", ckpt, str(small_text),
            CalibrateOptions(num_samples=10_000, seq_len=32, device="cpu"))
    assert list(tmp_path.iterdir()) == []
