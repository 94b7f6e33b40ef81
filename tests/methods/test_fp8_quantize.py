"""`qconvert quantize --method fp8` end to end.

Every scheme × format on a synthetic llama: the config is what llm-compressor / vLLM / DeepSeek write,
the tensors have the reference names, dtypes and shapes, the scales are amax / 448 rounded to the stored
dtype, and the codes unpack (numpy reference kernel) to exactly the method's weights. transformers loads
the outputs on CPU to those same weights; on the real fixture model the outputs generate sensible text and
track the bf16 logits. Static input scales from a `qconvert calibrate` file equal the ones of a --dataset
run; bad input is one line, exit 2, no output.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert import cli
from qconvert.kernels.fp8 import decode_e4m3, quantize_fp8
from qconvert.methods.fp8 import fp8_quantize
from qconvert.methods.types import FP8Spec, FP8Tensor
from tests.helpers import read_tensors as tensors

SAMPLES, SEQ = 4, 64
BLOCK = 128
RUNS = [(f, s) for f in ("compressed-tensors", "fp8") for s in ("dynamic", "static", "block")]
LINEAR = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.weight")
CT_PRESETS = {"dynamic": "FP8_DYNAMIC", "static": "FP8", "block": "FP8_BLOCK"}


def run_cli(*args) -> tuple[int, str, str]:
    """The CLI in-process through its real entry point: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    return e.value.code, out.getvalue(), err.getvalue()


def calibrate(src: Path, text: Path, out: Path, samples: int, seq_len: int, kinds: str) -> None:
    args = ["--num-samples", samples, "--seq-len", seq_len, "--stats", kinds]
    code, _, err = run_cli("calibrate", src, "--dataset", text, *args, "-o", out)
    assert code == 0, err


def quantize(src: Path, out: Path, *args) -> dict:
    code, stdout, err = run_cli("quantize", src, "--method", "fp8", *args, "--json", "-o", out)
    assert code == 0, err
    return json.loads(stdout)



def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (bit-exact comparison of any dtype, 0-d included)."""
    return t.reshape(-1).view(torch.uint8)


def linears(src: dict[str, torch.Tensor]) -> list[str]:
    return [m[1] for name in src if (m := LINEAR.fullmatch(name))]


def layout(fmt: str, scheme: str) -> tuple[str, torch.dtype, str]:
    """(strategy, stored scale dtype, weight scale tensor name) the reference writers use (bf16 model)."""
    if fmt == "compressed-tensors":
        return (
            {"dynamic": "channel", "static": "tensor", "block": "block"}[scheme],
            torch.bfloat16,
            "weight_scale",
        )
    if scheme == "block":
        return "block", torch.float32, "weight_scale_inv"
    return "tensor", torch.float32, "weight_scale"


def expected_scale(w: np.ndarray, strategy: str, dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 in float32, rounded once to the stored dtype (the spec, written out with numpy)."""
    a = np.abs(w)
    if strategy == "tensor":
        amax = a.max().reshape(1)
    elif strategy == "channel":
        amax = a.max(axis=1, keepdims=True)
    else:
        n, k = a.shape
        amax = a.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK).max(axis=(1, 3))
    return torch.from_numpy(amax / np.float32(448.0)).to(dtype)


def broadcast(scale: np.ndarray, strategy: str, shape: tuple[int, int]) -> np.ndarray:
    if strategy == "block":
        scale = np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[: shape[0], : shape[1]]
    return np.broadcast_to(scale.reshape(scale.shape if scale.ndim == 2 else (1, 1)), shape)


def reference_unpack(got: dict[str, torch.Tensor], prefix: str, strategy: str, scale_name: str) -> np.ndarray:
    """What every reader reconstructs: decode(e4m3 bytes) × the stored scale broadcast, in float32."""
    codes = got[f"{prefix}.weight"].view(torch.uint8).numpy()
    scale = got[f"{prefix}.{scale_name}"].float().numpy()
    return decode_e4m3(codes) * broadcast(scale, strategy, codes.shape)


def method_weight(w: torch.Tensor, fmt: str, scheme: str) -> FP8Tensor:
    strategy, dtype, _ = layout(fmt, scheme)
    return fp8_quantize(w, FP8Spec(strategy, (BLOCK, BLOCK), str(dtype).removeprefix("torch.")))


# --- the synthetic llama in every scheme × format -----------------------------------------------------------


@pytest.fixture(scope="module")
def synth_src(synthetic_dir) -> Path:
    return synthetic_dir("llama", tied=False)  # a separate lm_head: it must stay untouched


@pytest.fixture(scope="module")
def synth(synth_src, calib_text, tmp_path_factory) -> dict[tuple[str, str], Path]:
    base = tmp_path_factory.mktemp("fp8-synthetic")
    outs = {}
    for fmt, scheme in RUNS:
        out = outs[fmt, scheme] = base / f"{fmt}-{scheme}"
        data = (
            ["--dataset", calib_text, "--num-samples", SAMPLES, "--seq-len", SEQ]
            if scheme == "static"
            else []
        )
        summary = quantize(synth_src, out, "--scheme", scheme, "--format", fmt, *data)
        assert summary["scheme"] == scheme and summary["skipped"] == ["lm_head"]
        assert sum(r["layers"] for r in summary["schemes"]) == 28
    return outs


@pytest.mark.parametrize("fmt,scheme", RUNS)
def test_config_is_the_reference_one(synth, synth_src, fmt, scheme):
    config = json.loads((synth[fmt, scheme] / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == json.loads((synth_src / "config.json").read_text())  # nothing else changed
    if fmt == "fp8":
        want = {
            "quant_method": "fp8",
            "activation_scheme": "static" if scheme == "static" else "dynamic",
            "ignored_layers": ["lm_head"],
        }
        if scheme == "block":
            want |= {"weight_block_size": [128, 128], "fmt": "e4m3"}
        assert qc == want
        return
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert list(qc["config_groups"]) == ["group_0"] and group["targets"] == ["Linear"]
    w, x = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["symmetric"], w["dynamic"]) == ("float", 8, True, False)
    assert x["type"] == "float" and x["num_bits"] == 8 and x["symmetric"]
    assert w["strategy"] == {"dynamic": "channel", "static": "tensor", "block": "block"}[scheme]
    if scheme == "block":
        assert w["block_structure"] == [128, 128]
    want_x = {
        "dynamic": ("token", True, None),
        "static": ("tensor", False, None),
        "block": ("group", True, 128),
    }
    assert (x["strategy"], x["dynamic"], x["group_size"]) == want_x[scheme]
    # parsed by compressed-tensors itself, the scheme is llm-compressor's preset
    parsed = QuantizationConfig.model_validate(qc)
    preset = preset_name_to_scheme(CT_PRESETS[scheme], ["Linear"])
    got = parsed.config_groups["group_0"]
    assert got.weights == preset.weights and got.input_activations == preset.input_activations
    assert got.format == "float-quantized"


@pytest.mark.parametrize("fmt,scheme", RUNS)
def test_tensors_unpack_to_the_method_weights(synth, synth_src, fmt, scheme):
    src, got = tensors(synth_src), tensors(synth[fmt, scheme])
    strategy, dtype, scale_name = layout(fmt, scheme)
    prefixes = linears(src)
    assert len(prefixes) == 28
    extra = [scale_name] + (["input_scale"] if scheme == "static" else [])
    want_names = {n for n in src if not LINEAR.fullmatch(n)} | {
        f"{p}.{s}" for p in prefixes for s in ["weight", *extra]
    }
    assert set(got) == want_names
    for name in src:
        if not LINEAR.fullmatch(name):  # embeddings, norms, lm_head: as they were
            assert got[name].dtype == src[name].dtype and torch.equal(got[name], src[name]), name
    for p in prefixes:
        w = src[f"{p}.weight"]
        n, k = w.shape
        q, s = got[f"{p}.weight"], got[f"{p}.{scale_name}"]
        assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
        scale_shape = {
            "channel": (n, 1),
            "block": (n // BLOCK, k // BLOCK),
            "tensor": (1,) if fmt == "compressed-tensors" else (),
        }[strategy]
        assert s.dtype == dtype and tuple(s.shape) == scale_shape, p
        w32 = w.float().numpy()
        assert torch.equal(s.reshape(-1), expected_scale(w32, strategy, dtype).reshape(-1)), p
        codes = q.view(torch.uint8).numpy()
        assert np.array_equal(codes, quantize_fp8(w32, broadcast(s.float().numpy(), strategy, (n, k)))), p
        qt = method_weight(w, fmt, scheme)
        assert np.array_equal(codes, qt.codes.numpy()), p
        assert np.array_equal(reference_unpack(got, p, strategy, scale_name), qt.dequantize().numpy()), p
        if scheme == "static":
            x = got[f"{p}.input_scale"]
            assert x.dtype == dtype and tuple(x.shape) == ((1,) if fmt == "compressed-tensors" else ())
            assert torch.isfinite(x).all() and float(x) > 0


@pytest.mark.parametrize("fmt,scheme", RUNS)
def test_eval_unpacker_gives_the_same_weights(synth, synth_src, fmt, scheme):
    """qconvert eval's own unpacker (formats.packed.dense_tensors) reads every output as the reference."""
    from qconvert.formats.packed import dense_tensors
    from qconvert.load import open_checkpoint

    src, got = tensors(synth_src), tensors(synth[fmt, scheme])
    strategy, _, scale_name = layout(fmt, scheme)
    dense = dict(dense_tensors(open_checkpoint(str(synth[fmt, scheme]))))
    assert set(dense) == set(src)
    for name, t in dense.items():
        m = LINEAR.fullmatch(name)
        want = torch.from_numpy(reference_unpack(got, m[1], strategy, scale_name)) if m else src[name].float()
        assert torch.equal(t, want), name


def _hf(path: Path, dequantize: bool | None):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {} if dequantize is None else {"quantization_config": CompressedTensorsConfig(dequantize=dequantize)}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, **kw).eval()


def _assert_transformers_weights(model, got, src, strategy, scale_name, quantized: set[str]):
    sd = model.state_dict()
    assert set(sd) - set(src) <= {"lm_head.weight"}  # tied: transformers lists lm_head too
    for name, t in sd.items():
        if name not in src:
            assert t.data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
            continue
        prefix = name.removesuffix(".weight")
        if prefix in quantized:
            want = torch.from_numpy(reference_unpack(got, prefix, strategy, scale_name)).to(torch.bfloat16)
        else:
            want = src[name]
        assert t.dtype == torch.bfloat16 and torch.equal(t, want), name


@pytest.mark.parametrize("scheme", ["dynamic", "static", "block"])
def test_transformers_dequantizes_compressed_tensors_to_our_weights(synth, synth_src, scheme):
    path = synth["compressed-tensors", scheme]
    src, got = tensors(synth_src), tensors(path)
    strategy, _, scale_name = layout("compressed-tensors", scheme)
    model = _hf(path, dequantize=True)
    _assert_transformers_weights(model, got, src, strategy, scale_name, set(linears(src)))


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_transformers_default_compressed_tensors_path_runs(synth, scheme):
    """Without dequantize, transformers keeps the FP8 scheme: our tensors are loaded as they are (weights
    decompressed on the first forward, activations quantized on the fly) and the forward runs."""
    path = synth["compressed-tensors", scheme]
    got = tensors(path)
    model = _hf(path, dequantize=None)
    loaded = model.state_dict()
    for name, t in got.items():
        assert loaded[name].dtype == t.dtype, name
        assert torch.equal(raw(loaded[name]), raw(t)), name
    ids = torch.randint(3, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
        dense = _hf(path, dequantize=True)(input_ids=ids).logits.float()
    assert torch.isfinite(logits).all()
    # FP8 activations on a random model: its logits move by ~0.2 (FP8 weights alone move them as much);
    # a wrong scale convention or input scale gives garbage (relative difference ~1 or NaN)
    rel = float((logits - dense).norm() / dense.norm())
    print(f"{scheme}: relative logit difference of emulated FP8 activations {rel:.4f}")
    assert rel < 0.4, rel


def test_fp8_block_loads_in_transformers_fine_grained(synth, synth_src, tmp_path):
    """transformers' fine-grained FP8 path (on CPU: dequantized to bf16) reads our weight_scale_inv blocks,
    honours ignored_layers and a quantized lm_head."""
    src = tensors(synth_src)
    plain = synth["fp8", "block"]
    _assert_transformers_weights(
        _hf(plain, None), tensors(plain), src, "block", "weight_scale_inv", set(linears(src))
    )
    out = tmp_path / "fp8-block-ignore"
    skip = "model.layers.0.self_attn.q_proj"
    args = ["--ignore", r"layers\.0\.self_attn\.q", "--quantize-lm-head"]
    summary = quantize(synth_src, out, "--scheme", "block", "--format", "fp8", *args)
    assert summary["skipped"] == [skip]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignored_layers"] == [skip]
    got = tensors(out)
    assert got[f"{skip}.weight"].dtype == torch.bfloat16 and f"{skip}.weight_scale_inv" not in got
    assert got["lm_head.weight"].dtype == torch.float8_e4m3fn
    assert got["lm_head.weight_scale_inv"].shape == (4096 // BLOCK, 256 // BLOCK)
    quantized = (set(linears(src)) - {skip}) | {"lm_head"}
    _assert_transformers_weights(_hf(out, None), got, src, "block", "weight_scale_inv", quantized)


def test_compressed_tensors_block_with_128_wide_inputs(tmp_path):
    """K = 128 gives a [N/128, 1] block grid: readers must not take it for per-channel scales."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qconvert.formats.packed import dense_tensors
    from qconvert.load import open_checkpoint

    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    src_dir, out = tmp_path / "tiny", tmp_path / "tiny-block"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(src_dir))
    quantize(src_dir, out, "--scheme", "block")
    src, got = tensors(src_dir), tensors(out)
    assert got["model.layers.0.mlp.gate_proj.weight_scale"].shape == (2, 1)
    dense = dict(dense_tensors(open_checkpoint(str(out))))
    for p in linears(src):
        want = reference_unpack(got, p, "block", "weight_scale")
        assert np.array_equal(
            want, method_weight(src[f"{p}.weight"], "compressed-tensors", "block").dequantize().numpy()
        ), p
        assert torch.equal(dense[f"{p}.weight"], torch.from_numpy(want)), p
    _assert_transformers_weights(_hf(out, True), got, src, "block", "weight_scale", set(linears(src)))


# --- static input scales: calibrate file = dataset run; percentiles -----------------------------------------


@pytest.fixture(scope="module")
def stats_file(synth_src, calib_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8-stats") / "stats.safetensors"
    calibrate(synth_src, calib_text, path, SAMPLES, SEQ, "abs_max,token_max")
    return path


def test_stats_file_gives_the_dataset_input_scales(synth, synth_src, stats_file, tmp_path):
    from qconvert.calib.stats import load_stats

    stats = load_stats(stats_file).linears
    for fmt in ("compressed-tensors", "fp8"):
        out = tmp_path / fmt
        quantize(synth_src, out, "--scheme", "static", "--format", fmt, "--stats", stats_file)
        from_stats, from_data = tensors(out), tensors(synth[fmt, "static"])
        assert set(from_stats) == set(from_data)
        for name, t in from_data.items():  # same samples, same bf16 forward: the very same checkpoint
            assert torch.equal(raw(from_stats[name]), raw(t)), name
        _, dtype, _ = layout(fmt, "static")
        for p in linears(tensors(synth_src)):
            want = (stats[p].abs_max.float().max() / 448.0).to(dtype)  # max over channels of max |x|, / 448
            assert torch.equal(from_data[f"{p}.input_scale"].reshape(()), want), p


def test_percentile_uses_per_token_maxima(synth, synth_src, stats_file, tmp_path):
    from qconvert.calib.stats import load_stats

    stats = load_stats(stats_file).linears
    out = tmp_path / "p99"
    quantize(synth_src, out, "--scheme", "static", "--stats", stats_file, "--percentile", "99")
    p99, full = tensors(out), tensors(synth["compressed-tensors", "static"])
    lower = 0
    for p in linears(tensors(synth_src)):
        got, top = float(p99[f"{p}.input_scale"]), float(full[f"{p}.input_scale"])
        token_max = stats[p].token_max.double().numpy()
        assert token_max.size == SAMPLES * SEQ and token_max.max() == float(stats[p].abs_max.max())
        assert got == pytest.approx(np.quantile(token_max, 0.99) / 448, rel=2**-8), p  # one bf16 step
        assert got <= top, p
        lower += got < top
        for name in ("weight", "weight_scale"):  # percentiles only move the input scales
            assert torch.equal(raw(p99[f"{p}.{name}"]), raw(full[f"{p}.{name}"]))
    assert lower > 0


# --- bad input ----------------------------------------------------------------------------------------------


def _copy_with(src: Path, dst: Path, name: str, index: tuple[int, ...], value: float) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(str(f))
    sd[name][index] = value
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def abs_max_only_stats(synth_src, calib_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8-stats-absmax") / "abs_max.safetensors"
    calibrate(synth_src, calib_text, path, 2, 32, "abs_max")
    return path


@pytest.fixture(scope="module")
def other_model_stats(synthetic_dir, calib_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8-stats-other") / "mistral.safetensors"
    calibrate(synthetic_dir("mistral"), calib_text, path, 2, 32, "abs_max")
    return path


BAD = {
    "static without data": (
        ["--scheme", "static"],
        r"--scheme static needs activation statistics: --dataset",
    ),
    "dataset with dynamic": (["--dataset", "{calib}"], r"--scheme dynamic needs no data"),
    "dataset and stats": (
        ["--scheme", "static", "--dataset", "{calib}", "--stats", "{abs_max}"],
        r"either --dataset .* or --stats",
    ),
    "percentile 0": (
        ["--scheme", "static", "--dataset", "{calib}", "--percentile", "0"],
        r"--percentile 0(\.0)?: must be in \(0, 100\]",
    ),
    "percentile 101": (
        ["--scheme", "static", "--dataset", "{calib}", "--percentile", "101"],
        r"--percentile 101(\.0)?: must be in \(0, 100\]",
    ),
    "percentile with dynamic": (["--percentile", "99"], r"--percentile only applies to --scheme static"),
    "gptq format": (
        ["--format", "gptq"],
        r"--method fp8 writes --format compressed-tensors or fp8, not 'gptq'",
    ),
    "percentile without token_max": (
        ["--scheme", "static", "--stats", "{abs_max}", "--percentile", "99.9"],
        r"abs_max\.safetensors: .*no token_max statistics for model\.layers\.0\."
        r".*qconvert calibrate --stats abs_max,token_max",
    ),
    "stats of another model": (
        ["--scheme", "static", "--stats", "{other}"],
        r"mistral\.safetensors: .*stats were collected on model",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(
    synth_src, calib_text, abs_max_only_stats, other_model_stats, tmp_path, case
):
    args, needle = BAD[case]
    subst = {
        "{calib}": str(calib_text),
        "{abs_max}": str(abs_max_only_stats),
        "{other}": str(other_model_stats),
    }
    code, _, err = run_cli(
        "quantize", synth_src, "--method", "fp8", *[subst.get(a, a) for a in args], "-o", tmp_path / "out"
    )
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("qconvert: error: "), err
    assert re.search(needle, err), err
    assert list(tmp_path.iterdir()) == []  # no output, no temp directory


def test_block_refuses_smollm2_shapes(smollm2_dir, tmp_path):
    code, _, err = run_cli(
        "quantize", smollm2_dir, "--method", "fp8", "--scheme", "block", "-o", tmp_path / "o"
    )
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(r"--scheme block: .*model\.layers\.0\.mlp\.down_proj, 576×1536.*--ignore", err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "scheme,tensor,index,value,needle",
    [
        (
            "dynamic",
            "model.layers.1.mlp.up_proj.weight",
            (5, 7),
            float("nan"),
            r"model\.layers\.1\.mlp\.up_proj: weight contains NaN or Inf",
        ),
        (
            "block",
            "model.layers.2.self_attn.o_proj.weight",
            (0, 0),
            float("-inf"),
            r"model\.layers\.2\.self_attn\.o_proj: weight contains NaN or Inf",
        ),
        # a NaN norm makes the next Linears' calibration inputs NaN: no NaN input scale may be written
        (
            "static",
            "model.layers.1.post_attention_layernorm.weight",
            (3,),
            float("nan"),
            r"model\.layers\.1\.mlp\.\w+_proj: its calibration inputs contain NaN or Inf",
        ),
    ],
)
def test_non_finite_values_are_refused(synth_src, calib_text, tmp_path, scheme, tensor, index, value, needle):
    bad = _copy_with(synth_src, tmp_path / "src", tensor, index, value)
    data = ["--dataset", calib_text, "--num-samples", 2, "--seq-len", 32] if scheme == "static" else []
    code, _, err = run_cli(
        "quantize", bad, "--method", "fp8", "--scheme", scheme, *data, "-o", tmp_path / "out"
    )
    assert code == 2, err
    assert err.count("\n") == 1 and re.search(needle, err), err
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_existing_output_is_refused_before_calibrating(synth_src, tmp_path):
    """The output check comes before the calibration pass (the dataset here does not even exist)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli("quantize", synth_src, "--method", "fp8", "--scheme", "static", "--dataset",
                           tmp_path / "missing.txt", "-o", out)
    assert code == 2 and "output exists" in err and err.count("\n") == 1, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- inspect ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,scheme", RUNS)
def test_inspect_recognises_the_fp8_layers(synth, synth_src, fmt, scheme):
    code, stdout, err = run_cli("inspect", synth[fmt, scheme], "--json")
    assert code == 0, err
    info = json.loads(stdout)
    src = tensors(synth_src)
    strategy, _, scale_name = layout(fmt, scheme)
    q = info["quantization"]
    assert (
        q["method"] == fmt and q["bits"] == 8 and q["source"] == "config.json" and q["ignore"] == ["lm_head"]
    )
    if fmt == "compressed-tensors":
        assert (q["format"], q["type"], q["strategy"]) == ("float-quantized", "float", strategy)
        assert q["group_size"] == (-1 if strategy == "channel" else None)
        assert q["block_structure"] == ([128, 128] if scheme == "block" else None)
        want_x = {"dynamic": "float8 dynamic token", "static": "float8 static tensor",
                  "block": "float8 dynamic group 128"}
        assert q["activations"] == want_x[scheme]
    else:
        assert q["activation_scheme"] == ("static" if scheme == "static" else "dynamic")
        assert q["weight_block_size"] == ([128, 128] if scheme == "block" else None)
    layers = {entry["name"]: entry for entry in info["quantized_layers"]}
    assert set(layers) == set(linears(src))
    for p, entry in layers.items():
        n, k = src[f"{p}.weight"].shape
        assert (entry["method"], entry["bits"], entry["granularity"]) == ("fp8", 8, strategy), p
        assert entry["shape"] == [n, k] and entry["parameters"] == n * k
        names = [f"{p}.weight", f"{p}.{scale_name}"] + ([f"{p}.input_scale"] if scheme == "static" else [])
        assert sorted(entry["tensors"]) == sorted(names)
    assert info["parameters"] == sum(t.numel() for t in src.values())
    assert info["type_histogram"]["F8_E4M3"]["parameters"] == sum(src[f"{p}.weight"].numel() for p in layers)


# --- the real fixture model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp8(smollm2_dir, calib_text, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fp8-smollm2")
    outs = {"dynamic": base / "dynamic", "static": base / "static"}
    summary = quantize(smollm2_dir, outs["dynamic"])
    assert summary["format"] == "compressed-tensors" and summary["schemes"][0]["layers"] == 210
    quantize(
        smollm2_dir,
        outs["static"],
        "--scheme",
        "static",
        "--dataset",
        calib_text,
        "--num-samples",
        8,
        "--seq-len",
        256,
    )
    return outs


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir, eval_text):
    """Tokenizer, 192 tokens of held-out text and the bf16 model's logits on them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok(eval_text.read_text()[:4000], return_tensors="pt")["input_ids"][:, :192]
    with torch.inference_mode():
        logits = _hf(smollm2_dir, None)(input_ids=ids).logits.float()
    return tok, ids, logits


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_smollm2_generates_and_tracks_bf16(smollm2_fp8, smollm2_reference, scheme):
    """transformers' default compressed-tensors path (FP8 weights, emulated FP8 activations, the static
    input scales): greedy text is sensible and the logits follow the bf16 model's."""
    tok, ids, base = smollm2_reference
    model = _hf(smollm2_fp8[scheme], None)
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        new = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1] :]
        logits = model(input_ids=ids).logits.float()
    text = tok.decode(new, skip_special_tokens=True)
    agree = float((logits.argmax(-1) == base.argmax(-1)).float().mean())
    kl = float(
        torch.nn.functional.kl_div(
            logits.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
    )
    print(f"{scheme}: {text!r}; top-1 agreement with bf16 {agree:.3f}, KL {kl:.4f}")
    assert "Paris" in text, text
    assert agree >= 0.8 and kl < 0.1, (agree, kl)


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_eval_emulate_loader_quantizes_activations(synth, eval_text, scheme):
    """`eval --loader emulate` keeps the compressed-tensors model compressed: the activations are quantized
    too, so its perplexity differs from the weight-only (dequantized) one, and stays finite."""
    from qconvert.evaluate.run import evaluate

    out = synth["compressed-tensors", scheme]
    dense = evaluate(out, eval_text, ctx=64, chunks=4, loader="transformers")
    emulated = evaluate(out, eval_text, ctx=64, chunks=4, loader="emulate")
    assert np.isfinite(emulated.perplexity) and emulated.perplexity > 1
    assert emulated.perplexity != dense.perplexity
    assert abs(np.log(emulated.perplexity / dense.perplexity)) < 0.5
