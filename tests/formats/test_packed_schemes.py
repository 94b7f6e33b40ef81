"""The --scheme writers (formats/packed/fp4.py, int8.py): tensors round-trip through our unpacker and through
compressed-tensors' own decompressors, and the quantization_config is the one llm-compressor 0.14 writes.

The literal configs below are what ``QuantizationModifier(targets="Linear", scheme=PRESET,
ignore=["lm_head"])`` wrote with llm-compressor 0.14.0.1 + compressed-tensors 0.19.0 on SmolLM2-135M
(scripts/llmcompressor_preset.py; compared in full by scripts/compare_fp4.py), minus ``version``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qconvert.formats.packed import dense_tensors, find_quantized_layers, summarize_quantization_config
from qconvert.formats.packed.base import PackPlan
from qconvert.formats.packed.fp4 import MXFP4Format, NVFP4Format
from qconvert.formats.packed.int8 import Int8Format
from qconvert.load import open_checkpoint
from qconvert.methods.rtn import fp4_quantize, rtn_quantize
from qconvert.methods.types import FP4Spec, PackOptions, QuantSpec

N, K = 48, 256
W = (torch.randn(N, K, generator=torch.Generator().manual_seed(5)) * 0.03).to(torch.bfloat16)


def _args(**kw) -> dict:
    """compressed-tensors 0.19's QuantizationArgs serialisation: every field, unset ones null."""
    base = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
            "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": None,
            "symmetric": True, "type": "int", "zp_dtype": None}
    return {**base, **kw}


def _config(fmt: str, weights: dict, inputs: dict | None) -> dict:
    return {
        "config_groups": {"group_0": {"format": fmt, "input_activations": inputs, "output_activations": None,
                                      "targets": ["Linear"], "weights": weights}},
        "format": fmt, "global_compression_ratio": None, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {},
    }


LLMC_014 = {
    "nvfp4a16": _config("nvfp4-pack-quantized", _args(
        num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn",
        observer="memoryless_minmax"), None),
    "mxfp4a16": _config("mxfp4-pack-quantized", _args(
        num_bits=4, type="float", strategy="group", group_size=32, scale_dtype="torch.uint8",
        observer="memoryless_minmax"), None),
    "w8a8": _config("int-quantized", _args(strategy="channel", observer="memoryless_minmax"),
                    _args(strategy="token", dynamic=True)),
}
FORMATS = {"nvfp4a16": NVFP4Format(), "mxfp4a16": MXFP4Format(), "w8a8": Int8Format()}
SPECS = {"nvfp4a16": FP4Spec("nvfp4"), "mxfp4a16": FP4Spec("mxfp4"),
         "w8a8": QuantSpec(bits=8, group_size=-1, sym=True)}


def _plan(scheme: str, act_order: bool = False) -> PackPlan:
    spec = FORMATS[scheme].adapt(SPECS[scheme], "bfloat16")
    return PackPlan(PackOptions(method="rtn", act_order=act_order), spec, {}, ())


@pytest.mark.parametrize("scheme", list(LLMC_014))
def test_config_is_llm_compressors(scheme: str) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    cfg = FORMATS[scheme].quantization_config(_plan(scheme))
    version = cfg.pop("version")
    assert cfg == LLMC_014[scheme]
    import compressed_tensors

    assert version == compressed_tensors.__version__
    parsed = QuantizationConfig.model_validate({**cfg, "version": version})  # the package accepts it
    assert parsed.format == cfg["format"]
    summary = summarize_quantization_config(cfg)
    assert summary is not None
    assert summary["scheme"] == scheme.upper()


def test_w8a8_records_act_order_as_llm_compressors_gptq_does() -> None:
    cfg = Int8Format().quantization_config(_plan("w8a8", act_order=True))
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == "static"


def _source(tmp_path, tensors: dict[str, torch.Tensor], scheme: str):
    """The packed tensors as a checkpoint on disk (what inspect and eval --loader unpack open)."""
    import json

    out = tmp_path / scheme
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    qc = FORMATS[scheme].quantization_config(_plan(scheme))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return open_checkpoint(str(out))


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4a16"])
def test_fp4_roundtrip_and_ct_decompressor(scheme: str, tmp_path) -> None:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    fmt = FORMATS[scheme]
    qt = fp4_quantize(W, SPECS[scheme])
    packed = fmt.pack("model.layers.0.mlp.down_proj", qt)
    t = {k.rpartition(".")[2]: v for k, v in packed.items()}
    group = 16 if scheme == "nvfp4a16" else 32
    assert t["weight_packed"].dtype == torch.uint8 and t["weight_packed"].shape == (N, K // 2)
    want_scale = torch.float8_e4m3fn if scheme == "nvfp4a16" else torch.uint8
    assert t["weight_scale"].dtype == want_scale and t["weight_scale"].shape == (N, K // group)
    if scheme == "nvfp4a16":
        assert t["weight_global_scale"].dtype == torch.float32 and t["weight_global_scale"].shape == (1,)
    else:
        assert "weight_global_scale" not in t

    ckpt = _source(tmp_path, packed, scheme)
    [layer] = find_quantized_layers(ckpt.tensors, ckpt.quantization_config, ckpt.read_raw)
    assert (layer.method, layer.bits, layer.group_size, layer.shape) == (qt.spec.variant, 4, group, (N, K))
    dense = dict(dense_tensors(ckpt))
    assert np.array_equal(dense["model.layers.0.mlp.down_proj.weight"].numpy(), qt.dequantize())

    scheme_cfg = QuantizationConfig.model_validate(ckpt.quantization_config).config_groups["group_0"]
    compressor = NVFP4PackedCompressor if scheme == "nvfp4a16" else MXFP4PackedCompressor
    theirs = compressor.decompress(dict(t), scheme_cfg)["weight"]
    assert torch.equal(theirs.to(torch.bfloat16), torch.from_numpy(qt.dequantize()).to(torch.bfloat16))


def test_w8a8_roundtrip_and_ct_decompressor(tmp_path) -> None:
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    fmt = FORMATS["w8a8"]
    qt = rtn_quantize(W, fmt.adapt(SPECS["w8a8"], "bfloat16"))
    packed = fmt.pack("model.layers.0.mlp.down_proj", qt)
    t = {k.rpartition(".")[2]: v for k, v in packed.items()}
    assert set(t) == {"weight", "weight_scale"}
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (N, K)
    assert t["weight_scale"].dtype == torch.bfloat16 and t["weight_scale"].shape == (N, 1)
    # compressed-tensors' scale: absmax / 127.5 in the weight dtype; the row maximum lands on 127 or -128
    amax = W.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(t["weight_scale"], (W.abs().amax(dim=1, keepdim=True) / 127.5).to(torch.bfloat16))
    assert torch.equal(t["weight"].float().abs().amax(dim=1, keepdim=True) > 126, amax > 0)

    ckpt = _source(tmp_path, packed, "w8a8")
    [layer] = find_quantized_layers(ckpt.tensors, ckpt.quantization_config, ckpt.read_raw)
    assert (layer.method, layer.bits, layer.group_size, layer.granularity) == ("int8", 8, -1, "channel")
    dense = dict(dense_tensors(ckpt))
    assert np.array_equal(dense["model.layers.0.mlp.down_proj.weight"].numpy(), qt.dequantize())
    scheme_cfg = QuantizationConfig.model_validate(ckpt.quantization_config).config_groups["group_0"]
    theirs = IntQuantizationCompressor.decompress(dict(t), scheme_cfg)["weight"]
    assert torch.equal(theirs, torch.from_numpy(qt.dequantize()).to(torch.bfloat16))  # it multiplies in bf16
