"""Anchor run: one of llm-compressor's own presets (``oneshot`` + ``QuantizationModifier``): FP8_DYNAMIC or
static FP8, or the data-free NVFP4A16, MXFP4A16 (MXFP4 weights, bf16 activations) and W8A8 (int8 per-channel
weights; its per-token int8 activations are dynamic, so RTN needs no data); the calibrated NVFP4 (static
activation global scales) and MXFP4 (dynamic activations: no data); ``--smoothquant ALPHA`` puts
llm-compressor's SmoothQuantModifier (default mappings) before the quantizer, ``--gptq`` uses GPTQModifier
instead of QuantizationModifier, ``--kv-cache fp8`` adds the FP8 per-tensor KV-cache scheme. Calibrated runs
need ``--tokens``.

Runs in the SEPARATE llm-compressor venv (see scripts/llmcompressor_gptq.py for how it is made):

    ~/.cache/qconvert/venv-llmcompressor/bin/python scripts/llmcompressor_preset.py MODEL -o OUT
        [--scheme FP8_DYNAMIC|FP8|NVFP4A16|NVFP4|MXFP4A16|MXFP4|W8A8] [--tokens TOKENS.npy (calibration
        chunks)] [--smoothquant ALPHA] [--gptq] [--kv-cache fp8] [--threads N]

Targets Linear, lm_head ignored, as llm-compressor's examples do (examples/quantization_w8a8_fp8,
quantization_w4a16_fp4, quantization_w8a8_int8). Prints one JSON line: wall seconds of ``oneshot`` and of the
whole process (model load and save included), peak RSS, versions. scripts/compare_fp4.py compares the
data-free outputs with ours.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

T0 = time.monotonic()
PRESETS = ("FP8_DYNAMIC", "FP8", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "W8A8")
# the KV-cache scheme of llm-compressor's examples/quantization_kv_cache
KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--scheme", default="FP8_DYNAMIC", choices=PRESETS)
    ap.add_argument("--tokens", help=".npy int64 [n_samples, seq_len] (FP8, NVFP4, SmoothQuant, GPTQ, KV)")
    ap.add_argument("--smoothquant", type=float, default=None, help="SmoothQuantModifier smoothing_strength")
    ap.add_argument("--gptq", action="store_true", help="GPTQModifier (block 128, damp 0.01) instead of RTN")
    ap.add_argument("--kv-cache", choices=["fp8"], default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    kv = {"kv_cache_scheme": KV_FP8} if args.kv_cache else {}
    if args.gptq:
        quantizer = GPTQModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"], block_size=128,
                                 dampening_frac=0.01, **kv)
    else:
        quantizer = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"], **kv)
    recipe = [quantizer]
    if args.smoothquant is not None:
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=args.smoothquant))
    data: dict = {}
    calibrated = args.scheme in ("FP8", "NVFP4") or args.gptq or args.kv_cache or args.smoothquant is not None
    if calibrated:
        if not args.tokens:
            raise SystemExit(f"--scheme {args.scheme} with these modifiers needs --tokens")
        import numpy as np
        from datasets import Dataset

        ids = np.load(args.tokens).astype(np.int64)
        data = {
            "dataset": Dataset.from_dict(
                {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()}
            ),
            "num_calibration_samples": ids.shape[0],
            "max_seq_length": ids.shape[1],
            "shuffle_calibration_samples": False,
            "batch_size": 1,
        }
    t_start = time.monotonic()
    oneshot(model=model, tokenizer=tok, recipe=recipe, output_dir=args.output, **data)
    print(
        json.dumps(
            {
                "llmcompressor": llmcompressor.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "scheme": args.scheme,
                "smoothquant": args.smoothquant,
                "gptq": args.gptq,
                "kv_cache": args.kv_cache,
                "oneshot_seconds": round(time.monotonic() - t_start, 2),
                "process_seconds": round(time.monotonic() - T0, 2),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
