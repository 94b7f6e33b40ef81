"""kernels stage: the numeric kernels, free of file formats.

GGUF block types (ggml/ the NumPy reference = the spec, ggml_fast/ their numba twins, registry.py the one
table of block types):

    from qconvert.kernels import quantize, dequantize
    q = quantize(x, GGMLQuantizationType.Q4_K, imatrix=None, threads=None)  # uint8 [nrows, row_bytes]
    y = dequantize(q, GGMLQuantizationType.Q4_K)                           # float32 [nrows, n_per_row]

``quantize`` uses the fast twin when the type has one and the reference otherwise (same bytes either way);
``block_type(qtype).reference`` is the spec on its own. F32/F16/BF16 are block types too (ggml/float.py).

Adding a GGUF block type (e.g. IQ2_XXS) touches exactly these files:

1. ``ggml/<family>.py``: the reference, a ``BlockKernel`` subclass with ``qtype = T.IQ2_XXS`` and the
   classmethods ``quantize_rows(x [nrows, n_per_row], qw [n_per_row] | None) -> uint8`` and
   ``dequantize_blocks(b [nblocks, type_size]) -> float32 [nblocks, block_size]`` (block and type sizes
   come from gguf-py's GGML_QUANT_SIZES). Port ggml-quants.c in its float32 operation order (helpers.py).
2. ``ggml_fast/_<family>.py`` (optional, when the reference is too slow for whole models): a twin with the
   calling convention of ggml_fast (``twin(blocks, qw, nbr, out, use_qw)``, see its docstring).
3. One line in ``registry.py``'s BLOCK_TYPES: ``BlockType(<family>.IQ2_XXS, _<family>.iq2_xxs)`` (or
   ``BlockType(<family>.IQ2_XXS)`` without a twin). From then on ``--tensor-type`` /
   ``--output-tensor-type`` accept it, the mixture rules treat it as quantized and ``quantize`` uses it.
4. Tests: ``tests/kernels/test_ggml_<family>.py`` against llama.cpp (tests/oracle: ggml_quantize_chunk,
   ggml_dequantize) and gguf-py, and the type added to EXPECTED in tests/kernels/test_ggml_reference.py;
   the generic tests (test_ggml_reference.py, test_ggml_fast.py) then run on it as well.

A new llama-quantize file type (``--type IQ2_XXS``) is a mixture rule, not a block type: its line is in
formats/gguf/mixture.py's _FILE_TYPES.

Also here: fp8.py (E4M3/E5M2 codes, E4M3_MAX), fp4.py (E2M1 element codes: ggml's and compressed-tensors'
rounding, shared by the GGUF MXFP4/NVFP4 blocks and the packed FP4 schemes; and the numpy spec of
compressed-tensors' NVFP4 / MXFP4 weights: scales, codes, nibble packing), packing.py (integer code packing
for the packed formats).
"""

from typing import Any

__all__ = [
    "BLOCK_TYPES",
    "FAST_TYPES",
    "FLOAT_TYPES",
    "QUANTIZED_TYPES",
    "BlockType",
    "block_type",
    "dequantize",
    "quantize",
]


def __getattr__(name: str) -> Any:
    """The registry on first use: importing kernels.packing (the packed formats, inspect) or the CLI must not
    pay for the GGML kernels and numba."""
    if name in __all__:
        from qconvert.kernels import registry

        return getattr(registry, name)
    raise AttributeError(name)
