"""Integer packing kernels against independent oracles: the checkpoint-formats.md Appendix A formulas,
compressed-tensors' own pack_to_int32 / unpack_from_int32, and the documented 3-bit and qzeros words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from qconvert.kernels import packing

RNG = np.random.default_rng(1234)


def codes(shape, bits):
    return RNG.integers(0, 1 << bits, size=shape).astype(np.uint8)


def u32(x) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in np.asarray(x).ravel()]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 64, 96, 40, 7])
def test_stream_roundtrip_both_axes(bits, n):
    q = codes((n, 5), bits)
    for axis, arr in ((0, q), (1, q.T)):
        words = packing.pack_stream(arr, bits, axis=axis)
        assert words.dtype == np.int32
        assert words.shape[axis] == packing.packed_len(n, bits)
        np.testing.assert_array_equal(packing.unpack_stream(words, bits, n, axis=axis), arr)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_qweight_matches_appendix_a(bits):
    n, k = 24, 128
    q = codes((n, k), bits)
    pf = 32 // bits
    qt = torch.from_numpy(q.T.astype(np.int64)).reshape(k // pf, pf, n)
    sh = (torch.arange(pf) * bits).view(1, pf, 1)
    expected = ((qt << sh).sum(1) & 0xFFFFFFFF).numpy()
    got = packing.gptq_pack_qweight(q, bits)
    assert got.shape == (k * bits // 32, n)
    assert u32(got) == [int(v) for v in expected.ravel()]
    np.testing.assert_array_equal(packing.gptq_unpack_qweight(got, bits, k), q)


def test_three_bit_stream_layout_of_section_1_2():
    v = codes((32, 1), 3)[:, 0].astype(np.int64)
    w0, w1, w2 = u32(packing.pack_stream(v[:, None], 3, axis=0))
    assert all((w0 >> (3 * i)) & 7 == v[i] for i in range(10))
    assert (w0 >> 30) & 3 == v[10] & 3 and w1 & 1 == v[10] >> 2
    assert all((w1 >> (3 * (i - 11) + 1)) & 7 == v[i] for i in range(11, 21))
    assert (w1 >> 31) & 1 == v[21] & 1 and w2 & 3 == v[21] >> 1
    assert all((w2 >> (3 * (i - 22) + 2)) & 7 == v[i] for i in range(22, 32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [64, 96, 50])
def test_ct_weight_matches_compressed_tensors(bits, k):
    q = codes((16, k), bits)
    signed = torch.from_numpy(q.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    ours = packing.ct_pack_weight(q, bits)
    theirs = pack_to_int32(signed, bits).numpy()
    np.testing.assert_array_equal(ours, theirs)
    back = unpack_from_int32(torch.from_numpy(ours), bits, torch.Size([16, k])).numpy()
    np.testing.assert_array_equal(back.astype(np.int16) + (1 << (bits - 1)), q)
    np.testing.assert_array_equal(packing.ct_unpack_weight(theirs, bits, k), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ct_zero_point_packed_along_rows(bits):
    z = codes((40, 3), bits)
    signed = torch.from_numpy(z.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    ours = packing.ct_pack_zero_point(z, bits)
    np.testing.assert_array_equal(ours, pack_to_int32(signed, bits, packed_dim=0).numpy())
    np.testing.assert_array_equal(packing.ct_unpack_zero_point(ours, bits, 40), z)


def test_three_bit_gptq_equals_ct_stream():
    q = codes((8, 64), 3)  # [N, K]
    np.testing.assert_array_equal(packing.gptq_pack_qweight(q, 3), packing.ct_pack_weight(q, 3).T)


SYM_WORDS = {  # §1.3 table: symmetric zero 2^(b-1), stored v1 (zero-1) and v2
    2: ([0x55555555], [0xAAAAAAAA]),
    3: ([0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], [0x24924924, 0x49249249, 0x92492492]),
    4: ([0x77777777], [0x88888888]),
    8: ([0x7F7F7F7F], [0x80808080]),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_qzeros_words(bits):
    z = np.full((1, 32), 1 << (bits - 1))
    v1 = packing.gptq_pack_qzeros(z, bits, v2=False)
    v2 = packing.gptq_pack_qzeros(z, bits, v2=True)
    pf_words = bits  # 32 columns take `bits` words
    assert u32(v1) == (SYM_WORDS[bits][0] * pf_words)[:pf_words]
    assert u32(v2) == (SYM_WORDS[bits][1] * pf_words)[:pf_words]
    np.testing.assert_array_equal(packing.gptq_unpack_qzeros(v1, bits, 32, v2=False), z)
    np.testing.assert_array_equal(packing.gptq_unpack_qzeros(v2, bits, 32, v2=True), z)


def test_v1_refuses_zero_point_zero():
    with pytest.raises(ValueError, match="v1"):
        packing.gptq_pack_qzeros(np.zeros((1, 8)), 4, v2=False)


def awq_oracle(q: np.ndarray) -> np.ndarray:
    """checkpoint-formats.md Appendix A awq_gemm_pack, verbatim in spirit (loop form)."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((q.shape[0], q.shape[1] // 8), np.int64)
    for c in range(q.shape[1] // 8):
        for i in range(8):
            out[:, c] |= q[:, 8 * c + order[i]].astype(np.int64) << (4 * i)
    return out


def test_awq_interleave():
    q = codes((12, 64), 4)
    ours = packing.awq_pack(q)
    assert u32(ours) == [int(v) for v in awq_oracle(q).ravel()]
    np.testing.assert_array_equal(packing.awq_unpack(ours), q)
    # unpack = sequential nibbles reordered with AutoAWQ's AWQ_REVERSE_ORDER
    nib = packing.unpack_stream(ours, 4, 64, axis=1).reshape(12, 8, 8)
    np.testing.assert_array_equal(nib[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(12, 64), q)


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_stream(np.array([[16]]), 4)
