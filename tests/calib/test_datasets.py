"""Calibration data: sources, chunking (llama-imatrix semantics) and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qconvert.calib.datasets import adds_bos, load_calibration, load_tokenizer
from qconvert.errors import BadInput, QConvertError
from qconvert.load import open_checkpoint


class CharTokenizer:
    """One token per character (id = ord % 1000 + 10); BOS=1, EOS=2, adds BOS like llama/gemma vocabs."""

    bos_token_id, eos_token_id, bos_token = 1, 2, "<s>"
    add_bos_token = True
    chat_template = None

    def __call__(self, text, add_special_tokens=True, split_special_tokens=False):
        ids = [ord(c) % 1000 + 10 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_txt_is_cut_like_llama_imatrix(tmp_path: Path) -> None:
    text = "".join(chr(97 + i % 26) for i in range(100))
    f = tmp_path / "a.txt"
    f.write_text(text + "\n")  # one trailing newline is dropped, as llama.cpp does
    data = load_calibration(
        str(f), CharTokenizer(), seq_len=16, num_samples=None, shuffle_chunks=False, min_tokens=32
    )
    stream = [1] + [ord(c) % 1000 + 10 for c in text]  # BOS in front of the whole text
    assert data.tokens.shape == (len(stream) // 16, 16) and data.available_tokens == 101
    for i, row in enumerate(data.tokens.tolist()):
        assert row[0] == 1  # first token of every chunk replaced by BOS
        assert row[1:] == stream[i * 16 + 1 : (i + 1) * 16]
    assert data.add_bos and data.description == str(f)


def test_chunks_cap_skip_and_seeded_subset(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("x" * 40 + "y" * 40 + "z" * 80)
    tok = CharTokenizer()
    capped = load_calibration(str(f), tok, seq_len=20, num_samples=2, shuffle_chunks=False, min_tokens=40)
    assert capped.tokens.shape == (2, 20)
    skipped = load_calibration(
        str(f), tok, seq_len=20, num_samples=1, shuffle_chunks=False, skip_chunks=4, min_tokens=40
    )
    assert set(skipped.tokens[0, 1:].tolist()) == {ord("z") % 1000 + 10}
    a = load_calibration(str(f), tok, seq_len=20, num_samples=3, seed=5)
    b = load_calibration(str(f), tok, seq_len=20, num_samples=3, seed=5)
    assert a.tokens.equal(b.tokens) and a.tokens.shape == (3, 20)


def test_jsonl_parquet_and_chat_records(tmp_path: Path, synthetic_dir) -> None:
    tok = load_tokenizer(open_checkpoint(synthetic_dir("llama")))
    rows = [{"text": f"Record number {i} says something about tensors and layers."} for i in range(40)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_calibration(str(jl), tok, seq_len=32, num_samples=4, seed=1)
    assert data.tokens.shape == (4, 32) and data.add_bos is adds_bos(tok) is False

    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": r["text"]} for r in rows]), pqf)
    from_pq = load_calibration(str(pqf), tok, seq_len=32, num_samples=4, seed=1, text_field="body")
    assert from_pq.tokens.equal(data.tokens)  # same records, same seed -> same chunks

    chats = tmp_path / "c.jsonl"
    msgs = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i} about weights?"},
                {"role": "assistant", "content": f"Answer {i}: they are quantized."},
            ]
        }
        for i in range(30)
    ]
    chats.write_text("\n".join(json.dumps(m) for m in msgs))
    chat = load_calibration(str(chats), tok, seq_len=32, num_samples=2)
    rendered = tok.apply_chat_template(msgs[0]["messages"], tokenize=False)
    marker = tok(rendered.split("Question")[0], add_special_tokens=False)["input_ids"][0]
    assert marker in chat.tokens.flatten().tolist()  # chat markers arrive as the template's special tokens


def test_empty_dataset(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(
        BadInput, match=r"empty\.txt: calibration data is empty; at least 1024 tokens are needed"
    ):
        load_calibration(str(f), CharTokenizer(), seq_len=512, num_samples=2)


def test_too_short_dataset_says_how_many_tokens(tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("z" * 300)
    with pytest.raises(
        BadInput,
        match=r"tokenizes to only 301 tokens; at least 1024 tokens are needed "
        r"\(2 samples x 512 tokens\)",
    ):
        load_calibration(str(f), CharTokenizer(), seq_len=512, num_samples=2)
    with pytest.raises(BadInput, match=r"at least 1024 tokens .*\(2 chunks of 512 tokens\)"):
        load_calibration(
            str(f), CharTokenizer(), seq_len=512, num_samples=None, min_tokens=1024, shuffle_chunks=False
        )


def test_unknown_jsonl_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "hello", "id": 3}) + "\n")
    with pytest.raises(BadInput, match=r"no 'text' field \(fields: content, id\).*--text-field"):
        load_calibration(str(f), CharTokenizer(), seq_len=4, num_samples=1)
    with pytest.raises(BadInput, match=r"no field 'body' \(fields: content, id\)"):
        load_calibration(str(f), CharTokenizer(), seq_len=4, num_samples=1, text_field="body")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "dataset file not found"),
        ("bad.txt", b"\xff\xfe\x00abc", "not UTF-8 text"),
        ("bad.jsonl", b'{"text": "a"}\n{oops\n', "line 2: not valid JSON"),
        ("bad.parquet", b"this is not parquet", "not a readable parquet file"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(QConvertError, match=message) as err:
        load_calibration(str(f), CharTokenizer(), seq_len=4, num_samples=1)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_bad_hf_spec() -> None:
    with pytest.raises(BadInput, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
        load_calibration("hf:", CharTokenizer(), seq_len=4, num_samples=1)
