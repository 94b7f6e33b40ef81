"""Anchor run: llm-compressor's own GPTQ (``oneshot`` + ``GPTQModifier``) on exactly our calibration tokens.

Runs in a SEPARATE venv (llm-compressor pins its own transformers / compressed-tensors), never in qconvert's:

    python3 -m venv ~/.cache/qconvert/venv-llmcompressor
    ~/.cache/qconvert/venv-llmcompressor/bin/pip install torch==2.13.0   # first: the CPU build
    ~/.cache/qconvert/venv-llmcompressor/bin/pip install llmcompressor   # 0.14.0.1 resolved; keeps torch
    ~/.cache/qconvert/venv-llmcompressor/bin/python scripts/llmcompressor_gptq.py MODEL TOKENS.npy -o OUT

TOKENS.npy: int64 [n_samples, seq_len], the chunks ``qconvert quantize`` calibrates on (scripts/bench_gptq.py
writes them). Scheme: int weights, ``--bits`` (4), group ``--group-size`` (64), symmetric, targets Linear,
lm_head ignored, ``dampening_frac`` 0.01, block 128, ``actorder`` None (our default; ``--actorder static`` for
llm-compressor's default). Prints one JSON line: wall seconds, peak RSS, versions. Output: compressed-tensors
pack-quantized, as ``oneshot`` saves it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

T0 = time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("tokens", help=".npy int64 [n_samples, seq_len]")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--actorder", default=None, choices=[None, "static", "group"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import llmcompressor
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = np.load(args.tokens).astype(np.int64)
    n, seq = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        dampening_frac=args.damp,
        block_size=128,
        actorder=args.actorder,
    )
    t_start = time.monotonic()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq,
        shuffle_calibration_samples=False,
        batch_size=1,
        output_dir=args.output,
    )
    print(json.dumps({
        "llmcompressor": llmcompressor.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "samples": n,
        "seq_len": seq,
        "oneshot_seconds": round(time.monotonic() - t_start, 2),
        "process_seconds": round(time.monotonic() - T0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
