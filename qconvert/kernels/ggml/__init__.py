"""NumPy reference kernels for GGUF block types: the executable spec, byte-identical to llama.cpp's
``ggml_quantize_chunk`` (x86-64 build, no FMA), with and without an importance matrix.

One ``BlockKernel`` subclass per block type (float.py, legacy.py, kquants.py, iq4.py, ...):

    Cls.quantize(x [nrows, n_per_row], imatrix=None) -> uint8 [nrows, row_bytes]
    Cls.dequantize(q [nrows, row_bytes]) -> float32 [nrows, n_per_row], as ggml's to_float

Each is registered once, with its numba twin, in qconvert.kernels.registry; callers use
``qconvert.kernels.quantize`` / ``dequantize`` (``block_type(qtype).reference`` is the class itself).
"""
