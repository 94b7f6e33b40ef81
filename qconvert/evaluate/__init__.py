"""evaluate stage: perplexity (llama-perplexity's method) and KL divergence against a reference.

    from qconvert.evaluate import evaluate, EvalResult
    res = evaluate(model, dataset, reference=None, logits=None, save_logits_to=None, ctx=512, chunks=None,
                   top_k=0, loader="auto", threads=None, progress=...)

Backends (qconvert.evaluate.backends): llama.cpp for .gguf, transformers for HF directories (dense,
compressed-tensors via transformers, GPTQ/AWQ/FP8 unpacked by our kernels: formats.packed.dense_tensors).
"""

from qconvert.evaluate.run import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
