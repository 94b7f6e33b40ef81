"""Anchor run: llm-compressor's own data-free presets (``oneshot`` + ``QuantizationModifier``): NVFP4A16,
MXFP4A16 (MXFP4 weights, bf16 activations) and W8A8 (int8 per-channel weights; its per-token int8
activations are dynamic, so RTN needs no data).

Runs in the SEPARATE llm-compressor venv (see scripts/llmcompressor_gptq.py for how it is made):

    ~/.cache/qconvert/venv-llmcompressor/bin/python scripts/llmcompressor_fp4.py MODEL -o OUT
        [--scheme NVFP4A16|MXFP4A16|W8A8] [--threads N]

Targets Linear, lm_head ignored, as llm-compressor's examples do (examples/quantization_w4a16_fp4,
quantization_w8a8_int8). Prints one JSON line: wall seconds of ``oneshot`` and of the whole process (model
load and save included), peak RSS, versions. Compare with ours through scripts/compare_fp4.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

T0 = time.monotonic()
PRESETS = ("NVFP4A16", "MXFP4A16", "W8A8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--scheme", default="NVFP4A16", choices=PRESETS)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    t_start = time.monotonic()
    oneshot(model=model, tokenizer=tok, recipe=recipe, output_dir=args.output)
    print(
        json.dumps(
            {
                "llmcompressor": llmcompressor.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "scheme": args.scheme,
                "oneshot_seconds": round(time.monotonic() - t_start, 2),
                "process_seconds": round(time.monotonic() - T0, 2),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
