"""Quantizer, RTN and GPTQ on synthetic layers with a real-ish Hessian (X from a fixed correlated
distribution)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qconvert.errors import BadInput
from qconvert.methods.gptq import gptq_quantize, inverse_hessian_upper
from qconvert.methods.quantizer import find_params, quantize_codes
from qconvert.methods.rtn import relative_error, rtn_quantize
from qconvert.methods.types import QuantSpec


def layer(n=96, k=256, t=1024, seed=0):
    """W [n, k] and inputs X [t, k] with correlated, unevenly scaled channels (a few outlier channels)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    scale = np.exp(rng.normal(0, 0.8, k)).astype(np.float32)
    x = (rng.standard_normal((t, k)).astype(np.float32) @ mix + 0.3 * rng.standard_normal((t, k))) * scale
    w = (rng.standard_normal((n, k)) * 0.04).astype(np.float32)
    return w, x.astype(np.float32)


def out_err(x, w, qt) -> float:
    return float(np.linalg.norm(x @ w.T - x @ qt.dequantize().T))


# --- quantizer ---------------------------------------------------------------------------------------------


def test_symmetric_params_match_reference_rule():
    x = torch.tensor([[-0.3, 0.1, 0.2], [0.0, 0.0, 0.0], [0.5, 0.25, 0.1]])
    scale, zero = find_params(x, QuantSpec(bits=4, sym=True, scale_dtype="float32"))
    np.testing.assert_allclose(scale.numpy(), [0.6 / 15, 2 / 15, 1.0 / 15], rtol=1e-6)
    assert zero.tolist() == [8, 8, 8]


def test_asymmetric_params_include_zero_in_range():
    x = torch.tensor([[0.2, 0.5, 0.9], [-0.9, -0.5, -0.1]])
    scale, zero = find_params(x, QuantSpec(bits=4, sym=False, scale_dtype="float32"))
    np.testing.assert_allclose(scale.numpy(), [0.9 / 15, 0.9 / 15], rtol=1e-6)
    assert zero.tolist() == [0, 15]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_scales_are_representable_in_the_stored_dtype(dtype):
    w = torch.randn(64, 128) * 0.01
    qt = rtn_quantize(w, QuantSpec(bits=4, group_size=32, scale_dtype=dtype))
    s = torch.from_numpy(qt.scales)
    assert torch.equal(s.to(getattr(torch, dtype)).to(torch.float32), s)
    assert (s > 0).all()


def test_min_zero_keeps_v1_zeros_positive_without_clipping_max():
    x = torch.tensor([[0.0, 0.3, 0.6, 0.9], [-0.01, 0.2, 0.5, 1.0]])
    spec = QuantSpec(bits=4, sym=False, scale_dtype="float32", min_zero=1)
    scale, zero = find_params(x, spec)
    assert (zero >= 1).all()
    deq = scale[:, None] * (quantize_codes(x, scale[:, None], zero[:, None], spec.maxq) - zero[:, None])
    assert float((deq - x).abs().max()) <= float(scale.max()) / 2 + 1e-6


def test_mse_grid_never_worse_than_minmax():
    x = torch.randn(200, 64) * torch.linspace(0.1, 3, 64)
    x[:, 0] *= 8  # an outlier column makes shrinking worthwhile
    for sym in (True, False):
        plain = QuantSpec(bits=3, sym=sym, scale_dtype="float32")
        grid = QuantSpec(bits=3, sym=sym, scale_dtype="float32", mse=2.4)
        errs = []
        for spec in (plain, grid):
            s, z = find_params(x, spec)
            deq = s[:, None] * (quantize_codes(x, s[:, None], z[:, None], spec.maxq) - z[:, None])
            errs.append((deq - x).abs().pow(2.4).sum(1))
        assert (errs[1] <= errs[0] + 1e-5).all()
        assert errs[1].sum() < errs[0].sum()


# --- RTN ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (3, 64, False), (8, -1, True), (2, 32, False)])
def test_rtn_error_within_half_a_step(bits, group, sym):
    w, _ = layer()
    qt = rtn_quantize(w, QuantSpec(bits=bits, group_size=group, sym=sym))
    assert qt.codes.shape == w.shape and qt.codes.max() < 1 << bits
    assert qt.scales.shape == (w.shape[0], w.shape[1] // (group if group > 0 else w.shape[1]))
    step = qt.scales[:, qt.group_index()]
    # half a step, plus the clip that rounding the scale to fp16 (relative 2^-11) costs at the range's edge
    assert (np.abs(w - qt.dequantize()) <= step * (0.5 + (1 << bits) * 2.0**-11) + 1e-6).all()
    assert relative_error(w, qt) < {2: 0.7, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


# --- GPTQ ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 32, False), (3, -1, True), (2, 64, False)])
def test_gptq_beats_rtn_on_output_error(bits, group, sym):
    w, x = layer()
    spec = QuantSpec(bits=bits, group_size=group, sym=sym)
    gq, loss = gptq_quantize(w, x.T @ x, spec)
    rq = rtn_quantize(w, spec)
    assert loss > 0
    assert out_err(x, w, gq) < 0.95 * out_err(x, w, rq)


def test_act_order_groups_over_permuted_order():
    w, x = layer()
    h = x.T @ x
    spec = QuantSpec(bits=4, group_size=32)
    qt, _ = gptq_quantize(w, h, spec, act_order=True)
    perm = np.argsort(-np.diag(h), kind="stable")
    assert qt.g_idx is not None and not qt.sequential
    # the i-th most important column lands in group i // 32
    np.testing.assert_array_equal(qt.g_idx[perm], np.arange(256) // 32)
    assert np.bincount(qt.g_idx).tolist() == [32] * 8
    assert out_err(x, w, qt) < 0.9 * out_err(x, w, rtn_quantize(w, spec))


def test_static_groups_keep_sequential_g_idx():
    w, x = layer()
    spec = QuantSpec(bits=4, group_size=64)
    qt, _ = gptq_quantize(w, x.T @ x, spec, act_order=True, static_groups=True)
    assert qt.sequential and qt.g_idx is None
    plain, _ = gptq_quantize(w, x.T @ x, spec)
    assert out_err(x, w, qt) < 0.9 * out_err(x, w, rtn_quantize(w, spec))
    # static group params come from the original weights, so they equal RTN's
    np.testing.assert_array_equal(qt.scales, rtn_quantize(w, spec).scales)
    assert not np.array_equal(qt.scales, plain.scales)


def test_dead_columns_are_zeroed():
    w, x = layer()
    x[:, 5] = 0
    qt, _ = gptq_quantize(w, x.T @ x, QuantSpec(bits=4, group_size=64))
    assert (qt.dequantize()[:, 5] == 0).all()


def indefinite_hessian(k=64, needed=0.025):
    """H with a zero eigenvalue shifted down so that it factors only once damp > `needed`."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((k // 2, k)).astype(np.float64)
    psd = a.T @ a  # rank k/2: smallest eigenvalue 0
    m = np.mean(np.diag(psd))
    c = needed * m / (1 + needed)  # then c = needed * mean(diag(psd - c I))
    return torch.tensor(psd - c * np.eye(k), dtype=torch.float32)


def test_cholesky_retry_raises_damping(caplog):
    h = indefinite_hessian()
    with caplog.at_level(logging.WARNING, logger="qconvert.gptq"):
        _, used = inverse_hessian_upper(h, 0.01, "model.layers.0.mlp.up_proj")
    assert 0.025 < used <= 0.05
    assert "model.layers.0.mlp.up_proj" in caplog.text
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    qt, loss = gptq_quantize(w, h, QuantSpec(bits=4, group_size=32), name="x")
    assert np.isfinite(loss) and np.isfinite(qt.dequantize()).all()


def test_cholesky_failure_names_the_layer():
    h = torch.eye(64)
    h[-1, -1] = -30.0  # mean(diag) stays positive; no damping below 1 fixes it
    w = np.zeros((8, 64), np.float32)
    with pytest.raises(BadInput, match=r"model\.layers\.7\.self_attn\.o_proj.*not positive definite"):
        gptq_quantize(w, h, QuantSpec(bits=4, group_size=32), name="model.layers.7.self_attn.o_proj")
    h_nan = torch.eye(64)
    h_nan[3, 3] = float("nan")
    with pytest.raises(BadInput, match="o_proj"):
        gptq_quantize(w, h_nan, QuantSpec(bits=4, group_size=32), name="o_proj")


def test_group_must_divide_input_width():
    with pytest.raises(BadInput, match="q_proj.*does not divide"):
        gptq_quantize(np.zeros((8, 96)), np.eye(96), QuantSpec(bits=4, group_size=64), name="q_proj")


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, group_size=-1, scale_dtype="bfloat16"),
                                  QuantSpec(bits=4, group_size=32, sym=False, scale_dtype="float16"),
                                  QuantSpec(bits=3, group_size=64, mse=2.4)])
def test_rtn_with_error_is_rtn_and_its_error(spec):
    """The one-pass path `rtn` runs (codes, scales, zeros and the reported error) equals rtn_quantize +
    relative_error."""
    from qconvert.methods.rtn import rtn_quantize_with_error

    w = (torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    ref = rtn_quantize(w, spec)
    qt, err = rtn_quantize_with_error(w, spec)
    for a, b in ((qt.codes, ref.codes), (qt.scales, ref.scales), (qt.zeros, ref.zeros)):
        assert np.array_equal(a, b)
    assert err == pytest.approx(relative_error(w, ref), rel=1e-6)
