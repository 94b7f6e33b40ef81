"""Fast checks of the eval machinery with a fake backend: chunking, scoring, KL maths, the logits file and
every refusal (short text, vocabulary or token-stream mismatch, bad files)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert.calib.datasets import read_text
from qconvert.errors import BadInput
from qconvert.evaluate import run
from qconvert.evaluate.kl import KlStats, RefLogits, kl_rows, load_logits
from qconvert.evaluate.perplexity import NllStats, make_chunks

VOCAB = 64


class FakeBackend:
    """Byte tokenizer (ids 2..); logits are a fixed function of the current token, scaled by `temp`."""

    kind = "fake"

    def __init__(self, path, n_vocab=VOCAB, add_bos=True, temp=1.0, shift=0):
        self.path = Path(path)
        self.n_vocab, self.add_bos, self.bos_id = n_vocab, add_bos, 1
        self.temp, self.shift = temp, shift
        table = torch.Generator().manual_seed(0)
        self.table = torch.randn(n_vocab, n_vocab, generator=table)
        self.loaded = self.closed = False

    def tokenize(self, text):
        ids = [2 + (b + self.shift) % (self.n_vocab - 2) for b in text.encode()]
        return [self.bos_id, *ids] if self.add_bos else ids

    def load(self):
        self.loaded = True

    def seqs_per_call(self, ctx):
        return 3

    def logits(self, chunks, first):
        return self.table[torch.from_numpy(chunks[:, first:]).long()] * self.temp

    def close(self):
        self.closed = True


@pytest.fixture
def text_file(tmp_path) -> Path:
    words = "the quick brown fox jumps over the lazy dog and keeps running far away ".split()
    rng = np.random.default_rng(1)
    p = tmp_path / "text.txt"
    p.write_text(" ".join(rng.choice(words, 400)) + "\n")
    return p


def _patch(monkeypatch, **backends):
    def fake_open(source, ctx, **kw):
        return backends[str(source)]

    monkeypatch.setattr(run, "open_backend", fake_open)


def _expected_ppl(b: FakeBackend, text: str, ctx: int, n: int) -> float:
    toks = b.tokenize(text)
    nll = []
    for c in range(n):
        chunk = list(toks[c * ctx:(c + 1) * ctx])
        chunk[0] = b.bos_id
        for pos in range(ctx // 2, ctx - 1):
            lp = torch.log_softmax(b.table[chunk[pos]] * b.temp, -1)
            nll.append(-float(lp[chunk[pos + 1]]))
    return math.exp(sum(nll) / len(nll))


def test_perplexity_follows_llama_perplexity(monkeypatch, text_file):
    b = FakeBackend("m")
    _patch(monkeypatch, m=b)
    res = run.evaluate("m", text_file, ctx=64, chunks=5)
    assert res.chunks == 5 and res.tokens == 5 * 31
    text = text_file.read_text()[:-1]  # one trailing newline dropped
    assert res.perplexity == pytest.approx(_expected_ppl(b, text, 64, 5), rel=1e-9)
    assert b.closed


def test_chunks_bos_and_short_text():
    toks = list(range(10, 40))
    c = make_chunks(toks, 10, None, True, 1)
    assert c.shape == (3, 10) and (c[:, 0] == 1).all() and c[1, 1] == 21
    assert make_chunks(toks, 10, 2, False, 1)[1, 0] == 20
    with pytest.raises(BadInput, match="needs at least 62"):
        make_chunks(toks, 31, None, True, 1)


def test_stderr_formula():
    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, 1.0, 1000)
    s = NllStats()
    s.add(v[:400])
    s.add(v[400:])
    ppl = math.exp(v.mean())
    assert s.perplexity == pytest.approx(ppl)
    assert s.stderr == pytest.approx(ppl * math.sqrt(((v * v).mean() - v.mean() ** 2) / (v.size - 1)))


def _ref_file(path, lp, top_k):
    n_vocab = lp.shape[-1]
    ctx = 2 * (lp.shape[0] + 1)
    ref = RefLogits.create(path, 1, ctx, n_vocab, top_k)
    ref.put(0, np.arange(ctx, dtype=np.int32) % n_vocab, lp, np.zeros(lp.shape[0], np.float32))
    ref.finish()
    return load_logits(path)


def test_kl_exact_and_top_k_bound(tmp_path):
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(15, 200, generator=g) * 3, -1)
    lq = torch.log_softmax(torch.randn(15, 200, generator=g) * 3, -1)
    exact = (lp.exp().double() * (lp.double() - lq.double())).sum(-1).numpy()
    full = _ref_file(tmp_path / "full.safetensors", lp, 0)
    kl_full, _ = kl_rows(full, 0, lq)
    np.testing.assert_allclose(kl_full, exact, rtol=2e-3, atol=1e-4)
    kl_self, agree = kl_rows(full, 0, lp)
    assert (kl_self == 0).all() and agree.all()
    top = _ref_file(tmp_path / "top.safetensors", lp, 20)
    kl_top, _ = kl_rows(top, 0, lq)
    assert (kl_top <= kl_full + 1e-3).all() and (kl_top > 0).all()  # merging events never increases KL
    all_k = _ref_file(tmp_path / "all.safetensors", lp, 200)
    np.testing.assert_allclose(kl_rows(all_k, 0, lq)[0], kl_full, rtol=1e-6, atol=1e-9)


def test_kl_stats_percentile():
    s = KlStats()
    s.add(np.arange(101.0), np.array([True] * 60 + [False] * 41))
    out = s.summary()
    assert out["mean"] == 50 and out["p99"] == pytest.approx(99.0) and out["max"] == 100
    assert s.top1_agreement == pytest.approx(60 / 101)


def test_reference_self_is_zero_and_file_round_trip(monkeypatch, text_file, tmp_path):
    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path / "cache"))
    _patch(monkeypatch, m=FakeBackend("m"), q=FakeBackend("q", temp=0.7))
    f = tmp_path / "ref.safetensors"
    own = run.evaluate("m", text_file, ctx=64, chunks=4, save_logits_to=f)
    assert f.exists() and own.saved_logits == str(f)
    same = run.evaluate("m", text_file, ctx=64, logits=f)
    assert same.kl_divergence["mean"] == 0 and same.top1_agreement == 1.0
    assert same.reference_perplexity == pytest.approx(own.perplexity, rel=1e-6)
    direct = run.evaluate("q", text_file, ctx=64, chunks=4, reference="m")
    cached = run.evaluate("q", text_file, ctx=64, logits=f)
    assert 0 < direct.kl_divergence["mean"] < math.inf
    assert cached.kl_divergence == direct.kl_divergence
    assert cached.top1_agreement == direct.top1_agreement
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / "tmp"]  # temp reference removed


def test_refusals(monkeypatch, text_file, tmp_path):
    _patch(monkeypatch, m=FakeBackend("m"), big=FakeBackend("big", n_vocab=VOCAB + 8),
           other=FakeBackend("other", shift=1))
    with pytest.raises(BadInput, match="vocabulary mismatch"):
        run.evaluate("m", text_file, ctx=64, chunks=2, reference="big")
    with pytest.raises(BadInput, match="token streams differ"):
        run.evaluate("m", text_file, ctx=64, chunks=2, reference="other")
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    with pytest.raises(BadInput, match="tokenizes to only"):
        run.evaluate("m", short, ctx=64)
    f = tmp_path / "ref.safetensors"
    run.evaluate("m", text_file, ctx=64, chunks=2, save_logits_to=f)
    with pytest.raises(BadInput, match="ctx-size 64, not 32"):
        run.evaluate("m", text_file, ctx=32, logits=f)
    with pytest.raises(BadInput, match="token streams differ"):
        run.evaluate("other", text_file, ctx=64, logits=f)
    with pytest.raises(BadInput, match="holds 2 chunks"):
        run.evaluate("m", text_file, ctx=64, chunks=3, logits=f)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(BadInput, match="not a qconvert logits file"):
        run.evaluate("m", text_file, ctx=64, logits=bad)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BadInput, match="truncated"):
        run.evaluate("m", text_file, ctx=64, logits=truncated)
    with pytest.raises(BadInput, match="dataset file not found"):
        run.evaluate("m", tmp_path / "missing.txt", ctx=64)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(BadInput, match="not UTF-8"):
        read_text(binary)
    with pytest.raises(BadInput, match="either --reference or --logits"):
        run.evaluate("m", text_file, reference="m", logits=f)
