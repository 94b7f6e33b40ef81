"""The compiled GPTQ column loop gives the torch reference's bits, and GPTQ through it is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.methods.gptq import column_loop, column_loop_reference


@pytest.mark.parametrize("n,b,maxq", [(64, 128, 15), (300, 37, 7), (16, 128, 255), (1, 1, 3)])
def test_column_loop_equals_reference(n, b, maxq):
    g = torch.Generator().manual_seed(n * b + maxq)
    w = torch.randn(n, b, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    a = torch.randn(b, b, generator=g)
    h = a @ a.T + 0.1 * torch.eye(b)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
    s = (2 * amax / maxq).expand(n, b).contiguous()
    z = torch.full((n, b), float((maxq + 1) // 2))
    s[:, b // 2 :] *= 0.7  # a second "group": clamping happens
    w_ref, w_fast = w.clone(), w.clone()
    loss_ref, loss_fast = torch.zeros(n), torch.zeros(n)
    q_ref, e_ref = column_loop_reference(w_ref, u, s, z, maxq, loss_ref)
    q_fast, e_fast = column_loop(w_fast, u, s, z, maxq, loss_fast)
    assert torch.equal(q_ref, q_fast)
    assert torch.equal(e_ref, e_fast)
    assert torch.equal(w_ref, w_fast)
    assert torch.equal(loss_ref, loss_fast)
    assert float(q_ref.min()) >= 0 and float(q_ref.max()) <= maxq


def test_gptq_quantize_uses_the_loop_consistently(monkeypatch):
    """gptq_quantize through the compiled loop == through the reference loop (all group layouts)."""
    import qconvert.methods.gptq as gptq
    from qconvert.methods.types import QuantSpec

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    h = x.T @ x
    w = rng.standard_normal((96, 256)).astype(np.float32)
    cases = [dict(spec=QuantSpec(bits=4, group_size=64)),
             dict(spec=QuantSpec(bits=3, group_size=-1, sym=False)),
             dict(spec=QuantSpec(bits=4, group_size=32), act_order=True),
             dict(spec=QuantSpec(bits=2, group_size=256), act_order=True, static_groups=True)]
    for case in cases:
        fast, _ = gptq.gptq_quantize(w, h, **case)
        monkeypatch.setattr(gptq, "column_loop", gptq.column_loop_reference)
        ref, _ = gptq.gptq_quantize(w, h, **case)
        monkeypatch.undo()
        assert np.array_equal(fast.codes, ref.codes), case
        assert np.array_equal(fast.scales, ref.scales) and np.array_equal(fast.zeros, ref.zeros), case
