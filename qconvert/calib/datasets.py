"""Calibration data: text sources -> token chunks [n_samples, seq_len] with the checkpoint's own tokenizer.

Sources (`--dataset`):
  FILE.txt                    the whole text, tokenized once and cut into seq_len chunks (as llama-imatrix)
  FILE.jsonl / FILE.parquet   one record per line / row; the text is `--text-field` (default "text"), or a
                              chat ("messages"/"conversations": [{role, content}, ...]) rendered with the
                              chat template
  hf:NAME[:CONFIG][:SPLIT]    a dataset through the `datasets` library (works offline from its cache)

Records are shuffled with `--seed`, tokenized one by one and joined with the EOS token (as documents are in
pre-training), until enough tokens are collected. Chunking follows llama-imatrix: if the tokenizer adds BOS,
the stream starts with BOS and the first token of every chunk is replaced by BOS.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import BadInput, IOFailure
from qconvert.load.quiet import one_line, quiet_transformers

CHAT_FIELDS = ("messages", "conversations")


@dataclass
class CalibData:
    tokens: torch.Tensor  # int64 [n_samples, seq_len]
    description: str  # the --dataset string as given (goes into file metadata)
    available_tokens: int  # tokens the source produced (a stream may stop early once enough were read)
    add_bos: bool

    @property
    def num_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def load_tokenizer(ckpt):
    """The checkpoint's own tokenizer (transformers AutoTokenizer over the checkpoint directory)."""
    from transformers import AutoTokenizer

    if not ckpt.tokenizer_files:
        raise BadInput("checkpoint has no tokenizer files (tokenizer.json or tokenizer.model)", ckpt.path)
    try:
        with quiet_transformers():  # "You are using a model of type ..." for families transformers lacks
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    except OSError as e:
        raise IOFailure(f"cannot read the tokenizer: {one_line(e)}", ckpt.path) from e
    except Exception as e:  # transformers raises ValueError/KeyError/... for unusable tokenizer files
        raise BadInput(f"cannot load the tokenizer: {one_line(e)}", ckpt.path) from e
    # texts are tokenized whole and cut into chunks by us: no "longer than the model maximum" warning
    tokenizer.model_max_length = 1 << 62
    # transformers builds an empty tokenizer from tokenizer_config.json alone (no tokenizer.json, or one
    # without a vocabulary); the text would then "tokenize to 0 tokens" and the dataset would get the blame
    if not encode(tokenizer, "The quick brown fox jumps over the lazy dog."):
        raise BadInput(f"the tokenizer turns text into no tokens ({len(tokenizer)} in its vocabulary): "
                       "tokenizer.json is missing or has no vocabulary", ckpt.path)
    return tokenizer


def adds_bos(tokenizer) -> bool:
    """Whether the model expects BOS in front of a text: what the tokenizer does with special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if isinstance(flag, bool):
        return flag
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode(tokenizer, text: str, parse_special: bool = False) -> list[int]:
    """Token ids without special tokens. Like llama.cpp, special-token text is split unless parse_special."""
    if not text:
        return []
    try:
        return list(
            tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]
        )
    except TypeError:  # tokenizers without split_special_tokens
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_calibration(
    source: str,
    tokenizer,
    *,
    seq_len: int,
    num_samples: int | None,
    seed: int = 0,
    text_field: str | None = None,
    parse_special: bool = False,
    min_tokens: int | None = None,
    shuffle_chunks: bool = True,
    skip_chunks: int = 0,
) -> CalibData:
    """Tokenize `source` and cut it into `num_samples` chunks of `seq_len` tokens (None = every full chunk).

    `min_tokens` (default num_samples*seq_len, or one chunk) is the least the source must yield; fewer is a
    BadInput saying how many tokens are needed. With shuffle_chunks, a .txt longer than needed contributes a
    seeded random subset of its chunks (kept in text order); llama-imatrix semantics use shuffle_chunks=False.
    `skip_chunks` drops that many leading chunks first (llama-imatrix --chunk).
    """
    if seq_len < 1:
        raise BadInput(f"--seq-len must be positive, got {seq_len}")
    if num_samples is not None and num_samples < 1:
        raise BadInput(f"--num-samples must be positive, got {num_samples}")
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    want = None if num_samples is None else num_samples * seq_len
    if _is_plain_text(source):
        ids = _read_txt_tokens(source, tokenizer, parse_special)
        stream = ([bos] if bos is not None else []) + ids
    else:
        stream = _record_stream(
            source,
            tokenizer,
            seed,
            text_field,
            parse_special,
            bos,
            None if want is None else want + skip_chunks * seq_len,
        )
    if skip_chunks > 0:
        if (skip_chunks + 2) * seq_len >= len(stream):
            raise BadInput(
                f"not enough tokens left after skipping {skip_chunks} chunks ({len(stream)} tokens in all)",
                _display_path(source),
            )
        stream = stream[skip_chunks * seq_len :]
    need = min_tokens if min_tokens is not None else (want or seq_len)
    if len(stream) < need:
        empty = len(stream) <= (bos is not None)  # nothing but the BOS we put in front
        what = "is empty" if empty else f"tokenizes to only {len(stream)} tokens"
        raise BadInput(
            f"calibration data {what}; at least {need} tokens are needed "
            f"({_need_why(num_samples, seq_len, need)}): give more text or lower --num-samples/--seq-len",
            _display_path(source),
        )
    n_avail = len(stream) // seq_len
    n = n_avail if num_samples is None else min(num_samples, n_avail)
    picks = list(range(n))
    if shuffle_chunks and n < n_avail:
        picks = sorted(random.Random(seed).sample(range(n_avail), n))
    chunks = torch.tensor([stream[i * seq_len : (i + 1) * seq_len] for i in picks], dtype=torch.int64)
    if bos is not None:
        chunks[:, 0] = bos
    return CalibData(chunks.reshape(n, seq_len), source, len(stream), bos is not None)


def _need_why(num_samples: int | None, seq_len: int, need: int) -> str:
    if num_samples is not None and need == num_samples * seq_len:
        return f"{num_samples} samples x {seq_len} tokens"
    return f"{need // seq_len} chunks of {seq_len} tokens"


def _is_plain_text(source: str) -> bool:
    return not source.startswith("hf:") and Path(source).suffix.lower() not in (".jsonl", ".json", ".parquet")


def _display_path(source: str) -> str:
    return source


def read_text(path: str | Path) -> str:
    """A prompt/text file as llama.cpp's -f reads it: UTF-8, minus one trailing newline."""
    p = Path(path)
    if not p.exists():
        raise BadInput("dataset file not found (expected .txt, .jsonl, .parquet or hf:NAME)", p)
    if p.is_dir():
        raise BadInput("is a directory, expected a text file", p)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"not UTF-8 text (byte {e.start})", p) from None
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", p) from None
    return text[:-1] if text.endswith("\n") else text


def _read_txt_tokens(source: str, tokenizer, parse_special: bool) -> list[int]:
    text = read_text(source)
    return encode(tokenizer, text, parse_special)


def _record_stream(source, tokenizer, seed, text_field, parse_special, bos, want) -> list[int]:
    records = _load_records(source)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream: list[int] = [bos] if bos is not None else []
    field = None
    for i in order:
        rec = records[i]
        field = field or _pick_field(source, rec, text_field)
        text, is_chat = _record_text(source, rec, field, tokenizer)
        ids = encode(
            tokenizer, text, parse_special or is_chat
        )  # a rendered chat's markers are special tokens
        if not ids:
            continue
        if len(stream) > (bos is not None) and eos is not None:
            stream.append(eos)
        stream.extend(ids)
        if want is not None and len(stream) >= want:
            break
    return stream


def _load_records(source: str):
    """A sequence of dict-like records (a list, or a `datasets.Dataset` for hf:)."""
    if source.startswith("hf:"):
        return _load_hf(source)
    path = Path(source)
    if not path.exists():
        raise BadInput("dataset file not found", path)
    if path.suffix.lower() == ".parquet":
        return _load_parquet(path)
    return list(_iter_jsonl(path))


def _iter_jsonl(path: Path) -> Iterator[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadInput(f"not UTF-8 text (byte {e.start})", path) from e
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path) from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"line {n}: not valid JSON ({e.msg})", path) from e
        if not isinstance(rec, dict):
            raise BadInput(f"line {n}: expected a JSON object per line", path)
        yield rec


def _load_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError as e:
        raise BadInput("reading .parquet needs pyarrow (pip install pyarrow)", path) from e
    except OSError as e:
        raise IOFailure(f"cannot read parquet: {e}", path) from e
    except Exception as e:  # pyarrow.ArrowInvalid for files that are not parquet
        raise BadInput(f"not a readable parquet file ({e})", path) from e


def _load_hf(source: str):
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise BadInput(f"expected hf:NAME[:CONFIG][:SPLIT], got '{source}'")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError as e:
        raise BadInput("hf: datasets need the 'datasets' package (pip install datasets)") from e
    try:
        return datasets.load_dataset(name, config, split=split)
    except (
        Exception
    ) as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ValueError...)
        raise BadInput(
            f"cannot load dataset '{source}': {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from e


def _pick_field(source: str, rec: dict, text_field: str | None) -> str:
    if text_field is not None:
        if text_field not in rec:
            raise BadInput(
                f"records have no field '{text_field}' (fields: {', '.join(map(str, rec)) or 'none'})",
                _display_path(source),
            )
        return text_field
    for f in ("text", *CHAT_FIELDS):
        if f in rec:
            return f
    raise BadInput(
        f"records have no 'text' field (fields: {', '.join(map(str, rec)) or 'none'}); "
        "choose one with --text-field",
        _display_path(source),
    )


def _record_text(source: str, rec: dict, field: str, tokenizer) -> tuple[str, bool]:
    """(text, rendered_from_chat)."""
    value = rec.get(field)
    if value is None:
        return "", False
    if isinstance(value, str):
        return value, False
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return _render_chat(source, value, tokenizer), True
    raise BadInput(f"field '{field}' is neither text nor a list of chat messages", _display_path(source))


def _render_chat(source: str, messages: list[dict], tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(
            "chat-style records but the checkpoint's tokenizer has no chat template", _display_path(source)
        )
    msgs = [{"role": m.get("role") or m.get("from", "user"), "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    bos = tokenizer.bos_token
    # the stream adds BOS itself; a template that writes it would double it
    return text[len(bos) :] if bos and text.startswith(bos) else text
