"""Numpy reference kernels for integer weight packing: GPTQ, AutoAWQ GEMM and compressed-tensors
pack-quantized.

These are the executable spec (checkpoint-formats.md §1.2, §1.3, §3.1, §5.1, Appendix A). Every packing
is a little-endian bit stream in int32 words: element ``i`` of a packed axis sits at global bit ``i*bits``;
for bit widths that divide 32 this is the plain "``32/bits`` fields per word" layout, for 3 bits it is the
dense 96-bit stream GPTQ and compressed-tensors share. Codes are unsigned (``0 .. 2^bits-1``); words are
returned as int32 (two's complement), the way safetensors stores them.

Orientation (W is a Linear weight ``[N=out, K=in]``):
  gptq    qweight [K*b/32, N] packed along K;  qzeros [G, N*b/32] packed along N (v1 stores zero-1)
  awq     qweight [K, N/8] packed along N with the [0,2,4,6,1,3,5,7] interleave;  qzeros [G, N/8] same,
  true zero
  ct      weight_packed [N, ceil(K*b/32)] packed along K;  weight_zero_point [ceil(N*b/32), G] packed along N
"""

from __future__ import annotations

import numpy as np

M32 = 0xFFFFFFFF
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]


# ------------------------------------------------------------------------------------------------------------
# the one primitive: a dense little-endian bit stream along an axis


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` values of ``bits`` bits."""
    return -(-n * bits // 32)


def _check_codes(values: np.ndarray, bits: int) -> np.ndarray:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = np.asarray(values)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{v.min()}, {v.max()}]")
    return v.astype(np.uint64)


def pack_stream(values: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Pack unsigned codes along ``axis`` into int32 words (element i at bit i*bits, zero padded)."""
    v = np.moveaxis(_check_codes(values, bits), axis, 0)
    n, rest = v.shape[0], v.shape[1:]
    n32 = -(-n // 32) * 32
    if n32 != n:
        v = np.concatenate([v, np.zeros((n32 - n, *rest), np.uint64)])
    v = v.reshape(n32 // 32, 32, *rest)
    out = np.zeros((n32 // 32, bits, *rest), np.uint64)  # 32 values always fill exactly `bits` words
    for i in range(32):
        word, off = divmod(i * bits, 32)
        out[:, word] |= (v[:, i] << np.uint64(off)) & np.uint64(M32)
        if off + bits > 32:  # the field straddles into the next word (3, 5, 6, 7 bits)
            out[:, word + 1] |= v[:, i] >> np.uint64(32 - off)
    out = out.reshape(n32 // 32 * bits, *rest)[: packed_len(n, bits)]
    return np.moveaxis(out.astype(np.uint32).view(np.int32), 0, axis)


def unpack_stream(words: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`pack_stream`: ``n`` unsigned codes (uint8) along ``axis``."""
    w = np.moveaxis(np.asarray(words), axis, 0)
    if w.shape[0] != packed_len(n, bits):
        raise ValueError(f"{w.shape[0]} words cannot hold exactly {n} values of {bits} bits")
    w = w.astype(np.int64) & M32  # works for int32 (two's complement) and uint32 input alike
    rest = w.shape[1:]
    nw = -(-w.shape[0] // bits) * bits
    if nw != w.shape[0]:
        w = np.concatenate([w, np.zeros((nw - w.shape[0], *rest), np.int64)])
    w = w.reshape(nw // bits, bits, *rest)
    out = np.zeros((nw // bits, 32, *rest), np.int64)
    mask = (1 << bits) - 1
    for i in range(32):
        word, off = divmod(i * bits, 32)
        val = w[:, word] >> off
        if off + bits > 32:
            val = val | (w[:, word + 1] << (32 - off))
        out[:, i] = val & mask
    out = out.reshape(nw // bits * 32, *rest)[:n]
    return np.moveaxis(out.astype(np.uint8), 0, axis)


# ------------------------------------------------------------------------------------------------------------
# GPTQ (AutoGPTQ / GPTQModel): qweight along K, qzeros along N, v1 stores zero-1


def gptq_pack_qweight(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, K] → qweight int32 [K*bits/32, N]."""
    return pack_stream(np.asarray(codes).T, bits, axis=0)


def gptq_unpack_qweight(qweight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """qweight [K*bits/32, N] → codes uint8 [N, K]."""
    return unpack_stream(qweight, bits, k, axis=0).T


def gptq_pack_qzeros(zeros: np.ndarray, bits: int, v2: bool) -> np.ndarray:
    """True zero points [G, N] → qzeros int32 [G, N*bits/32]; format v1 stores ``zero - 1``."""
    z = np.asarray(zeros).astype(np.int64)
    if not v2:
        if z.size and z.min() < 1:
            # zero 0 would be stored as -1 and borrow from the neighbouring field (§1.3 "asym + v1 hazard")
            raise ValueError("gptq v1 cannot store a zero point of 0 (use gptq_v2)")
        z = z - 1
    return pack_stream(z, bits, axis=1)


def gptq_unpack_qzeros(qzeros: np.ndarray, bits: int, n: int, v2: bool) -> np.ndarray:
    """qzeros [G, N*bits/32] → true zero points int32 [G, N] (v1 adds the 1 back, as every v1 reader does)."""
    z = unpack_stream(qzeros, bits, n, axis=1).astype(np.int32)
    return z if v2 else z + 1


def gptq_dequantize(
    qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int, v2: bool
) -> np.ndarray:
    """``W[n,k] = scales[g_idx[k], n] * (q[k,n] - Z[g_idx[k], n])`` → float32 [N, K]."""
    g = np.asarray(g_idx).astype(np.int64)
    s = np.asarray(scales, np.float32)
    n = s.shape[1]
    q = gptq_unpack_qweight(qweight, bits, len(g)).astype(np.float32)
    z = gptq_unpack_qzeros(qzeros, bits, n, v2).astype(np.float32)
    return s[g].T * (q - z[g].T)


# ------------------------------------------------------------------------------------------------------------
# AutoAWQ GEMM: 4-bit, packed along N with an interleave, true zeros, no g_idx


def awq_pack(q_kn: np.ndarray) -> np.ndarray:
    """Codes [R, N] (weights [K, N] or zeros [G, N]) → int32 [R, N/8] with the GEMM interleave."""
    q = np.asarray(q_kn)
    if q.shape[1] % 8:
        raise ValueError(f"AWQ GEMM packs 8 columns per word; {q.shape[1]} is not a multiple of 8")
    q = q.reshape(q.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    return pack_stream(q.reshape(q.shape[0], -1), 4, axis=1)


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    """int32 [R, N/8] → codes uint8 [R, N] in natural column order."""
    p = np.asarray(packed)
    q = unpack_stream(p, 4, p.shape[1] * 8, axis=1).reshape(p.shape[0], -1, 8)
    inverse = np.argsort(AWQ_ORDER)  # = [0,4,1,5,2,6,3,7], AutoAWQ's AWQ_REVERSE_ORDER
    return q[:, :, inverse].reshape(p.shape[0], -1)


def awq_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``W[k,n] = (q[k,n] - z[k//g, n]) * s[k//g, n]`` → float32 [N, K] (the Linear orientation)."""
    q = awq_unpack(qweight).astype(np.float32)
    z = awq_unpack(qzeros).astype(np.float32)
    s = np.asarray(scales, np.float32)
    g = q.shape[0] // s.shape[0]
    return ((q - np.repeat(z, g, axis=0)) * np.repeat(s, g, axis=0)).T


# ------------------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized (pack_to_int32: signed codes offset by 2^(b-1), dense stream)


def ct_pack_weight(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [N, K] (= CT's signed code + 2^(bits-1)) → weight_packed int32 [N, ceil(K*bits/32)]."""
    return pack_stream(codes, bits, axis=1)


def ct_unpack_weight(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    return unpack_stream(packed, bits, k, axis=1)


def ct_pack_zero_point(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned zero points [N, G] → weight_zero_point int32 [ceil(N*bits/32), G] (packed along N)."""
    return pack_stream(zeros, bits, axis=0)


def ct_unpack_zero_point(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    return unpack_stream(packed, bits, n, axis=0)


def ct_dequantize(
    weight_packed: np.ndarray,
    weight_scale: np.ndarray,
    weight_shape: np.ndarray,
    bits: int,
    weight_zero_point: np.ndarray | None = None,
    g_idx: np.ndarray | None = None,
) -> np.ndarray:
    """``W[n,k] = scale[n, grp(k)] * (q[n,k] - zp[n, grp(k)])`` → float32 [N, K]; symmetric zp =
    2^(bits-1)."""
    n, k = (int(x) for x in np.asarray(weight_shape))
    s = np.asarray(weight_scale, np.float32)
    q = ct_unpack_weight(weight_packed, bits, k).astype(np.float32)
    if weight_zero_point is None:
        z = np.full(s.shape, 1 << (bits - 1), np.float32)
    else:
        z = ct_unpack_zero_point(weight_zero_point, bits, n).astype(np.float32)
    grp = np.arange(k) // (k // s.shape[1]) if g_idx is None else np.asarray(g_idx).astype(np.int64)
    return s[:, grp] * (q - z[:, grp])
