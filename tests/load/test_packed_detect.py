"""Quantized safetensors layouts (GPTQ, AWQ, compressed-tensors, FP8, INT8) on small synthetic files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qconvert.formats.packed import find_quantized_layers, summarize_quantization_config
from qconvert.load import open_checkpoint
from qconvert.load.summary import inspect

N, K, G = 64, 256, 2  # out_features, in_features, groups of 128


def i32(*shape):
    return np.random.default_rng(0).integers(-2**31, 2**31 - 1, size=shape, dtype=np.int64).astype(np.int32)


def f16(*shape):
    return np.ones(shape, np.float16)


def f32(*shape):
    return np.ones(shape, np.float32)


def raw(build, dtype, shape, itemsize=1):
    return build.Raw(dtype, list(shape), b"\0" * (int(np.prod(shape)) * itemsize))


def _gptq(p, bits=4, groups=G, g_idx=True):
    t = {f"{p}.qweight": i32(K * bits // 32, N), f"{p}.qzeros": i32(groups, N * bits // 32),
         f"{p}.scales": f16(groups, N), f"{p}.bias": f16(N)}
    if g_idx:
        t[f"{p}.g_idx"] = np.arange(K, dtype=np.int32) // (K // groups)
    return t


def _write(tmp_path, build, tensors, config=None, metadata=None, name="m"):
    d = tmp_path / name
    build.write(d / "model.safetensors", build.safetensors_bytes(tensors, metadata))
    if config is not None:
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": config}))
    return d


def _layers(d):
    ckpt = open_checkpoint(d)
    return {q.name: q for q in find_quantized_layers(ckpt.tensors, ckpt.quantization_config, ckpt.read_raw)}


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
               "checkpoint_format": "gptq", "damp_percent": 0.01}


def test_gptq_4_3_8_bit(tmp_path, build):
    t = {**_gptq("l.q4"), **_gptq("l.q3", bits=3), **_gptq("l.q8", bits=8, groups=1),
         "embed.weight": f32(10, K)}
    layers = _layers(_write(tmp_path, build, t, GPTQ_CONFIG))
    assert set(layers) == {"l.q4", "l.q3", "l.q8"}  # shapes win over the config's bits=4
    q4, q3, q8 = layers["l.q4"], layers["l.q3"], layers["l.q8"]
    assert (q4.method, q4.bits, q4.group_size, q4.parameters, q4.shape) == ("gptq", 4, 128, N * K, (N, K))
    assert q4.tensors == ["l.q4.qweight", "l.q4.qzeros", "l.q4.scales", "l.q4.g_idx"]  # bias is not quantized
    assert q4.nbytes == 32 * N * 4 + G * 8 * 4 + G * N * 2 + K * 4
    assert q4.bits_per_weight == pytest.approx(q4.nbytes * 8 / (N * K))
    assert (q3.bits, q3.group_size, q3.parameters) == (3, 128, N * K)
    assert (q8.bits, q8.group_size, q8.granularity) == (8, -1, "channel")


def test_gptq_without_g_idx_or_config(tmp_path, build):
    layers = _layers(_write(tmp_path, build, _gptq("x", g_idx=False)))
    assert (layers["x"].method, layers["x"].bits, layers["x"].group_size) == ("gptq", 4, 128)


def test_awq_gemm(tmp_path, build):
    p = "model.layers.0.mlp.down_proj"
    t = {f"{p}.qweight": i32(K, N * 4 // 32), f"{p}.qzeros": i32(G, N * 4 // 32), f"{p}.scales": f16(G, N)}
    config = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm"}
    for cfg in (config, None):  # recognised from the shapes alone too
        q = _layers(_write(tmp_path, build, t, cfg, name=f"awq{cfg is None}"))[p]
        assert (q.method, q.bits, q.group_size, q.parameters, q.shape) == ("awq", 4, 128, N * K, (N, K))
        assert q.nbytes == K * 8 * 4 + G * 8 * 4 + G * N * 2
    s = summarize_quantization_config(config)
    assert (s["method"], s["bits"], s["group_size"], s["format"], s["zero_point"], s["sym"]) == \
        ("awq", 4, 128, "gemm", True, False)


CT_W4A16 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                    "actorder": None, "dynamic": False}}},
    "ignore": ["lm_head"],
}


def test_compressed_tensors_pack_quantized(tmp_path, build):
    t = {
        "sym.weight_packed": i32(N, K * 4 // 32), "sym.weight_scale": raw(build, "BF16", (N, G), 2),
        "sym.weight_shape": np.array([N, K], np.int64),
        "asym.weight_packed": i32(N, K * 4 // 32), "asym.weight_scale": raw(build, "BF16", (N, G), 2),
        "asym.weight_shape": np.array([N, K], np.int64), "asym.weight_zero_point": i32(N * 4 // 32, G),
        "b3.weight_packed": i32(N, -(-(K + 8) * 3 // 32)), "b3.weight_scale": raw(build, "BF16", (N, 1), 2),
        "b3.weight_shape": np.array([N, K + 8], np.int64), "b3.weight_g_idx": np.zeros(K + 8, np.int32),
        "lm_head.weight": raw(build, "BF16", (10, K), 2),
    }
    layers = _layers(_write(tmp_path, build, t, CT_W4A16))
    assert set(layers) == {"sym", "asym", "b3"}
    sym, asym, b3 = layers["sym"], layers["asym"], layers["b3"]
    assert (sym.method, sym.bits, sym.group_size, sym.parameters) == ("compressed-tensors", 4, 128, N * K)
    assert sym.nbytes == N * 32 * 4 + N * G * 2 + 16
    assert asym.nbytes == sym.nbytes + 8 * G * 4 and "asym.weight_zero_point" in asym.tensors
    assert (b3.bits, b3.group_size, b3.parameters, b3.shape) == (3, -1, N * (K + 8), (N, K + 8))
    s = summarize_quantization_config(CT_W4A16)
    assert (s["method"], s["bits"], s["group_size"], s["format"], s["sym"], s["type"], s["ignore"]) == \
        ("compressed-tensors", 4, 128, "pack-quantized", True, "int", ["lm_head"])
    assert s["activations"] is None and s["block_structure"] is None  # weight-only, groups


def test_nvfp4(tmp_path, build):
    t = {"x.weight_packed": raw(build, "U8", (N, K // 2)),
         "x.weight_scale": raw(build, "F8_E4M3", (N, K // 16)), "x.weight_global_scale": f32(1)}
    q = _layers(_write(tmp_path, build, t))["x"]
    assert (q.bits, q.group_size, q.parameters) == (4, 16, N * K)


def test_fp8_channel_tensor_block_and_int8(tmp_path, build):
    t = {
        "ch.weight": raw(build, "F8_E4M3", (N, K)), "ch.weight_scale": raw(build, "BF16", (N, 1), 2),
        "pt.weight": raw(build, "F8_E4M3", (N, K)), "pt.weight_scale": f32(), "pt.input_scale": f32(),
        "blk.weight": raw(build, "F8_E4M3", (N, K)), "blk.weight_scale_inv": f32(1, 2),
        "i8.weight": raw(build, "I8", (N, K)), "i8.weight_scale": f16(N, 1),
        "norm.weight": f32(K),
    }
    layers = _layers(_write(tmp_path, build, t, {"quant_method": "fp8", "activation_scheme": "static"}))
    assert set(layers) == {"ch", "pt", "blk", "i8"}
    assert (layers["ch"].method, layers["ch"].granularity, layers["ch"].group_size) == ("fp8", "channel", -1)
    assert layers["ch"].nbytes == N * K + N * 2
    assert (layers["pt"].granularity, layers["pt"].nbytes) == ("tensor", N * K + 8)
    assert layers["pt"].tensors == ["pt.weight", "pt.weight_scale", "pt.input_scale"]
    assert layers["blk"].granularity == "block"
    assert (layers["i8"].method, layers["i8"].bits) == ("int8", 8)
    assert all(q.parameters == N * K and q.bits == 8 for q in layers.values())


def test_inspect_counts_logical_parameters(tmp_path, build):
    t = {**_gptq("model.layers.0.self_attn.q_proj"), "model.norm.weight": f32(K)}
    summary = inspect(_write(tmp_path, build, t, GPTQ_CONFIG))
    assert summary["parameters"] == N * K + N + K  # K*N logical + bias + norm, not packed int32 counts
    assert summary["total_bytes"] == sum(x["nbytes"] for x in summary["tensors"])
    bpw = summary["total_bytes"] * 8 / summary["parameters"]
    assert summary["bits_per_weight"] == pytest.approx(bpw, 1e-4)
    hist = summary["type_histogram"]
    assert hist["I32"] == {"count": 3, "parameters": N * K, "nbytes": 32 * N * 4 + G * 8 * 4 + K * 4}
    assert hist["F16"]["parameters"] == N  # scales count 0, the bias counts N
    q = summary["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["format"], q["sym"], q["desc_act"], q["source"]) == \
        ("gptq", 4, 128, "gptq", True, True, "config.json")
    (layer,) = summary["quantized_layers"]
    assert layer["name"] == "model.layers.0.self_attn.q_proj" and layer["parameters"] == N * K
    assert layer["bits_per_weight"] == pytest.approx(layer["nbytes"] * 8 / (N * K), 1e-3)


def test_quantization_inferred_without_config(tmp_path, build):
    summary = inspect(_write(tmp_path, build, _gptq("a"), None))
    assert summary["quantization"]["source"] == "tensors" and summary["quantization"]["method"] == "gptq"
    meta = {"gptq_bits": "4", "gptq_group_size": "128", "gptq_desc_act": "False", "format": "pt"}
    summary = inspect(_write(tmp_path, build, _gptq("a"), None, metadata=meta, name="autogptq"))
    q = summary["quantization"]
    assert (q["bits"], q["group_size"], q["source"]) == (4, 128, "safetensors metadata")


def test_unquantized_checkpoint_has_no_quantization(tmp_path, build):
    summary = inspect(_write(tmp_path, build, {"w.weight": f32(4, 4)}))
    assert summary["quantization"] is None and summary["quantized_layers"] == []
    assert summary["parameters"] == 16 and summary["bits_per_weight"] == 32.0


def test_compressed_tensors_summary_of_mixed_and_odd_configs():
    """Groups that disagree give lists (a weight-only group counts as None); malformed fields never crash."""
    w = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
    x = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    ct = {"quant_method": "compressed-tensors"}
    groups = {"a": {"weights": w}, "b": {"weights": w, "input_activations": x}}
    mixed = summarize_quantization_config({**ct, "config_groups": groups})
    assert mixed["activations"] == [None, "int8 dynamic token"]
    assert summarize_quantization_config({**ct, "config_groups": [1, 2]})["activations"] is None
    for given, shown in [("128x128", "128x128"), (128, 128), ([128, 128], [128, 128]), ({"a": 1}, None)]:
        qc = {**ct, "config_groups": {"a": {"weights": {**w, "strategy": "block", "block_structure": given}}}}
        assert summarize_quantization_config(qc)["block_structure"] == shown, given
    nv = {**x, "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    nv["dynamic"] = "local"
    qc = {**ct, "config_groups": {"a": {"weights": w, "input_activations": nv}}}
    assert summarize_quantization_config(qc)["activations"] == "float4 local tensor_group 16"
