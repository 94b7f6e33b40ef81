"""qconvert.kernels.registry: one entry per block type, every list derived from it, one quantize entry point
(fast twin when there is one, per-expert imatrix rows, the float types through their classes)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qconvert.errors import BadInput
from qconvert.formats.gguf import mixture as gm
from qconvert.kernels import (
    BLOCK_TYPES,
    FAST_TYPES,
    FLOAT_TYPES,
    QUANTIZED_TYPES,
    BlockType,
    block_type,
    dequantize,
    quantize,
)
from qconvert.kernels.ggml import kquants, legacy
from qconvert.kernels.registry import _register

# the types with a numba twin: a new twin is added here with its registry line
EXPECTED_FAST = {
    T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS,
    T.IQ3_XXS, T.IQ3_S, T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0, T.MXFP4, T.NVFP4,
    T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M,
}  # fmt: skip


def _rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_rows, n)).astype(np.float32)


def test_one_entry_per_type_and_the_derived_sets() -> None:
    for t, b in BLOCK_TYPES.items():
        assert b.qtype == t and (b.reference.block_size, b.reference.type_size) == GGML_QUANT_SIZES[t]
    assert FLOAT_TYPES == (T.F32, T.F16, T.BF16)
    assert set(QUANTIZED_TYPES) == set(BLOCK_TYPES) - set(FLOAT_TYPES)
    assert set(FAST_TYPES) == EXPECTED_FAST
    assert all(BLOCK_TYPES[t].fast is None for t in FLOAT_TYPES)
    with pytest.raises(ValueError, match="Q4_0 registered twice"):
        _register(BlockType(legacy.Q4_0), BlockType(legacy.Q4_0))
    with pytest.raises(ValueError, match="no GGUF kernel"):
        block_type(T.Q8_K)


def test_the_twin_is_called_with_the_uniform_convention() -> None:
    calls = []

    def twin(blocks, qw, nbr, out, use_qw):
        calls.append((blocks.shape, qw.copy(), nbr, out.shape, use_qw))
        out[:] = 7

    b = BlockType(kquants.Q4_K, twin)
    x = _rows(3, 512, 0)
    im = np.arange(512, dtype=np.float32)
    assert (b.quantize(x, None, threads=1) == 7).all()
    assert (b.quantize(x, im, threads=1) == 7).all()
    (s0, qw0, nbr0, o0, u0), (s1, qw1, nbr1, o1, u1) = calls
    assert (s0, nbr0, o0, u0) == ((6, 256), 2, (6, 144), False) and qw0.shape == (1,)
    assert (s1, nbr1, o1, u1) == ((6, 256), 2, (6, 144), True) and np.array_equal(qw1, im)
    # without a twin: the reference
    ref = BlockType(kquants.Q4_K).quantize(x, im)
    assert np.array_equal(ref, kquants.Q4_K.quantize(x, im)) and np.array_equal(ref, quantize(x, T.Q4_K, im))


def test_types_that_need_an_imatrix_are_refused_before_the_twin_runs() -> None:
    """IQ2_XXS / IQ2_XS / IQ1_S (ggml_quantize_requires_imatrix): ggml aborts without one; we raise BadInput
    on both paths, and the twin never sees the missing imatrix."""
    needs = {t for t, b in BLOCK_TYPES.items() if b.reference.requires_imatrix}
    assert needs == {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}

    def twin(blocks, qw, nbr, out, use_qw):
        raise AssertionError("the twin was called")

    x = _rows(1, 256, 3)
    for t in needs:
        for b in (BlockType(BLOCK_TYPES[t].reference, twin), BlockType(BLOCK_TYPES[t].reference)):
            with pytest.raises(BadInput, match=f"{t.name} needs an importance matrix"):
                b.quantize(x, None)


def test_float_types_go_through_their_classes() -> None:
    x = np.array([[1.0, -2.5, 65520.0, 1e-8, np.nan, -np.nan, np.inf, -0.0]], np.float32)
    assert np.array_equal(quantize(x, T.F32), x.view(np.uint8))
    with np.errstate(over="ignore"):  # 65520 rounds to inf
        assert np.array_equal(quantize(x[:, :4], T.F16), x[:, :4].astype(np.float16).view(np.uint8))
    f16 = quantize(x, T.F16).view("<u2")
    assert f16[0, 4] == 0x7E00 and f16[0, 5] == 0xFE00  # ggml's NaN, not NumPy's
    assert np.array_equal(quantize(x, T.BF16), gguf.quants.quantize(x, T.BF16))
    for t in FLOAT_TYPES:
        q = quantize(x, t, np.ones(8, np.float32))  # an imatrix is accepted and ignored, as by ggml
        assert np.array_equal(q, block_type(t).reference.quantize(x))
        np.testing.assert_array_equal(dequantize(q, t), block_type(t).reference.dequantize(q))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q4_0, T.F16], ids=lambda t: t.name)
def test_per_expert_imatrix_rows(qtype) -> None:
    """[n_mat, rows, n] with an imatrix [n_mat, n]: each matrix with its own row (llama-quantize's loop)."""
    x = _rows(12, 256, 1).reshape(3, 4, 256)
    im = np.random.default_rng(2).random((3, 256)).astype(np.float32) ** 4
    parts = np.concatenate([quantize(x[i], qtype, im[i]) for i in range(3)])
    assert np.array_equal(quantize(x, qtype, im, threads=2), parts)
    assert np.array_equal(quantize(x.reshape(12, 256), qtype, im), parts)
    if qtype != T.F16:  # guards the test: the rows really differ
        assert not np.array_equal(parts, quantize(x, qtype, im[0]))
    assert np.array_equal(quantize(x[0], qtype, im[:1]), quantize(x[0], qtype, im[0]))
    with pytest.raises(ValueError, match="12 rows do not split into 5 matrices"):
        quantize(x, qtype, np.ones((5, 256), np.float32))
    with pytest.raises(ValueError, match="imatrix has 128 values"):
        quantize(x, qtype, np.ones((3, 128), np.float32))


def test_dequantize_inverts_quantize() -> None:
    x = _rows(4, 64, 3)
    y = dequantize(quantize(x, T.Q8_0), T.Q8_0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.abs(y - x).max() < np.abs(x).max() / 100


def test_tensor_type_choices_are_the_registry() -> None:
    """--tensor-type / --output-tensor-type accept exactly the registered types, and say so."""
    for t in BLOCK_TYPES:
        assert gm.parse_tensor_type(t.name.lower()) == t == gm.parse_tensor_type(t.name)
        assert gm.is_quantized(t) == (t in QUANTIZED_TYPES)
    with pytest.raises(BadInput) as err:
        gm.parse_tensor_type("q8_k")
    assert str(err.value).endswith("valid: " + ", ".join(t.name.lower() for t in BLOCK_TYPES))
