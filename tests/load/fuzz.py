"""Seeded mutations of small valid safetensors and GGUF files, for the inspect fuzz harness (issue 20).

`cases(seed, n)` yields (label, suffix, bytes): the label names the mutation so a failure can be rebuilt
from (seed, index) alone. Mutations are structural (a header value replaced by a JSON value of another
type, huge or negative shapes and counts, lone surrogates, deep nesting, lying length fields) and byte-level
(flips, truncation, insertion) so that both the validators and the parsers behind them are reached.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

# JSON values of every type, including ones a header field must never hold
_ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 7, 10**30, -(10**30), 1.5, -0.0, 1e308,
    "", "F32", "BF16", "\ud800", "x" * 300, "é\u202e", [], [1], [[1]], [-1, 4], [2**62, 2**62], [0, 2**63],
    {}, {"a": 1}, {"dtype": "F32"}, [None], ["F32"], [1.5, 2], [[[[[[[[[[[[1]]]]]]]]]]]],
]


def _valid_safetensors() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((4, 8)).astype(np.float32), "b": np.arange(8, dtype=np.int32),
               "h": np.zeros((2, 2), np.float16)}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "note": "fuzz"}}
    pos = 0
    blobs = []
    for name, arr in tensors.items():
        dtype = {np.float32: "F32", np.int32: "I32", np.float16: "F16"}[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        blobs.append(arr.tobytes())
        pos += arr.nbytes
    return {"header": header, "data": b"".join(blobs)}


def _st_bytes(header: Any, data: bytes, raw: bytes | None = None, length: int | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _replace_somewhere(rng: random.Random, obj: Any, value: Any) -> Any:
    """A copy of obj with one randomly chosen node (dict value, list item or key) replaced by value."""
    if isinstance(obj, dict) and obj and rng.random() < 0.85:
        key = rng.choice(list(obj))
        out = dict(obj)
        if rng.random() < 0.1:  # rename the key instead
            out.pop(key)
            out[value if isinstance(value, str) else str(value)] = obj[key]
        else:
            out[key] = _replace_somewhere(rng, obj[key], value)
        return out
    if isinstance(obj, list) and obj and rng.random() < 0.85:
        i = rng.randrange(len(obj))
        return [*obj[:i], _replace_somewhere(rng, obj[i], value), *obj[i + 1:]]
    return value


def _mutate_safetensors(rng: random.Random) -> tuple[str, bytes]:
    base = _valid_safetensors()
    header, data = base["header"], base["data"]
    kind = rng.choices(["value", "shape", "many", "nan", "deep", "length", "bytes", "trunc"],
                       weights=[8, 2, 0.25, 1, 1, 1, 2, 1])[0]
    if kind == "value":
        return kind, _st_bytes(_replace_somewhere(rng, header, rng.choice(_ODD_VALUES)), data)
    if kind == "shape":  # huge shapes: the element count overflows any fixed-width int
        name = rng.choice(["w", "b", "h"])
        dims = [rng.choice([0, 1, 7, 2**31, 2**40, 2**63 - 1, 10**20]) for _ in range(rng.randint(1, 9))]
        header = {**header, name: {**header[name], "shape": dims}}
        return kind, _st_bytes(header, data)
    if kind == "many":  # many entries: validation must stay O(header)
        n = rng.choice([2_000, 20_000])
        extra = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(n)}
        return kind, _st_bytes({**header, **extra}, data)
    if kind == "nan":
        raw = json.dumps(header).replace("8]", rng.choice(["NaN]", "Infinity]", "-Infinity]", "1e999]"]), 1)
        return kind, _st_bytes(None, data, raw=raw.encode())
    if kind == "deep":
        depth = rng.choice([100, 1000, 100_000])
        raw = json.dumps(header)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
        return kind, _st_bytes(None, data, raw=raw.encode())
    blob = bytearray(_st_bytes(header, data))
    if kind == "length":
        struct.pack_into("<Q", blob, 0, rng.choice([0, 1, 7, 9, len(blob), 2**32, 2**63, 2**64 - 1]))
        return kind, bytes(blob)
    if kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        return kind, bytes(blob)
    return kind, bytes(blob[: rng.randrange(len(blob))])


# ---- GGUF, byte by byte: every field is a place to lie ----

_GGUF_U32, _GGUF_F32, _GGUF_STR, _GGUF_ARR, _GGUF_U64 = 4, 6, 8, 9, 10


def _gstr(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return _gstr(key) + struct.pack("<I", vtype) + payload


def _gguf(rng: random.Random, kind: str) -> bytes:
    kvs = [
        _kv(b"general.architecture", _GGUF_STR, _gstr(b"llama")),
        _kv(b"general.alignment", _GGUF_U32, struct.pack("<I", 32)),
        _kv(b"llama.block_count", _GGUF_U32, struct.pack("<I", 1)),
        _kv(b"llama.rope.freq_base", _GGUF_F32, struct.pack("<f", 10000.0)),
        _kv(b"tokenizer.ggml.tokens", _GGUF_ARR, struct.pack("<IQ", _GGUF_STR, 3) + b"".join(
            _gstr(t) for t in (b"a", b"b", b"c"))),
    ]
    tensors = [(b"token_embd.weight", [8, 3], 0, 0), (b"output_norm.weight", [8], 0, 96)]  # F32
    version, n_tensors, n_kv = 3, len(tensors), len(kvs)
    if kind == "kv-float":
        kvs[3] = _kv(b"llama.rope.freq_base", _GGUF_F32, struct.pack("<f", rng.choice(
            [float("nan"), float("inf"), -float("inf")])))
    elif kind == "kv-string":
        s = rng.choice([b"\xff\xfe", b"\xed\xa0\x80", b"x" * 70_000, b"\x00"])
        kvs[0] = _kv(b"general.architecture", _GGUF_STR, _gstr(s))
    elif kind == "key-bytes":
        kvs[2] = _kv(rng.choice([b"\xed\xa0\x80", b"\xff", b""]), _GGUF_U32, struct.pack("<I", 1))
    elif kind == "nested":  # arrays of arrays: a reader must bound nesting and total size
        depth = rng.choice([2, 8, 64])
        payload = struct.pack("<IQ", _GGUF_U32, 2) + struct.pack("<II", 1, 2)
        for _ in range(depth):
            payload = struct.pack("<IQ", _GGUF_ARR, rng.choice([1, 2, 1000])) + payload
        kvs.append(_kv(b"x.nested", _GGUF_ARR, payload))
        n_kv += 1
    elif kind == "array-len":
        element, count = rng.choice([_GGUF_STR, _GGUF_U64, 99]), rng.choice([2**40, 2**63, 5])
        kvs[4] = _kv(b"tokenizer.ggml.tokens", _GGUF_ARR, struct.pack("<IQ", element, count))
    elif kind == "counts":
        n_kv, n_tensors = rng.choice([(2**40, 2), (5, 2**40), (2**63, 2**63), (0, 2)])
    elif kind == "tensor":
        dims = [rng.choice([0, 3, 2**31, 2**40, 2**63 - 1]) for _ in range(rng.randint(0, 6))]
        tensors[0] = (b"token_embd.weight", dims, rng.choice([0, 2, 12, 39, 999]), rng.choice([0, 1, 2**62]))
    elif kind == "version":
        version = rng.choice([0, 1, 2, 4, 2**31])
    body = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs)
    for name, dims, ggml_type, offset in tensors:
        body += _gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        body += struct.pack("<IQ", ggml_type, offset)
    body += b"\x00" * (-len(body) % 32)
    data = np.arange(32, dtype=np.float32).tobytes()  # 24 + 8 floats: both tensors
    return body + data


def _mutate_gguf(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["kv-float", "kv-string", "key-bytes", "nested", "array-len", "counts", "tensor",
                       "version", "bytes", "trunc", "none"])
    if kind in ("bytes", "trunc"):
        blob = bytearray(_gguf(rng, "none"))
        if kind == "trunc":
            return kind, bytes(blob[: rng.randrange(len(blob))])
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        return kind, bytes(blob)
    return kind, _gguf(rng, kind)


def cases(seed: int, n: int) -> Iterator[tuple[str, str, bytes]]:
    """n mutated files, half safetensors and half GGUF, reproducible from (seed, index)."""
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        if i % 2:
            kind, blob = _mutate_gguf(rng)
            yield f"{seed}:{i}:gguf-{kind}", ".gguf", blob
        else:
            kind, blob = _mutate_safetensors(rng)
            yield f"{seed}:{i}:st-{kind}", ".safetensors", blob


def run(seed: int, n: int) -> dict[str, Any]:
    """Run `qconvert inspect --json` on n cases (and plain `inspect` on every fourth) in this process.
    -> {"cases", "runs", "failures": [[label, problem, stderr]], "slowest": [seconds, label],
    "rss_growth_mb": peak RSS over the runs minus the RSS after a warm-up run}."""
    import contextlib
    import io
    import os
    import resource
    import tempfile
    import time
    from pathlib import Path

    from qconvert.cli import main

    def inspect(path: Path, as_json: bool) -> tuple[int, str, str, float]:
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["inspect", str(path), *(["--json"] if as_json else [])])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue(), err.getvalue(), time.perf_counter() - start

    def strict_json(text: str) -> bool:
        def refuse(constant: str) -> None:
            raise ValueError(constant)

        try:
            json.loads(text, parse_constant=refuse)
        except ValueError:
            return False
        return True

    report: dict[str, Any] = {"cases": n, "runs": 0, "failures": [], "slowest": [0.0, ""]}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.safetensors"
        warm.write_bytes(_st_bytes(_valid_safetensors()["header"], _valid_safetensors()["data"]))
        inspect(warm, True)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i, (label, suffix, blob) in enumerate(cases(seed, n)):
            path = Path(tmp) / f"case{suffix}"
            path.write_bytes(blob)
            for as_json in (True, False) if i % 4 == 0 else (True,):
                code, out, err, seconds = inspect(path, as_json)
                report["runs"] += 1
                if seconds > report["slowest"][0]:
                    report["slowest"] = [round(seconds, 3), label]
                lines = err.strip().splitlines()
                problems = [p for p, bad in (
                    (f"exit {code}", code not in (0, 2)),
                    ("more than one line on stderr", len(lines) > 1),
                    ("error line without the prefix", code == 2 and not err.startswith("qconvert: error: ")),
                    ("invalid JSON", as_json and code == 0 and not strict_json(out)),
                    (f"{seconds:.1f} s", seconds > 2.0),
                ) if bad]
                report["failures"] += [[label, p, err.strip()[:200]] for p in problems]
            os.unlink(path)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report["rss_growth_mb"] = round((peak - baseline) / 1024, 1)  # ru_maxrss is in KiB on Linux
    return report


if __name__ == "__main__":  # python tests/load/fuzz.py SEED N: the report as one JSON line
    import sys

    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
