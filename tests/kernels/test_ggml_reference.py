"""qconvert.kernels.ggml (the NumPy spec: each registered reference class on its own) against llama.cpp's
own code, byte for byte:

* quantize == ggml_quantize_chunk from the llama-cpp-python 0.3.36 wheel, every type, with and without an
  imatrix, on random data of several distributions, special blocks and real SmolLM2 weights;
* dequantize == gguf-py's independent dequantize and == ggml's to_float;
* llama_model_quantize on a tiny GGUF == our kernels, tensor by tensor (checks the oracle's imatrix passing).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from safetensors import safe_open

from qconvert.errors import BadInput
from qconvert.kernels import BLOCK_TYPES, block_type
from tests.oracle.llamacpp import ggml_dequantize, ggml_quantize_chunk, model_quantize

TYPES = list(BLOCK_TYPES)
QUANTIZED = [t for t in TYPES if t not in (T.F32, T.F16, T.BF16)]
EXPECTED = {
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.IQ3_XXS, T.IQ3_S,
    T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0, T.MXFP4, T.NVFP4,
    T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M,
}  # fmt: skip
# the types ggml refuses without an imatrix (ggml_quantize_requires_imatrix: it aborts; we raise BadInput)
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}
# the quantized types whose bytes ggml computes without looking at the imatrix (ggml-quants.c)
IMATRIX_IGNORED = {T.Q8_0, T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0, T.MXFP4, T.NVFP4}
# types gguf-py 0.19.0 cannot dequantize (NotImplementedError; test_ggml_lowbit holds this list honest)
NO_GGUF_PY_DEQUANT = {T.Q1_0, T.Q2_0}
# lattice-grid types: ggml aborts (GGML_ASSERT) on weights so large that every neighbour score overflows;
# those rows are left out here, and test_ggml_iq3 / test_ggml_iq2 check that we refuse them
GRID_TYPES = {T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M}
GRID_MAX_ABS = 1e15
N = 1024  # columns of the synthetic cases: 4 super-blocks per row


def _name(t: T) -> str:
    return t.name


def reference_quantize(x: np.ndarray, qtype: T | int, imatrix: np.ndarray | None = None) -> np.ndarray:
    return block_type(qtype).reference.quantize(x, imatrix)


def reference_dequantize(q: np.ndarray, qtype: T) -> np.ndarray:
    return block_type(qtype).reference.dequantize(q)


def assert_same_bytes(qtype: T, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray | None:
    """Our bytes must equal ggml_quantize_chunk's; report how many blocks differ and where. Without an
    imatrix, the types ggml refuses must be refused (returns None)."""
    assert block_type(qtype).reference.requires_imatrix == (qtype in NEEDS_IMATRIX)
    if imatrix is None and qtype in NEEDS_IMATRIX:
        with pytest.raises(BadInput, match="needs an importance matrix"):
            reference_quantize(x, qtype, None)
        return None
    ref = ggml_quantize_chunk(qtype, x, imatrix)
    ours = reference_quantize(x, qtype, imatrix)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    type_size = GGML_QUANT_SIZES[qtype][1]
    bad = np.flatnonzero(np.any((ours != ref).reshape(-1, type_size), axis=1))
    assert bad.size == 0, f"{qtype.name}: {bad.size}/{ref.size // type_size} blocks differ, first {bad[:8]}"
    return ref


# --------------------------------------------------------------------------------------------- data


def _normal(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0, 0.02, (8, N))


def _heavy(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_t(2, (8, N)) * 0.01


def _outliers(rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(0, 0.02, (8, N))
    x[rng.random(x.shape) < 0.01] *= 60
    return x


def _special(rng: np.random.Generator) -> np.ndarray:
    """One 256-element super-block per row (8 sub-blocks of 32) for each degenerate pattern."""
    g = rng.standard_normal(256)
    one = np.zeros(256)
    one[37] = -0.4
    signed_zeros = np.where(rng.random(256) < 0.5, -0.0, 0.0)
    rows = [
        np.zeros(256),
        signed_zeros,
        np.full(256, 0.125),
        np.full(256, -3.0),
        np.full(256, 1e-30) * np.sign(g),  # below GROUP_MAX_EPS: the "all zero" paths
        np.full(256, 1e30) * np.sign(g),  # x² overflows to inf
        g * 1e19,  # Σx² overflows
        g * 1e-10,
        g * 1e-40,  # subnormal
        np.where(np.arange(256) % 2, 1.0, -1.0),  # mixed signs, constant magnitude
        one,  # a single non-zero element
        signed_zeros + np.abs(g) * (rng.random(256) < 0.3),  # min is a signed zero
        np.round(g * 4) / 4,  # many exact ties
        np.concatenate([np.zeros(128), g[:128]]),  # zero sub-blocks next to normal ones
        np.where(np.arange(256) % 3 == 0, 65504.0, -65520.0),  # fp16 overflow boundary
        g * np.where(np.arange(256) < 32, 1000.0, 1.0),  # one loud sub-block
    ]
    return np.stack(rows)


DISTRIBUTIONS = {"normal": _normal, "heavy": _heavy, "outliers": _outliers, "special": _special}


def _imatrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "random":
        return rng.random(n).astype(np.float32) + np.float32(0.01)
    # "sparse": a real imatrix has columns that were never activated (0) and a wide dynamic range
    return np.where(rng.random(n) < 0.3, 0.0, rng.random(n) ** 4 * 100).astype(np.float32)


# --------------------------------------------------------------------------------------------- quantize


def test_types_registered() -> None:
    assert set(BLOCK_TYPES) == EXPECTED
    for t, b in BLOCK_TYPES.items():
        assert b.qtype == t and (b.reference.block_size, b.reference.type_size) == GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("imatrix", ["none", "random", "sparse"])
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_quantize_matches_ggml(qtype: T, dist: str, imatrix: str) -> None:
    rng = np.random.default_rng([int(qtype), len(dist), len(imatrix)])
    x = DISTRIBUTIONS[dist](rng).astype(np.float32)
    if qtype in GRID_TYPES:
        x = x[np.abs(x).max(axis=1) < GRID_MAX_ABS]
    assert_same_bytes(qtype, x, _imatrix(imatrix, x.shape[1], rng))


def test_all_zero_superblocks_match_ggml_conventions() -> None:
    """ggml's odd but binding encodings of all-zero input, taken from the oracle, reproduced."""
    x = np.zeros((2, 256), dtype=np.float32)
    xs = assert_same_bytes(T.IQ4_XS, x, None)
    assert xs[0, 0:2].tobytes() == b"\x00\x80"  # d = -0.0
    assert set(xs[0, 8:].tolist()) == {0x88}
    assert not assert_same_bytes(T.Q6_K, x, None).any()  # whole block memset to 0
    for t in (T.Q4_0, T.IQ4_NL):  # d = -0.0 / +0.0, every nibble 8
        blocks = assert_same_bytes(t, x, None).reshape(-1, 18)
        assert set(blocks[:, 2:].ravel().tolist()) == {0x88}
        assert blocks[0, 0:2].tobytes() == (b"\x00\x80" if t == T.Q4_0 else b"\x00\x00")


def test_imatrix_changes_the_bytes() -> None:
    """Guards the test itself: the imatrix path is really exercised (except for the types ggml quantizes
    without it)."""
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (4, 512)).astype(np.float32)
    im = _imatrix("sparse", 512, rng)
    ones = np.ones(512, np.float32)
    for t in QUANTIZED:
        plain = reference_quantize(x, t, ones if t in NEEDS_IMATRIX else None)
        weighted = reference_quantize(x, t, im)
        assert np.array_equal(plain, weighted) == (t in IMATRIX_IGNORED), t.name


def test_nan_in_f16_and_bf16() -> None:
    x = np.array([[np.nan, -np.nan, np.inf, -np.inf, 1.0, 65520.0, 1e-8, -0.0]], dtype=np.float32)
    x = np.concatenate(
        [x, np.array([[0x7F800001, 0xFFBFFFFF, 0x7FC00001, 0x80000001] * 2], np.uint32).view(np.float32)]
    )
    for t in (T.F32, T.F16, T.BF16):
        assert_same_bytes(t, x, None)


def test_row_validation() -> None:
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        reference_quantize(np.zeros((2, 288), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="imatrix has 3 values"):
        reference_quantize(np.zeros((2, 32), np.float32), T.Q4_0, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="no GGUF kernel"):  # Q8_K: ggml's dot-product type, never stored
        reference_quantize(np.zeros((2, 256), np.float32), T.Q8_K)
    one_row = reference_quantize(np.linspace(-1, 1, 64, dtype=np.float32), int(T.Q8_0))  # 1-D, int type
    assert one_row.shape == (1, 68)


# --------------------------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def real_weights(smollm2_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A few rows of two real tensors, with a realistic imatrix each: mean squared layer-0 inputs of 64
    consecutive tokens' embeddings (q_proj), and of the MLP activations they produce (down_proj)."""

    def read(f, name: str, rows: slice | None = None) -> np.ndarray:
        t = f.get_slice(name)
        return (t[rows] if rows is not None else t[:]).float().numpy()

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        h = read(f, "model.embed_tokens.weight", slice(1000, 1064))
        h = (
            h
            / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + 1e-5)
            * read(f, "model.layers.0.input_layernorm.weight")
        )
        gate = h @ read(f, "model.layers.0.mlp.gate_proj.weight").T
        act = gate / (1 + np.exp(-gate)) * (h @ read(f, "model.layers.0.mlp.up_proj.weight").T)
        q = read(f, "model.layers.0.self_attn.q_proj.weight", slice(0, 16))[:, :512].copy()
        down = read(f, "model.layers.0.mlp.down_proj.weight", slice(0, 16))
    q[3, 256:288] = 0  # all-zero sub-block and super-block inside real data
    q[5, :256] = 0
    return {
        "q_proj": (q.astype(np.float32), np.mean(h * h, axis=0)[:512].astype(np.float32)),
        "down_proj": (down.astype(np.float32), np.mean(act * act, axis=0).astype(np.float32)),
    }


@pytest.mark.parametrize("imatrix", ["none", "real"])
@pytest.mark.parametrize("tensor", ["q_proj", "down_proj"])
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_real_weights_match_ggml(real_weights, qtype: T, tensor: str, imatrix: str) -> None:
    x, im = real_weights[tensor]
    assert_same_bytes(qtype, x, im if imatrix == "real" else None)


# --------------------------------------------------------------------------------------------- dequantize


def _sample_bytes(qtype: T) -> np.ndarray:
    """Oracle bytes of ordinary data plus fully random bytes (every bit pattern of scales and levels)."""
    rng = np.random.default_rng(int(qtype))
    im = _imatrix("random", N, rng) if qtype in NEEDS_IMATRIX else None
    real = ggml_quantize_chunk(qtype, _outliers(rng).astype(np.float32)[:4], im)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    return np.concatenate([real, noise])


@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in NO_GGUF_PY_DEQUANT], ids=_name)
def test_dequantize_matches_gguf_py(qtype: T) -> None:
    q = _sample_bytes(qtype)
    ours = reference_dequantize(q, qtype)
    with np.errstate(all="ignore"):  # random scales include inf/NaN
        theirs = gguf.quants.dequantize(q, qtype).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs, strict=True)


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_dequantize_matches_ggml_to_float(qtype: T) -> None:
    q = _sample_bytes(qtype)
    np.testing.assert_array_equal(reference_dequantize(q, qtype), ggml_dequantize(qtype, q), strict=True)


# ------------------------------------------------------------------------------------- llama_model_quantize


def _tiny_llama_gguf(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A one-layer F32 llama GGUF: enough for llama_model_quantize (it loads hparams, not the vocab)."""
    E, F, V = 256, 512, 64
    shapes = {
        "token_embd.weight": (V, E),
        "blk.0.attn_norm.weight": (E,),
        "blk.0.attn_q.weight": (E, E),
        "blk.0.attn_k.weight": (E, E),
        "blk.0.attn_v.weight": (E, E),
        "blk.0.attn_output.weight": (E, E),
        "blk.0.ffn_norm.weight": (E,),
        "blk.0.ffn_gate.weight": (F, E),
        "blk.0.ffn_up.weight": (F, E),
        "blk.0.ffn_down.weight": (E, F),
        "output_norm.weight": (E,),
    }
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tensors = {name: rng.normal(0, 0.02, s).astype(np.float32) for name, s in shapes.items()}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_model_quantize_matches_kernels(tmp_path: Path) -> None:
    """llama_model_quantize (Q4_K_M mixture, imatrix for all weights but one) through the oracle: every tensor
    it wrote is reproduced by our kernels with the same imatrix entry."""
    rng = np.random.default_rng(9)
    src = tmp_path / "f32.gguf"
    tensors = _tiny_llama_gguf(src, rng)
    imatrix = {
        n: (rng.random(t.shape[-1]) ** 2).astype(np.float32) for n, t in tensors.items() if t.ndim == 2
    }
    del imatrix["blk.0.attn_k.weight"]
    out = tmp_path / "q4_k_m.gguf"
    model_quantize(src, out, gguf.LlamaFileType.MOSTLY_Q4_K_M, imatrix, nthread=2)
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(written) == set(tensors)
    types = set()
    for name, x in tensors.items():
        t = written[name]
        types.add(t.tensor_type)
        expected = np.asarray(t.data).reshape(-1).view(np.uint8)
        ours = reference_quantize(x.reshape(-1, x.shape[-1]), t.tensor_type, imatrix.get(name))
        np.testing.assert_array_equal(ours.reshape(-1), expected, err_msg=f"{name} ({t.tensor_type.name})")
    assert {T.Q4_K, T.Q6_K} <= types
