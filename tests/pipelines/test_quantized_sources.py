"""Quantized HF checkpoints as input (issue #19, part 1): FP8 with DeepSeek-V3 block scales,
compressed-tensors float- and pack-quantized, GPTQ v1/v2 and AWQ GEMM, each made from a fixture with our own
`quantize` (and the DeepSeek layout by a helper below), read by convert, quantize, calibrate, imatrix and eval
as the dequantized checkpoint.

The dequantized checkpoint every comparison is made against is written here with a numpy reference that
shares nothing with qconvert's unpackers (bit fields, E4M3 decoding and bf16 rounding done from their
definitions): converting the quantized source must give the very bytes converting that checkpoint gives.
transformers' own fine-grained FP8 dequantization is the external anchor for the DeepSeek layout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert import cli
from tests.helpers import read_tensors as load
from tests.helpers import run_cli

FP8_BLOCK_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}
LINEAR = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale",
                   "weight_packed", "weight_shape", "weight_zero_point")


def _copy_side_files(src: Path, out: Path, quantization_config: dict | None) -> None:
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) \
                and f.name not in ("config.json", "quantize_config.json", "quant_config.json"):
            shutil.copy2(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))


# -- the DeepSeek-V3 layout, written from a bf16 checkpoint --------------------------------------------------

def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / transformers Fp8Quantize: per 128x128 tile (edge tiles partial, the grid ceil-divided)
    scale_inv = amax / 448 in float32, weight = clamp(w / scale_inv, ±448) as float8_e4m3fn."""
    n, k = w.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(gn * bn, gk * bk, dtype=torch.float32)
    padded[:n, :k] = w.float()
    amax = padded.reshape(gn, bn, gk, bk).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = (w.float() / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def write_deepseek_fp8(src: Path, out: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Every decoder Linear's weight as float8_e4m3fn [N, K] plus weight_scale_inv float32
    [ceil(N/128), ceil(K/128)]; embeddings, norms and lm_head stay bf16; config.json gets DeepSeek-V3's
    quantization_config."""
    _copy_side_files(src, out, {**FP8_BLOCK_CONFIG, "weight_block_size": list(block)})
    tensors = {}
    for name, t in load(src).items():
        if LINEAR.search(name):
            q, s = fp8_block_quantize(t, block)
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = q, s
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# -- the numpy reference dequantization ----------------------------------------------------------------------

def e4m3(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn codes -> float32 from the format's definition: bias 7, 3 mantissa bits."""
    b = bits.astype(np.int64)
    e, m = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * np.exp2(e - 7.0))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(b & 0x80, -mag, mag).astype(np.float32)


def fields(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `bits`-wide little-endian fields of int32 words, unrolled along `axis` (field i of word j is
    element j * 32/bits + i)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    per = 32 // bits
    shifts = np.arange(per) * bits
    other = tuple(d for d in range(u.ndim + 1) if d != axis + 1)
    f = np.expand_dims(u, axis + 1) >> np.expand_dims(shifts, other)
    f &= (1 << bits) - 1
    shape = list(u.shape)
    shape[axis] *= per
    return f.reshape(shape)


def to_float(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def ref_dequant(t: dict[str, torch.Tensor], prefix: str, qc: dict) -> np.ndarray:
    """W [N, K] in float32 of one packed Linear, by the formulas of checkpoint-formats.md."""
    p = f"{prefix}."
    if p + "qweight" in t and qc.get("quant_method") == "awq":
        order = np.array([0, 2, 4, 6, 1, 3, 5, 7])
        inv = np.argsort(order)  # field i of a word holds column 8c + order[i]

        def deinterleave(x: np.ndarray) -> np.ndarray:
            f = fields(x, 4, 1).reshape(x.shape[0], -1, 8)
            return f[:, :, inv].reshape(x.shape[0], -1)
        q, z = deinterleave(t[p + "qweight"].numpy()), deinterleave(t[p + "qzeros"].numpy())
        s = to_float(t[p + "scales"])
        g = q.shape[0] // s.shape[0]
        return ((q - np.repeat(z, g, 0)) * np.repeat(s, g, 0)).astype(np.float32).T
    if p + "qweight" in t:  # GPTQ: weights packed along K, zeros along N, v1 stores zero - 1
        bits = int(qc["bits"])
        q = fields(t[p + "qweight"].numpy(), bits, 0)
        z = fields(t[p + "qzeros"].numpy(), bits, 1) + (qc.get("checkpoint_format") != "gptq_v2")
        g_idx = t[p + "g_idx"].numpy().astype(np.int64)
        s = to_float(t[p + "scales"])
        return ((q - z[g_idx]) * s[g_idx]).astype(np.float32).T
    if p + "weight_packed" in t:  # compressed-tensors pack-quantized, symmetric: codes offset by 2^(b-1)
        n, k = (int(v) for v in t[p + "weight_shape"].numpy())
        s = to_float(t[p + "weight_scale"])
        q = fields(t[p + "weight_packed"].numpy(), 4, 1)[:, :k] - 8
        return (q * np.repeat(s, k // s.shape[1], 1)).astype(np.float32)
    w = e4m3(t[p + "weight"].view(torch.uint8).numpy())
    n, k = w.shape
    if p + "weight_scale_inv" in t:
        s, (bn, bk) = to_float(t[p + "weight_scale_inv"]), qc.get("weight_block_size", [128, 128])
    else:
        s = to_float(t[p + "weight_scale"])
        block = qc["config_groups"]["group_0"]["weights"].get("block_structure")
        bn, bk = block or (-(-n // s.shape[0]), -(-k // s.shape[-1]) if s.ndim == 2 else k)
        s = s.reshape(-1, 1) if s.ndim < 2 else s
    return w * np.repeat(np.repeat(s, bn, 0)[:n], bk, 1)[:, :k]


def bf16(x: np.ndarray) -> torch.Tensor:
    """float32 -> bfloat16, round to nearest even on the bits (finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return torch.from_numpy(rounded.view(np.int16)).view(torch.bfloat16)


def write_dequantized(src: Path, out: Path) -> Path:
    """The dequantized bf16 checkpoint of a quantized one: every packed Linear by the reference above, rounded
    once to bf16, the rest as stored, scales and packing tensors gone."""
    config = json.loads((src / "config.json").read_text())
    qc = config["quantization_config"]
    t = load(src)
    prefixes = {n.rsplit(".", 1)[0] for n, v in t.items() if n.endswith((".qweight", ".weight_packed"))
                or (n.endswith(".weight") and v.element_size() == 1)}
    dense: dict[str, torch.Tensor] = {}
    for name, v in t.items():
        head, _, leaf = name.rpartition(".")
        if head in prefixes and f"{head}.weight" not in dense:
            dense[f"{head}.weight"] = bf16(ref_dequant(t, head, qc))
        if head in prefixes and (leaf in PACKED_SUFFIXES or leaf == "weight"):
            continue
        if leaf not in PACKED_SUFFIXES:
            dense[name] = v
    _copy_side_files(src, out, None)
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# -- sources -------------------------------------------------------------------------------------------------

QUANTIZE = {  # source name -> `qconvert quantize` arguments that make it
    "fp8-block": ["--method", "fp8", "--scheme", "block", "--format", "fp8"],
    "ct-fp8-block": ["--method", "fp8", "--scheme", "block", "--format", "compressed-tensors"],
    "ct-fp8-channel": ["--method", "fp8", "--scheme", "dynamic", "--format", "compressed-tensors"],
    "ct-pack": ["--method", "rtn", "--format", "compressed-tensors"],
    "gptq": ["--method", "rtn", "--format", "gptq"],
    "gptq_v2": ["--method", "rtn", "--format", "gptq_v2", "--asym"],
    "awq": ["--method", "rtn", "--format", "awq"],
}
NOTES = {
    "deepseek": r"dequantized 28 fp8-block tensors \(weight_scale_inv 128×128\) to bf16",
    "fp8-block": r"dequantized 28 fp8-block tensors \(weight_scale_inv 128×128\) to bf16",
    "ct-fp8-block": r"dequantized 28 fp8-block tensors \(weight_scale 128×128\) to bf16",
    "ct-fp8-channel": r"dequantized 28 fp8-channel tensors \(weight_scale\) to bf16",
    "ct-pack": r"dequantized 28 compressed-tensors 4-bit tensors \(group 128\) to bf16",
    "gptq": r"dequantized 28 gptq 4-bit tensors \(group 128\) to bf16",
    "gptq_v2": r"dequantized 28 gptq_v2 4-bit tensors \(group 128\) to bf16",
    "awq": r"dequantized 28 awq 4-bit tensors \(group 128\) to bf16",
}


@pytest.fixture(scope="module")
def sources(synthetic_dir, tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """kind -> (quantized source, its reference-dequantized bf16 checkpoint), both directories named
    "model" (the GGUF's general.name), made once per module."""
    root = tmp_path_factory.mktemp("sources")
    made: dict[str, tuple[Path, Path]] = {}

    def make(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            src, ref = root / kind / "model", root / f"{kind}-ref" / "model"
            base = synthetic_dir("llama")
            if kind == "deepseek":
                write_deepseek_fp8(base, src)
            else:
                src.parent.mkdir()
                code = cli_quantize(base, src, QUANTIZE[kind])
                assert code == 0, kind
            made[kind] = src, write_dequantized(src, ref)
        return made[kind]

    return make


def cli_quantize(model: Path, out: Path, args: list[str]) -> int:
    try:
        cli.main(["quantize", str(model), *args, "-o", str(out), "--json"])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


KINDS = ["deepseek", *QUANTIZE]
BLOCK_KINDS = ["deepseek", "fp8-block"]  # weight_scale_inv, DeepSeek-V3's layout


def test_reference_dequant_is_the_methods_own_dequantization(sources, synthetic_dir):
    """The numpy reference is right: it gives what the quantizer itself dequantizes to (RTN's codes and scales
    before any packing), so equality with the reference checkpoint is equality with the true weights."""
    from qconvert.formats.packed.awq import AWQFormat
    from qconvert.formats.packed.gptq import GPTQFormat
    from qconvert.methods.rtn import rtn_quantize
    from qconvert.methods.types import QuantSpec

    base = load(synthetic_dir("llama"))
    prefix = "model.layers.1.mlp.down_proj"
    w = base[f"{prefix}.weight"].float().numpy()
    for kind, spec in (("gptq", GPTQFormat(v2=False).adapt(QuantSpec(), "bfloat16")),
                       ("gptq_v2", GPTQFormat(v2=True).adapt(QuantSpec(sym=False), "bfloat16")),
                       ("awq", AWQFormat().adapt(QuantSpec(), "bfloat16"))):  # rtn: sym unless --asym
        src, _ = sources(kind)
        qc = json.loads((src / "config.json").read_text())["quantization_config"]
        np.testing.assert_array_equal(ref_dequant(load(src), prefix, qc), rtn_quantize(w, spec).dequantize(),
                                      err_msg=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_convert_equals_converting_the_dequantized_checkpoint(sources, capsys, tmp_path, kind):
    """convert --to gguf Q4_K_M from the quantized source: byte for byte the file converting the reference
    bf16 checkpoint gives, and one note line saying what was dequantized."""
    src, ref = sources(kind)
    code, _, err = run_cli(capsys, "convert", src, "--type", "Q4_K_M", "-o", tmp_path / "src.gguf")
    assert code == 0, err
    assert re.fullmatch(f"note: {NOTES[kind]}\n", err), err
    code, _, err = run_cli(capsys, "convert", ref, "--type", "Q4_K_M", "-o", tmp_path / "ref.gguf")
    assert code == 0 and "note:" not in err, err
    assert (tmp_path / "src.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_rtn_from_a_quantized_source(sources, capsys, tmp_path, kind):
    """quantize --method rtn from the quantized source writes what it writes from the dequantized checkpoint
    (every tensor and config.json equal), and says what it dequantized (--json: in its notes)."""
    src, ref = sources(kind)
    outs = {}
    for model, tag in ((src, "src"), (ref, "ref")):
        code, stdout, err = run_cli(capsys, "quantize", model, "--method", "rtn", "-o", tmp_path / tag,
                                    "--json")
        assert code == 0, err
        outs[tag] = json.loads(stdout)
    assert [n for n in outs["src"]["notes"] if re.fullmatch(NOTES[kind], n)] and outs["ref"]["notes"] == []
    a, b = load(tmp_path / "src"), load(tmp_path / "ref")
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "src" / "config.json").read_text() == (tmp_path / "ref" / "config.json").read_text()


@pytest.mark.parametrize("kind", ["deepseek", "gptq"])
def test_calibrate_and_imatrix_run_on_a_quantized_source(sources, capsys, tmp_path, calib_text, kind):
    """calibrate and imatrix run the dequantized model: the same statistics as on the reference checkpoint."""
    src, ref = sources(kind)
    for model, tag in ((src, "src"), (ref, "ref")):
        code, _, err = run_cli(capsys, "calibrate", model, "--dataset", calib_text, "-o",
                               tmp_path / f"{tag}.st", "--num-samples", 2, "--seq-len", 64,
                               "--stats", "sq_sum,abs_max", "-t", 1)
        assert code == 0, err
        assert ("note: dequantized 28 " in err) == (tag == "src"), err
        code, _, err = run_cli(capsys, "imatrix", model, "--dataset", calib_text, "-o",
                               tmp_path / f"{tag}.imatrix.gguf", "--ctx-size", 64, "--chunks", 2, "-t", 1)
        assert code == 0, err
    with safe_open(str(tmp_path / "src.st"), "pt") as a, safe_open(str(tmp_path / "ref.st"), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys()) and len(a.keys()) >= 28
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert (tmp_path / "src.imatrix.gguf").read_bytes() == (tmp_path / "ref.imatrix.gguf").read_bytes()


def test_transformers_fp8_dequantization_is_ours(sources):
    """The external anchor: transformers' fine-grained FP8 loader (dequantizing on CPU) gives our weights, in
    bf16 (one rounding, as DeepSeek's fp8_cast_bf16) and in float32 (no rounding)."""
    from transformers import AutoModelForCausalLM

    from qconvert.formats.packed.dense import DenseView
    from qconvert.load import open_checkpoint

    src, _ = sources("deepseek")
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float32, "F32")):
        ours = DenseView(open_checkpoint(src), name)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
        params = dict(model.named_parameters())
        for prefix in ours.packed:
            theirs = params[f"{prefix}.weight"].detach()
            assert theirs.dtype == dtype and torch.equal(theirs, ours.read(f"{prefix}.weight")), prefix
        assert len(ours.packed) == 28


def test_deepseek_fp8_with_partial_edge_blocks(smollm2_dir, capsys, tmp_path, eval_text):
    """SmolLM2's 576 (4.5 x 128) and 192 (1.5 x 128) wide Linears: ceil-divided scale grids whose edge tiles
    are partial, read as DeepSeek's weight_dequant reads them; convert equals the dequantized checkpoint."""
    src = write_deepseek_fp8(smollm2_dir, tmp_path / "fp8" / "model")
    with safe_open(str(src / "model.safetensors"), "pt") as st:
        assert st.get_slice("model.layers.0.self_attn.k_proj.weight_scale_inv").get_shape() == [2, 5]
    ref = write_dequantized(src, tmp_path / "ref" / "model")
    code, _, err = run_cli(capsys, "convert", src, "--type", "Q4_K_M", "-o", tmp_path / "src.gguf")
    assert code == 0, err
    assert err == "note: dequantized 210 fp8-block tensors (weight_scale_inv 128×128) to bf16\n", err
    code, _, err = run_cli(capsys, "convert", ref, "--type", "Q4_K_M", "-o", tmp_path / "ref.gguf")
    assert code == 0, err
    assert (tmp_path / "src.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    # eval: transformers' Fp8Dequantize refuses partial tiles, so auto takes our unpacker
    auto, unpack = (eval_ppl(capsys, src, eval_text, loader) for loader in ("auto", "unpack"))
    assert auto == unpack and 1 < auto < 1000


def eval_ppl(capsys, model: Path, text: Path, loader: str) -> float:
    code, out, err = run_cli(capsys, "eval", model, "--dataset", text, "-c", 64, "--chunks", 2, "--loader",
                             loader, "--json", "-t", 1)
    assert code == 0, err
    return float(json.loads(out)["perplexity"])


def test_eval_reads_an_fp8_block_source(sources, capsys, eval_text):
    """eval on the DeepSeek layout: transformers' loader (auto: whole 128x128 tiles here) and our unpacker
    build the same float32 model."""
    src, _ = sources("deepseek")
    assert eval_ppl(capsys, src, eval_text, "auto") == eval_ppl(capsys, src, eval_text, "unpack")


P = "model.layers.2.mlp.up_proj."


def _drop_scale(t: dict, qc: dict) -> None:
    del t[P + "weight_scale_inv"]


def _bad_grid(t: dict, qc: dict) -> None:
    t[P + "weight_scale_inv"] = t[P + "weight_scale_inv"][:, :1].contiguous()


def _block(value: object) -> Callable[[dict, dict], None]:
    return lambda t, qc: qc.__setitem__("weight_block_size", value)


BAD = {
    "missing scale": (_drop_scale, r"mlp\.up_proj \(fp8\): .*weight is F8_E4M3 but has no weight_scale_inv"),
    "scale shape": (_bad_grid, r"weight_scale_inv has shape \[6, 1\]; a \[768, 256\] weight in 128x128 "
                               r"blocks needs \[6, 2\]"),
    "block of one int": (_block([128]), r"weight_block_size must be two positive integers \[rows, cols\], "
                                        r"got \[128\]"),
    "block of three": (_block([128, 128, 1]), r"weight_block_size must be two positive integers"),
    "block as text": (_block("128x128"), r"weight_block_size must be two positive integers"),
    "block of floats": (_block([128.0, 128.0]), r"weight_block_size must be two positive integers"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_fp8_source_is_one_line_and_no_output(sources, capsys, tmp_path, calib_text, case):
    edit, message = BAD[case]
    src, _ = sources("deepseek")
    bad = tmp_path / "bad" / "model"
    shutil.copytree(src, bad)
    t = load(src)
    config = json.loads((src / "config.json").read_text())
    edit(t, config["quantization_config"])
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    work = tmp_path / "work"
    work.mkdir()
    for argv in (["convert", bad, "--type", "Q8_0", "-o", work / "out.gguf"],
                 ["quantize", bad, "--method", "rtn", "-o", work / "out"],
                 ["calibrate", bad, "--dataset", calib_text, "-o", work / "stats.safetensors"],
                 ["imatrix", bad, "--dataset", calib_text, "-o", work / "imatrix.gguf"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("qconvert: error: "), (argv[0], err)
        assert re.search(message, err), (argv[0], err)
        assert list(work.iterdir()) == [], argv[0]


def test_round_float32_is_the_torch_cast():
    """load.dtypes.round_float32 keeps exactly what tensor.to(bfloat16 / float16) keeps: ties to even,
    overflow to inf, subnormals, NaN."""
    from qconvert.load.dtypes import round_float32

    rng = np.random.default_rng(0)
    spread = np.ldexp(rng.standard_normal(10000), rng.integers(-40, 40, 10000)).astype(np.float32)
    edges = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x477FF000, 0x33800000, 0x7FC00001, 0xFFBFFFFF, 0x80000000]
    x = np.concatenate([spread, np.array(edges, np.uint32).view(np.float32)])
    for name, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        want = torch.from_numpy(x.copy()).to(dtype).float().numpy()
        np.testing.assert_array_equal(round_float32(x.copy(), name), want, err_msg=name)


def test_the_view_is_the_dequantized_checkpoint(sources):
    """What every command sees of a GPTQ source: the tensor names, order, dtypes and shapes of the dequantized
    checkpoint, config.json without quantization_config, and no packed tensor left to read."""
    from qconvert.formats.packed.dense import dense_source
    from qconvert.load import open_checkpoint

    src, ref = sources("gptq")
    view, dense = dense_source(open_checkpoint(src)), open_checkpoint(ref)
    assert [(n, i.dtype, i.shape) for n, i in view.tensors.items()] == \
        [(n, i.dtype, i.shape) for n, i in dense.tensors.items()]
    assert view.config == dense.config and view.quantization_config is None
    assert dense_source(dense) is dense and dense_source(view) is view
    with pytest.raises(KeyError):
        view.read("model.layers.0.mlp.down_proj.qweight")
    name = "model.layers.0.mlp.down_proj.weight"
    assert np.array_equal(view.read_raw(name), dense.read_raw(name))
    assert torch.equal(view.read(name), dense.read(name)) and view.read(name).is_contiguous()


FP4_AND_INT8 = {"nvfp4a16": "nvfp4 4-bit tensors (group 16)", "mxfp4a16": "mxfp4 4-bit tensors (group 32)",
                "w8a8": "int8-channel tensors (weight_scale)"}


@pytest.mark.parametrize("scheme", FP4_AND_INT8)
def test_fp4_and_int8_sources_equal_the_consumers_dequantization(synthetic_dir, capsys, tmp_path, scheme):
    """The compressed-tensors nvfp4 / mxfp4 / int8 forms take the same path. Reference: transformers'
    compressed-tensors loader with dequantize=True (it computes in the scales' bf16); the checkpoint written
    from its weights converts to the very bytes the quantized source does."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = tmp_path / "src" / "model"
    src.parent.mkdir()
    assert cli_quantize(synthetic_dir("llama"), src, ["--method", "rtn", "--scheme", scheme]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    capsys.readouterr()  # transformers' loading bar
    stored = load(src)
    prefixes = {n.rsplit(".", 1)[0] for n, v in stored.items()
                if n.endswith(".weight_packed") or (n.endswith(".weight") and v.dtype == torch.int8)}
    ref_tensors = {}
    for name, v in stored.items():
        head, _, leaf = name.rpartition(".")
        if head in prefixes:
            ref_tensors.setdefault(f"{head}.weight", theirs[f"{head}.weight"])
        elif v.is_floating_point() and leaf not in PACKED_SUFFIXES:
            ref_tensors[name] = v
    ref = tmp_path / "ref" / "model"
    _copy_side_files(src, ref, None)
    save_file(ref_tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "convert", src, "--type", "Q4_K_M", "-o", tmp_path / "src.gguf")
    assert code == 0 and err == f"note: dequantized 28 {FP4_AND_INT8[scheme]} to bf16\n", err
    code, _, err = run_cli(capsys, "convert", ref, "--type", "Q4_K_M", "-o", tmp_path / "ref.gguf")
    assert code == 0, err
    assert len(prefixes) == 28
    assert (tmp_path / "src.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
