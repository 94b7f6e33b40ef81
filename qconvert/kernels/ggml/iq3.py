"""IQ3_XXS (3.0625 bpw) and IQ3_S (3.4375 bpw): 4-weight groups on a 256- / 512-point lattice grid.

Ports of ``quantize_row_iq3_xxs_impl(256, ...)`` (ggml-quants.c:3938) and ``quantize_row_iq3_s_impl(32, ...)``
(:4169) as ``quantize_iq3_xxs`` / ``quantize_iq3_s`` call them, with or without an imatrix
(reference/gguf-lowbit.md §1.4-1.5, §2, §3.4-3.5). Lanes are 32-weight sub-blocks. The shared grid
machinery (tables, signs, the scale search) is in grids.py.
"""

from __future__ import annotations

import functools

import numpy as np
from gguf import GGMLQuantizationType as T

from .grids import GridTables, Search, grid_index, ksigns, scale_search, signs_free, signs_parity
from .helpers import F32, QK_K, BlockKernel, block_sumx2, fp16_bytes, lanes, nearest_int, read_fp16

# The quantizer-side grids, literal data of ggml-quants.c: kgrid_256 (:3708, IQ3_XXS) and kgrid_512 (:3726,
# IQ3_S) in iq3xs_init_impl. Entry k packs the level (0..7) of coordinate i at bits 3i..3i+2. They are a
# chosen subset of the 8^4 points with no generating rule; tests hold them to ggml's own dequant tables.
KGRID_256 = np.array([
       0,    2,    4,    9,   11,   15,   16,   18,   25,   34,   59,   61,   65,   67,   72,   74,
      81,   85,   88,   90,   97,  108,  120,  128,  130,  132,  137,  144,  146,  153,  155,  159,
     169,  175,  189,  193,  199,  200,  202,  213,  248,  267,  287,  292,  303,  315,  317,  321,
     327,  346,  362,  413,  436,  456,  460,  462,  483,  497,  513,  515,  520,  522,  529,  531,
     536,  538,  540,  551,  552,  576,  578,  585,  592,  594,  641,  643,  648,  650,  657,  664,
     698,  704,  706,  720,  729,  742,  758,  769,  773,  808,  848,  852,  870,  889,  901,  978,
     992, 1024, 1026, 1033, 1035, 1040, 1042, 1046, 1049, 1058, 1089, 1091, 1093, 1096, 1098, 1105,
    1112, 1139, 1143, 1144, 1152, 1154, 1161, 1167, 1168, 1170, 1183, 1184, 1197, 1217, 1224, 1228,
    1272, 1276, 1309, 1323, 1347, 1367, 1377, 1404, 1473, 1475, 1486, 1509, 1537, 1544, 1546, 1553,
    1555, 1576, 1589, 1594, 1600, 1602, 1616, 1625, 1636, 1638, 1665, 1667, 1672, 1685, 1706, 1722,
    1737, 1755, 1816, 1831, 1850, 1856, 1862, 1874, 1901, 1932, 1950, 1971, 2011, 2032, 2052, 2063,
    2077, 2079, 2091, 2095, 2172, 2192, 2207, 2208, 2224, 2230, 2247, 2277, 2308, 2345, 2356, 2389,
    2403, 2424, 2501, 2504, 2506, 2520, 2570, 2593, 2616, 2624, 2630, 2646, 2669, 2700, 2714, 2746,
    2754, 2795, 2824, 2835, 2839, 2874, 2882, 2905, 2984, 3028, 3042, 3092, 3108, 3110, 3124, 3153,
    3185, 3215, 3252, 3288, 3294, 3364, 3397, 3434, 3483, 3523, 3537, 3587, 3589, 3591, 3592, 3610,
    3626, 3670, 3680, 3722, 3749, 3754, 3776, 3789, 3803, 3824, 3857, 3873, 3904, 3906, 3924, 3992,
], dtype=np.uint16)  # fmt: skip

KGRID_512 = np.array([
       0,    1,    2,    5,    7,    8,    9,   10,   12,   14,   16,   17,   21,   27,   32,   34,
      37,   39,   41,   43,   48,   50,   57,   60,   63,   64,   65,   66,   68,   72,   73,   77,
      80,   83,   87,   89,   93,  100,  113,  117,  122,  128,  129,  133,  135,  136,  139,  142,
     145,  149,  152,  156,  162,  165,  167,  169,  171,  184,  187,  195,  201,  205,  208,  210,
     217,  219,  222,  228,  232,  234,  247,  249,  253,  256,  267,  271,  273,  276,  282,  288,
     291,  297,  312,  322,  324,  336,  338,  342,  347,  353,  357,  359,  374,  379,  390,  393,
     395,  409,  426,  441,  448,  450,  452,  464,  466,  470,  475,  488,  492,  512,  513,  514,
     516,  520,  521,  523,  525,  527,  528,  530,  537,  540,  542,  556,  558,  561,  570,  576,
     577,  579,  582,  584,  588,  593,  600,  603,  609,  616,  618,  632,  638,  640,  650,  653,
     655,  656,  660,  666,  672,  675,  685,  688,  698,  705,  708,  711,  712,  715,  721,  727,
     728,  732,  737,  754,  760,  771,  773,  778,  780,  793,  795,  802,  806,  808,  812,  833,
     840,  843,  849,  856,  858,  873,  912,  916,  919,  932,  934,  961,  963,  968,  970,  977,
     989,  993, 1010, 1016, 1024, 1025, 1027, 1029, 1031, 1032, 1034, 1036, 1038, 1041, 1043, 1047,
    1048, 1050, 1057, 1059, 1061, 1064, 1066, 1079, 1080, 1083, 1085, 1088, 1090, 1096, 1099, 1103,
    1106, 1109, 1113, 1116, 1122, 1129, 1153, 1156, 1159, 1169, 1171, 1176, 1183, 1185, 1195, 1199,
    1209, 1212, 1216, 1218, 1221, 1225, 1234, 1236, 1241, 1243, 1250, 1256, 1270, 1281, 1287, 1296,
    1299, 1306, 1309, 1313, 1338, 1341, 1348, 1353, 1362, 1375, 1376, 1387, 1400, 1408, 1410, 1415,
    1425, 1453, 1457, 1477, 1481, 1494, 1496, 1507, 1512, 1538, 1545, 1547, 1549, 1551, 1554, 1561,
    1563, 1565, 1570, 1572, 1575, 1577, 1587, 1593, 1601, 1603, 1605, 1612, 1617, 1619, 1632, 1648,
    1658, 1662, 1664, 1674, 1680, 1690, 1692, 1704, 1729, 1736, 1740, 1745, 1747, 1751, 1752, 1761,
    1763, 1767, 1773, 1787, 1795, 1801, 1806, 1810, 1817, 1834, 1840, 1844, 1857, 1864, 1866, 1877,
    1882, 1892, 1902, 1915, 1934, 1953, 1985, 1987, 2000, 2002, 2013, 2048, 2052, 2058, 2064, 2068,
    2071, 2074, 2081, 2088, 2104, 2114, 2119, 2121, 2123, 2130, 2136, 2141, 2147, 2153, 2157, 2177,
    2179, 2184, 2189, 2193, 2203, 2208, 2223, 2226, 2232, 2244, 2249, 2251, 2256, 2258, 2265, 2269,
    2304, 2306, 2324, 2335, 2336, 2361, 2373, 2375, 2385, 2418, 2443, 2460, 2480, 2504, 2509, 2520,
    2531, 2537, 2562, 2568, 2572, 2578, 2592, 2596, 2599, 2602, 2614, 2620, 2625, 2627, 2629, 2634,
    2641, 2650, 2682, 2688, 2697, 2707, 2712, 2718, 2731, 2754, 2759, 2760, 2775, 2788, 2793, 2805,
    2811, 2817, 2820, 2832, 2842, 2854, 2890, 2902, 2921, 2923, 2978, 3010, 3012, 3026, 3081, 3083,
    3085, 3097, 3099, 3120, 3136, 3152, 3159, 3188, 3210, 3228, 3234, 3245, 3250, 3256, 3264, 3276,
    3281, 3296, 3349, 3363, 3378, 3392, 3395, 3420, 3440, 3461, 3488, 3529, 3531, 3584, 3588, 3591,
    3600, 3602, 3614, 3616, 3628, 3634, 3650, 3657, 3668, 3683, 3685, 3713, 3716, 3720, 3726, 3729,
    3736, 3753, 3778, 3802, 3805, 3819, 3841, 3845, 3851, 3856, 3880, 3922, 3938, 3970, 3993, 4032,
], dtype=np.uint16)  # fmt: skip

# ggml-common.h's dequant grids (iq3xxs_grid :1017, iq3s_grid :1052) hold, in byte i of entry k, this
# magnitude of level l_i(k) of the same entry of the quantizer grid (reference §2.1; tests check it on ggml).
XXS_MAGNITUDE = np.array([4, 12, 20, 28, 36, 44, 52, 62], dtype=F32)
S_MAGNITUDE = np.array([1, 3, 5, 7, 9, 11, 13, 15], dtype=F32)

KMAP_SIZE = 4096  # every 12-bit key: with kMaxQ = 8 all of them are reachable
EPS_XXS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
FUDGE_XXS = F32(1.0125)
FUDGE_S = F32(1.033)
KSIGNS = ksigns()


@functools.cache
def tables(grid_size: int) -> GridTables:
    """The tables iq3xs_init_impl(grid_size) builds: nwant = 2 distinct distances for 256, 3 for 512."""
    kgrid = KGRID_256 if grid_size == 256 else KGRID_512
    return GridTables.build(kgrid, ncoord=4, bits=3, kmap_size=KMAP_SIZE, nwant=2 if grid_size == 256 else 3)


@functools.cache
def search(qtype: T) -> Search:
    """The §2.6 constants: IQ3_XXS 31 trials, flags start true, only off-grid groups refit; IQ3_S 19 trials,
    flags start false and every group is refit when any is off the grid (the skip is commented out, :4283)."""
    if qtype == T.IQ3_XXS:
        return Search("IQ3_XXS", tables(256), group=4, kmaxq=8, c=15, step=0.2, trials=range(-15, 16),
                      flags_start=True, refit="offgrid")
    return Search("IQ3_S", tables(512), group=4, kmaxq=8, c=15, step=0.2, trials=range(-9, 10),
                  flags_start=False, refit="all_if_offgrid")


def _weights(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, weight) in lanes of 32: x*x without an imatrix, else qw*sqrt(sigma2 + x*x), sigma2 = 2*Σx²/256."""
    xs = lanes(x, 32)
    if qw is None:
        return xs, xs * xs
    sigma2 = (F32(2) * block_sumx2(x)) / F32(QK_K)
    sig = np.repeat(sigma2, QK_K // 32)
    return xs, lanes(np.broadcast_to(qw, x.shape), 32) * np.sqrt(sig + xs * xs)


def _first_max(xval: np.ndarray) -> np.ndarray:
    """``max = xval[0]; max = MAX(max, xval[i])`` with ggml's macro."""
    m = xval[0].copy()
    for row in xval[1:]:
        m = np.where(m > row, m, row)
    return m


def _macro_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; m = MAX(m, v[i])`` over axis 0."""
    m = np.zeros(v.shape[1:], dtype=F32)
    for row in v:
        m = np.where(m > row, m, row)
    return m


def _subblocks(qtype: T, x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Search every 32-weight sub-block: (scale [8, nb], grid indices [8 groups, 8, nb], signs [4, 8, nb],
    live [8, nb] = the sub-block was not skipped as zero)."""
    nb = x.size // QK_K
    xs, weight = _weights(x, qw)
    if qtype == T.IQ3_XXS:
        xval, signs = signs_parity(xs, weight)
        mx = _first_max(xval)
        live = ~(mx < EPS_XXS)
        mask = 127
    else:
        xval, signs = signs_free(xs)
        mx = _first_max(xval)
        live = mx != 0
        mask = 255
    den = np.where(live, mx, F32(1))  # skipped sub-blocks are searched on harmless values, then dropped
    s = search(qtype)
    scale, L = scale_search(s, xval, weight, den, den / F32(15))
    flip = live & (scale < 0)  # "should never happen", but can with an imatrix: the signs are complemented
    scale = np.where(flip, -scale, scale)
    signs = np.where(flip, ~signs & mask, signs)
    scale = np.where(live, scale, F32(0))
    idx = np.where(live, grid_index(s.tables, np.where(live, L, 0), 4), 0)
    signs = np.where(live, signs, 0)
    return (scale.reshape(8, nb, order="F"), idx.reshape(8, 8, nb, order="F"),
            signs.reshape(4, 8, nb, order="F"), live.reshape(8, nb, order="F"))


def _super_scale(scale: np.ndarray, fudge: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max_scale [nb], stored fp16 bytes [nb, 2], 4-bit sub-scales ls [8, nb]); id is 1/d of the
    unfudged d."""
    max_scale = _macro_max(scale)
    d = max_scale / F32(31)
    stored = np.where(max_scale != 0, d * fudge, F32(0))
    inv = F32(1) / d
    ls = np.clip(nearest_int(F32(0.5) * ((inv * scale) - F32(1))), 0, 15)
    return max_scale, fp16_bytes(stored), np.where(max_scale != 0, ls, 0)


def _sign_factors(runs: np.ndarray) -> np.ndarray:
    """Sign bytes [n, 32] (bit j = weight 8r+j of run r) -> ±1 float32 [n, 256]."""
    neg = (runs[:, :, None] >> np.arange(8)) & 1
    return np.where(neg.reshape(runs.shape[0], -1) != 0, F32(-1), F32(1))


class IQ3_XXS(BlockKernel):
    qtype = T.IQ3_XXS

    @classmethod
    def quantize_rows(cls, x, qw):
        scale, idx, signs, _ = _subblocks(T.IQ3_XXS, x, qw)
        max_scale, d, ls = _super_scale(scale, FUDGE_XXS)
        words = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21) | (ls << 28)
        keep = max_scale != 0  # all scales zero: ggml clears every data byte
        qs = np.where(keep, idx, 0).transpose(2, 1, 0).reshape(-1, 64)  # byte 8ib+k
        words = np.ascontiguousarray(np.where(keep, words, 0).T.astype("<u4"))
        return np.concatenate([d, qs.astype(np.uint8), words.view(np.uint8).reshape(-1, 32)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        qs = b[:, 2:66].astype(np.int64)
        words = np.ascontiguousarray(b[:, 66:98]).view("<u4").astype(np.int64)  # [n, 8]
        db = np.repeat((d * (F32(0.5) + (words >> 28).astype(F32))) * F32(0.5), 32, axis=1)
        grid = XXS_MAGNITUDE[tables(256).levels[qs]].reshape(-1, QK_K)  # group g = weights 4g..4g+3
        runs = KSIGNS[(words[:, :, None] >> (7 * np.arange(4))) & 127].reshape(-1, 32).astype(np.int64)
        return (db * grid) * _sign_factors(runs)


class IQ3_S(BlockKernel):
    qtype = T.IQ3_S

    @classmethod
    def quantize_rows(cls, x, qw):
        scale, idx, signs, live = _subblocks(T.IQ3_S, x, qw)
        nb = scale.shape[1]
        _, d, ls = _super_scale(scale, FUDGE_S)
        # qs and signs are written through pointers that skip exactly-zero sub-blocks (reference §3.5): the
        # data of sub-block ib lands in slot p = number of live sub-blocks before it; qh, scales stay at ib.
        # With every scale zero ggml leaves what was written (only d and the scales stay 0).
        slot = np.cumsum(live, axis=0) - live
        qs = np.zeros((nb, 8, 8), dtype=np.int64)
        sg = np.zeros((nb, 8, 4), dtype=np.int64)
        blk, ib = np.nonzero(live.T)
        p = slot[ib, blk]
        qs[blk, p] = (idx[:, ib, blk] & 255).T
        sg[blk, p] = signs[:, ib, blk].T
        qh = ((idx >> 8) << np.arange(8)[:, None, None]).sum(axis=0).T  # [nb, ib]: bit k = group k
        sc = (ls[0::2] | (ls[1::2] << 4)).T
        parts = [qs.reshape(nb, 64), qh, sg.reshape(nb, 32), sc]
        return np.concatenate([d] + [part.astype(np.uint8) for part in parts], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        qs = b[:, 2:66].astype(np.int64)
        qh = b[:, 66:74].astype(np.int64)
        sc = b[:, 106:110].astype(np.int64)
        ls = (sc[:, np.arange(8) // 2] >> (4 * (np.arange(8) % 2))) & 0xF
        db = np.repeat(d * (1 + 2 * ls).astype(F32), 32, axis=1)
        hi = (qh[:, np.arange(64) // 8] >> (np.arange(64) % 8)) & 1
        grid = S_MAGNITUDE[tables(512).levels[qs | (hi << 8)]].reshape(-1, QK_K)
        return (db * grid) * _sign_factors(b[:, 74:106].astype(np.int64))
