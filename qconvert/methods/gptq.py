"""GPTQ (Frantar et al.) as a pure function of the weight W [N, K] and the Hessian H = Σ x xᵀ [K, K].

Follows the reference implementations (IST-DASLab gptq.py, AutoGPTQ, GPTQModel; checkpoint-formats.md §2):
float32 throughout, dead columns (diag H == 0) zeroed, damping relative to mean(diag H) with automatic retry
when Cholesky fails, lazy block updates, act-order (columns by descending diag H, groups formed over the
permuted order, g_idx saved) and static groups (group parameters fixed up front on consecutive original
columns).

Difference from the references, on purpose: scales are rounded to the stored dtype before the codes are
chosen, so the error fed back is the real one (the references round at packing time). The scale of H does
not matter (damping is relative), so callers may pass Σ x xᵀ or any normalised form.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from qconvert.errors import BadInput
from qconvert.methods.quantizer import find_params, quantize_codes
from qconvert.methods.types import QuantizedTensor, QuantSpec

log = logging.getLogger("qconvert.gptq")


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).clone()
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def inverse_hessian_upper(
    h: torch.Tensor, damp: float, name: str, damp_step: float = 0.01
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, raising damp by ``damp_step`` until it
    factors."""
    mean = float(torch.diag(h).mean())
    if not np.isfinite(mean) or mean <= 0:
        raise BadInput(
            f"{name}: Hessian has a non-finite or non-positive diagonal (mean {mean}); "
            "the calibration statistics are broken"
        )
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    d = damp
    while d < 1.0:
        chol, info = torch.linalg.cholesky_ex(h + (d * mean) * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if d != damp:
                    log.warning("%s: Cholesky failed with damp %.3f; succeeded with %.3f", name, damp, d)
                return u, d
        d = round(d + damp_step, 6)
    raise BadInput(
        f"{name}: Hessian is not positive definite even with damping {d:.2f}·mean(diag H); "
        "check the calibration data or --ignore this layer"
    )


def column_loop_reference(w1: torch.Tensor, u1: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int,
                          losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, column by column: quantize column i with its (scale, zero) ``s[:, i], z[:, i]`` and
    spread its error over the block's later columns through the inverse Hessian's Cholesky row ``u1[i]``.
    Updates ``w1`` and ``losses`` in place; returns the codes and the scaled errors. The spec of
    ``column_loop`` (numba, same float32 operations in the same order, no FMA)."""
    codes = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    for i in range(w1.shape[1]):
        col_w = w1[:, i]
        q = quantize_codes(col_w, s[:, i], z[:, i], maxq)
        deq = s[:, i] * (q - z[:, i])
        codes[:, i] = q
        d = u1[i, i]
        losses += (col_w - deq) ** 2 / d**2 / 2
        err = (col_w - deq) / d
        w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
        err1[:, i] = err
    return codes, err1


def column_loop(w1: torch.Tensor, u1: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int,
                losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``column_loop_reference`` compiled (numba): thousands of tiny torch ops per layer become one loop."""
    from qconvert.methods._gptq_loop import block_loop

    codes = torch.empty_like(w1)
    err1 = torch.empty_like(w1)
    block_loop(w1.numpy(), u1.numpy(), s.numpy(), z.numpy(), np.float32(maxq), codes.numpy(), err1.numpy(),
               losses.numpy())
    return codes, err1


def gptq_quantize(
    weight: np.ndarray | torch.Tensor,
    hessian: np.ndarray | torch.Tensor,
    spec: QuantSpec,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "layer",
) -> tuple[QuantizedTensor, float]:
    """Quantize ``W [N, K]`` given ``H [K, K]``; returns the QuantizedTensor and the GPTQ loss Σ
    (w-q)²/d²/2."""
    w = _tensor(weight)
    h = _tensor(hessian)
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"{name}: Hessian {tuple(h.shape)} does not match {k} input columns")
    g = spec.group_for(k)
    if k % g:
        raise BadInput(f"{name}: group size {g} does not divide its {k} input columns (use --ignore)")
    n_groups = k // g
    maxq = spec.maxq

    dead = torch.diag(h) == 0  # inputs that never fire: any value works, 0 keeps them harmless
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.zeros(n, n_groups)
    zeros = torch.zeros(n, n_groups)
    fixed = static_groups or n_groups == 1  # parameters known before the loop, on original columns
    if fixed:
        for j in range(n_groups):
            scales[:, j], zeros[:, j] = find_params(w[:, j * g : (j + 1) * g], spec)

    perm = torch.arange(k)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    u, _ = inverse_hessian_upper(h, damp, name)

    codes = torch.zeros(n, k)
    losses = torch.zeros(n)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        cols = torch.arange(i1, i2)
        if fixed:
            grp = perm[i1:i2] // g
        else:
            grp = cols // g
            for col in range(i1 + (-i1) % g, i2, g):  # first columns of groups (in processing order)
                # as the references: fit on W as of the block start (in-block updates live in w1); this
                # measured better than fitting on the freshly updated columns at 2-3 bits
                scales[:, col // g], zeros[:, col // g] = find_params(w[:, col : col + g], spec)
        w1 = w[:, i1:i2].contiguous()
        q1, err1 = column_loop(w1, u[i1:i2, i1:i2].contiguous(), scales[:, grp].contiguous(),
                               zeros[:, grp].contiguous(), maxq, losses)
        codes[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = None
    if act_order and not fixed:
        g_idx = (invperm // g).to(torch.int32).numpy()  # column k was processed at position invperm[k]
    qt = QuantizedTensor(
        codes=codes[:, invperm].to(torch.uint8).numpy(),
        scales=scales.numpy(),
        zeros=zeros.to(torch.int32).numpy(),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
        g_idx=g_idx,
        scale_dtype=spec.scale_dtype,
    )
    return qt, float(losses.sum())
