"""Packers: unpacking each format with the numpy reference (and compressed-tensors' own decompressor) gives
exactly the dequantized weights the method produced; config keys; the gptq_marlin checker; refusals; the
writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qconvert.errors import BadInput
from qconvert.formats.packed.awq import AWQFormat
from qconvert.formats.packed.base import PackPlan
from qconvert.formats.packed.compressed_tensors import CompressedTensorsFormat
from qconvert.formats.packed.gptq import GPTQFormat, marlin_problems
from qconvert.formats.safetensors_out import CheckpointWriter
from qconvert.kernels import packing
from qconvert.methods.gptq import gptq_quantize
from qconvert.methods.rtn import rtn_quantize
from qconvert.methods.types import PackOptions, QuantSpec

N, K = 64, 256
RNG = np.random.default_rng(7)
W = (RNG.standard_normal((N, K)) * 0.05).astype(np.float32)
W[:4, :32] = np.abs(W[:4, :32])  # all-positive groups: asym zero 0
X = RNG.standard_normal((512, K)).astype(np.float32) * np.exp(RNG.normal(0, 0.7, K)).astype(np.float32)
H = X.T @ X


def np_(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


CASES = [(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1) for s in (True, False)]


@pytest.mark.parametrize("bits,group,sym", CASES)
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_roundtrip(bits, group, sym, v2):
    fmt = GPTQFormat(v2=v2)
    spec = fmt.adapt(QuantSpec(bits=bits, group_size=group, sym=sym), "bfloat16")
    qt = rtn_quantize(W, spec)
    t = {k.split(".")[-1]: v for k, v in fmt.pack("m", qt).items()}
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (K * bits // 32, N)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (qt.n_groups, N)
    w = packing.gptq_dequantize(
        np_(t["qweight"]), np_(t["qzeros"]), np_(t["scales"]), np_(t["g_idx"]), bits, v2
    )
    np.testing.assert_array_equal(w, qt.dequantize())


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 64, False), (2, 128, True), (8, 64, False)])
@pytest.mark.parametrize("static", [False, True])
def test_gptq_act_order_roundtrip(bits, group, sym, static):
    fmt = GPTQFormat(v2=False)
    spec = fmt.adapt(QuantSpec(bits=bits, group_size=group, sym=sym), "bfloat16")
    qt, _ = gptq_quantize(W, H, spec, act_order=True, static_groups=static)
    assert qt.sequential == static
    t = {k.split(".")[-1]: np_(v) for k, v in fmt.pack("m", qt).items()}
    assert np.array_equal(t["g_idx"], np.arange(K) // group) == static
    w = packing.gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, v2=False)
    np.testing.assert_array_equal(w, qt.dequantize())


def test_gptq_v1_asym_never_stores_zero_zero():
    fmt = GPTQFormat(v2=False)
    spec = fmt.adapt(QuantSpec(bits=4, group_size=32, sym=False), "bfloat16")
    assert spec.min_zero == 1
    qt = rtn_quantize(W, spec)
    assert qt.zeros.min() >= 1
    raw = rtn_quantize(W, QuantSpec(bits=4, group_size=32, sym=False))
    assert raw.zeros.min() == 0  # the fixture really has groups that would need zero 0
    with pytest.raises(BadInput, match="gptq_v2"):
        fmt.pack("m.layer", raw)


@pytest.mark.parametrize("v2,word", [(False, 0x77777777), (True, 0x88888888)])
def test_symmetric_4bit_qzeros_words(v2, word):
    fmt = GPTQFormat(v2=v2)
    qt = rtn_quantize(W, fmt.adapt(QuantSpec(bits=4, group_size=128), "bfloat16"))
    qz = fmt.pack("m", qt)["m.qzeros"].numpy().view(np.uint32)
    assert (qz == word).all()


@pytest.mark.parametrize("bits,group,sym", CASES)
def test_compressed_tensors_roundtrip_and_ct_decompressor(bits, group, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    fmt = CompressedTensorsFormat()
    spec = fmt.adapt(QuantSpec(bits=bits, group_size=group, sym=sym), "bfloat16")
    qt = rtn_quantize(W, spec)
    t = {k.split(".")[-1]: v for k, v in fmt.pack("m", qt).items()}
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape"} | (
        set() if sym else {"weight_zero_point"}
    )
    assert t["weight_scale"].dtype == torch.bfloat16 and t["weight_scale"].shape == (N, qt.n_groups)
    ours = packing.ct_dequantize(
        np_(t["weight_packed"]),
        np_(t["weight_scale"]),
        np_(t["weight_shape"]),
        bits,
        np_(t["weight_zero_point"]) if not sym else None,
    )
    np.testing.assert_array_equal(ours, qt.dequantize())
    # the package's own decompressor, driven by the config we write
    cfg = QuantizationConfig.model_validate(qconfig(fmt, spec, {}, []))
    scheme = cfg.config_groups["group_0"]
    theirs = PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    expected = torch.from_numpy(qt.dequantize()).to(torch.bfloat16)
    assert torch.equal(theirs.to(torch.bfloat16), expected)


@pytest.mark.parametrize("group,sym", [(32, True), (64, False), (128, False), (-1, True)])
def test_awq_roundtrip(group, sym):
    fmt = AWQFormat()
    qt = rtn_quantize(W, fmt.adapt(QuantSpec(bits=4, group_size=group, sym=sym), "bfloat16"))
    t = {k.split(".")[-1]: np_(v) for k, v in fmt.pack("m", qt).items()}
    assert t["qweight"].shape == (K, N // 8) and t["qzeros"].shape == (qt.n_groups, N // 8)
    np.testing.assert_array_equal(
        packing.awq_dequantize(t["qweight"], t["qzeros"], t["scales"]), qt.dequantize()
    )


# --- configs ------------------------------------------------------------------------------------------------

GPTQ_KW = dict(
    method="gptq", act_order=False, static_groups=False, damp=0.01, true_sequential=True, lm_head=False
)


def qconfig(fmt, default, overrides, skipped, **options):
    """The format's quantization_config for a plan of these specs and pack options."""
    return fmt.quantization_config(PackPlan(PackOptions(**{"method": "rtn", **options}), default, overrides,
                                            tuple(skipped)))


def test_gptq_config_has_every_key_vllm_reads():
    cfg = qconfig(GPTQFormat(), QuantSpec(), {}, [], **GPTQ_KW)
    for key in (
        "quant_method",
        "bits",
        "group_size",
        "desc_act",
        "sym",
        "checkpoint_format",
        "pack_dtype",
        "damp_percent",
        "true_sequential",
        "static_groups",
        "lm_head",
        "meta",
    ):
        assert key in cfg
    assert cfg["checkpoint_format"] == "gptq" and cfg["pack_dtype"] == "int32"
    v2 = qconfig(GPTQFormat(v2=True), QuantSpec(), {}, [], **GPTQ_KW)
    assert v2["checkpoint_format"] == "gptq_v2"
    ao = qconfig(GPTQFormat(), QuantSpec(), {}, [], **{**GPTQ_KW, "act_order": True})
    assert ao["desc_act"] is True
    st = qconfig(GPTQFormat(),
        QuantSpec(), {}, [], **{**GPTQ_KW, "act_order": True, "static_groups": True}
    )
    assert st["desc_act"] is False and st["static_groups"] is True


def test_marlin_checker():
    cfg = qconfig(GPTQFormat(), QuantSpec(bits=4, group_size=128), {}, [], **GPTQ_KW)
    good = {"model.layers.0.mlp.up_proj": (1536, 512), "model.layers.0.mlp.down_proj": (512, 1536)}
    assert marlin_problems(cfg, good) == []
    assert marlin_problems(cfg, {"a": (96, 512)}) == ["a: output size 96 (/1) is not a multiple of 64"]
    smollm = marlin_problems(cfg, {"q": (576, 576)})  # SmolLM2: 576 is not a multiple of 128
    assert any("input size 576" in p for p in smollm)
    assert any("group_size 128" in p for p in smollm)
    for spec, needle in (
        (QuantSpec(bits=3), "bits=3"),
        (QuantSpec(sym=False), "sym=False"),
        (QuantSpec(group_size=256), "group_size 256"),
    ):
        bad = qconfig(GPTQFormat(), spec, {}, [], **GPTQ_KW)
        assert any(needle in p for p in marlin_problems(bad, good))
    assert (
        "config lacks desc_act" in marlin_problems({k: v for k, v in cfg.items() if k != "desc_act"}, good)[0]
    )
    # per-layer overrides and skips through "dynamic", as vLLM applies them
    mixed = qconfig(GPTQFormat(),
        QuantSpec(),
        {"model.layers.0.mlp.down_proj": QuantSpec(bits=3)},
        ["model.layers.0.mlp.up_proj"],
        **GPTQ_KW,
    )
    problems = marlin_problems(mixed, {**good, "model.layers.0.mlp.up_proj": (100, 100)})
    assert problems == ["model.layers.0.mlp.down_proj: bits=3 sym=True (marlin needs 4 or 8 bit symmetric)"]


def test_ct_config_overrides_and_ignore():
    from compressed_tensors.quantization import QuantizationConfig

    cfg = qconfig(CompressedTensorsFormat(),
        QuantSpec(bits=4, group_size=64, sym=False),
        {"model.layers.1.mlp.down_proj": QuantSpec(bits=8)},
        ["model.layers.0.mlp.gate"],
        act_order=True,
    )
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.format == "pack-quantized" and cfg["quantization_status"] == "compressed"
    assert cfg["ignore"] == ["lm_head", "model.layers.0.mlp.gate"]
    g0, g1 = cfg["config_groups"]["group_0"], cfg["config_groups"]["group_1"]
    assert (
        g0["targets"] == ["Linear"]
        and g0["weights"]["symmetric"] is False
        and g0["weights"]["actorder"] == "weight"
    )
    assert g1["targets"] == ["model.layers.1.mlp.down_proj"] and g1["weights"]["num_bits"] == 8
    json.dumps(cfg)


@pytest.mark.parametrize(
    "fmt,spec,kw,needle",
    [
        (AWQFormat(), QuantSpec(bits=3), {}, "4-bit"),
        (AWQFormat(), QuantSpec(), {"act_order": True}, "static-groups"),
        (GPTQFormat(), QuantSpec(bits=5), {}, "not 5"),
        (GPTQFormat(), QuantSpec(group_size=48), {}, "group size 48"),
        (CompressedTensorsFormat(), QuantSpec(bits=6), {}, "6-bit"),
        (CompressedTensorsFormat(), QuantSpec(), {"act_order": True}, "static-groups"),
    ],
)
def test_formats_refuse_what_they_cannot_hold(fmt, spec, kw, needle):
    with pytest.raises(BadInput, match=needle):
        fmt.check_spec(spec, PackOptions(method="gptq", **kw))


def test_layer_shape_checks_name_the_layer():
    with pytest.raises(BadInput, match="model.layers.2.x: input width 48"):
        GPTQFormat().check_layer("model.layers.2.x", 64, 48, QuantSpec(bits=3))
    with pytest.raises(BadInput, match="model.layers.2.y: output width 12"):
        AWQFormat().check_layer("model.layers.2.y", 12, 64, QuantSpec())


# --- writer -------------------------------------------------------------------------------------------------


def test_writer_shards_with_index(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    with CheckpointWriter(out, max_shard_bytes=2100) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.write_json("config.json", {"a": 1})
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    for name, t in tensors.items():
        assert torch.equal(load_file(out / index["weight_map"][name])[name], t)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp leftovers


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), CheckpointWriter(out) as w:
        w.add("a", torch.zeros(4))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(BadInput, match="--overwrite"):
        CheckpointWriter(out)
    with CheckpointWriter(out, overwrite=True) as w:
        w.add("a", torch.zeros(4))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
