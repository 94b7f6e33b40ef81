"""Compare a qconvert output with llm-compressor's for the same preset (scripts/llmcompressor_preset.py):

    python scripts/compare_fp4.py OURS LLMC [--source MODEL]

Prints one JSON object: config.json equal (quantization_config apart from the compressed-tensors version),
tensor names / dtypes / shapes equal, and per tensor kind how many values differ (codes, scales, global
scales). With --source (the unquantized model), every Linear whose codes differ is scored: relative
weight error ||W - deq||/||W|| of ours and of llm-compressor's (dequantized with our reference kernels),
summed over the differing layers. Runs in qconvert's venv (no llm-compressor import).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kernels (a worktree's)


def _config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    return {"rest": cfg, "qc": {k: v for k, v in qc.items() if k != "version"}, "version": qc.get("version")}


def _tensors(path: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = h.get_tensor(name)
    return out


def _raw(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.float8_e4m3fn, torch.bfloat16):
        return t.view(torch.uint8 if t.dtype == torch.float8_e4m3fn else torch.int16).numpy()
    return t.numpy()


def _dense(tensors: dict, prefix: str) -> np.ndarray | None:
    from qconvert.kernels import fp4

    packed = tensors.get(f"{prefix}.weight_packed")
    if packed is not None:
        codes = fp4.unpack_nibbles(packed.numpy())
        sc = tensors[f"{prefix}.weight_scale"]
        gs = tensors.get(f"{prefix}.weight_global_scale")
        if gs is not None:
            return fp4.nvfp4_dequantize(codes, sc.float().numpy(), float(gs.float()[0]))
        return fp4.mxfp4_dequantize(codes, sc.numpy())
    w = tensors.get(f"{prefix}.weight")
    if w is not None and str(w.dtype) == "torch.int8":
        return w.float().numpy() * tensors[f"{prefix}.weight_scale"].float().numpy()
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("llmc", type=Path)
    ap.add_argument("--source", type=Path, help="the unquantized model: score the layers that differ")
    args = ap.parse_args()

    ca, cb = _config(args.ours), _config(args.llmc)
    ta, tb = _tensors(args.ours), _tensors(args.llmc)
    layout_a = {k: (str(v.dtype), tuple(v.shape)) for k, v in ta.items()}
    layout_b = {k: (str(v.dtype), tuple(v.shape)) for k, v in tb.items()}
    diff: dict[str, dict[str, int]] = {}
    layers: set[str] = set()
    for name in sorted(set(ta) & set(tb)):
        if layout_a[name] != layout_b[name]:
            continue
        a, b = _raw(ta[name]), _raw(tb[name])
        kind = name.rpartition(".")[2]
        d = diff.setdefault(kind, {"tensors": 0, "differing_tensors": 0, "values": 0, "differing_values": 0})
        n_diff = int((a != b).sum())
        d["tensors"] += 1
        d["values"] += a.size
        d["differing_values"] += n_diff
        d["differing_tensors"] += bool(n_diff)
        if n_diff and kind in ("weight_packed", "weight_scale", "weight_global_scale", "weight"):
            layers.add(name.rpartition(".")[0])
    report: dict = {
        "config_equal_but_version": ca["rest"] == cb["rest"] and ca["qc"] == cb["qc"],
        "versions": [ca["version"], cb["version"]],
        "names_equal": set(ta) == set(tb),
        "only_ours": sorted(set(ta) - set(tb))[:5], "only_llmc": sorted(set(tb) - set(ta))[:5],
        "dtypes_shapes_equal": layout_a == layout_b,
        "differences": diff,
        "layers_differing": len(layers),
    }
    if args.source and layers:
        src = _tensors(args.source)
        err_a = err_b = norm = 0.0
        wins = 0
        for prefix in sorted(layers):
            w = src[f"{prefix}.weight"].float().numpy()
            da, db = _dense(ta, prefix), _dense(tb, prefix)
            if da is None or db is None:
                continue
            ea, eb = float(np.sum((w - da) ** 2)), float(np.sum((w - db) ** 2))
            err_a, err_b, norm = err_a + ea, err_b + eb, norm + float(np.sum(w**2))
            wins += ea <= eb
        report["differing_layers_rel_error"] = {"ours": (err_a / norm) ** 0.5, "llmc": (err_b / norm) ** 0.5,
                                                "layers_ours_not_worse": wins}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
