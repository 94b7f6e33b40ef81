"""Tokenizer export to GGUF (tokenizer.ggml.*) and llama.cpp pre-tokenizer detection.

Three exporters, tried in the order the architecture table gives (as convert_hf_to_gguf.py does):
  spm       tokenizer.model (SentencePiece) → model "llama", pre "default", with scores
  llama_hf  tokenizer.json byte-fallback BPE → model "llama" (gguf-py's LlamaHfVocab)
  gpt2      tokenizer.json byte-level BPE → model "gpt2", the pre-tokenizer name, merges
Special ids, add_bos/add_eos and the chat template come from gguf-py's SpecialVocab.

The pre-tokenizer name is read from the *structure* of tokenizer.json (pre_tokenizer regexes, digit
splitting, byte-level, normalizer), not from a hash of encode() outputs, so it does not depend on the
transformers version. When the structure is unknown the user names it with --pre-tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from qconvert.arch.vocab import Vocab
from qconvert.errors import BadInput

logging.getLogger("gguf.vocab").setLevel(logging.ERROR)

# Names llama.cpp's llama-vocab.cpp accepts for tokenizer.ggml.pre (anything else fails to load).
KNOWN_PRE_TOKENIZERS = frozenset("""
default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es
jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4
granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact command-r
qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat chatglm-bpe glm4
glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 exaone-moe chameleon
minerva-7b megrez gpt-4o llama4 kanana2 talkie granite-embed-multi-97m tiny_aya cohere2moe superbpe
trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4
joyai-llm kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open mellum2
""".split())

# Pre-tokenizer signatures (as tokenizer.json spells the split regexes) → the llama.cpp name whose
# regexes in llama-vocab.cpp reproduce them. "BYTELEVEL" = ByteLevel(use_regex=True), i.e. the GPT-2 regex;
# "DIGITS" = Digits(individual_digits=True), i.e. \p{N}.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_SIGNATURES: dict[tuple[str, ...], str] = {
    ("BYTELEVEL",): "gpt-2",
    ("DIGITS", "BYTELEVEL"): "smollm",          # starcoder when the tokenizer cleans up spaces (below)
    ("re:" + _LLAMA3,): "llama-bpe",
    ("re:" + _QWEN2,): "qwen2",
    ("re:" + _QWEN35,): "qwen35",
    ("re:" + _TEKKEN,): "tekken",
    ("re:" + _GPT4O,): "gpt-4o",
}
_ALLOWED_NORMALIZERS = (None, "NFC")  # llama.cpp applies none; NFC is a no-op on the text it is tested on


@dataclass
class TokenizerInfo:
    model: str              # tokenizer.ggml.model
    pre: str                # tokenizer.ggml.pre
    n_tokens: int
    n_vocab_real: int       # ids actually defined by the tokenizer (gemma3 trims token_embd to this)


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read: {e}", path) from e


def _config(model_dir: Path, name: str) -> dict:
    path = model_dir / name
    return _load_json(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------
# pre-tokenizer detection

def _signature(pt: dict | None, found: dict) -> list[str] | None:
    """Flatten a tokenizers pre_tokenizer into signature pieces; None if a part is not understood."""
    if pt is None:
        return []
    kind = pt.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for child in pt.get("pretokenizers", []):
            part = _signature(child, found)
            if part is None:
                return None
            out += part
        return out
    if kind == "ByteLevel":
        found["bytelevel"] = True
        if pt.get("add_prefix_space"):
            return None
        return ["BYTELEVEL"] if pt.get("use_regex", True) else []
    if kind == "Split":
        pattern = pt.get("pattern", {})
        if "Regex" not in pattern or pt.get("invert") or pt.get("behavior") != "Isolated":
            return None
        return ["re:" + pattern["Regex"]]
    if kind == "Digits":
        return ["DIGITS"] if pt.get("individual_digits") else None
    return None


def _normalizer_ok(norm: dict | None) -> bool:
    if norm is None:
        return True
    if norm.get("type") == "Sequence":
        return all(_normalizer_ok(n) for n in norm.get("normalizers", []))
    return norm.get("type") in _ALLOWED_NORMALIZERS


def detect_pre_tokenizer(tokenizer_json: dict, tokenizer_config: dict | None = None) -> str | None:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json, or None if unknown."""
    found: dict[str, bool] = {}
    sig = _signature(tokenizer_json.get("pre_tokenizer"), found)
    if sig is None or not found.get("bytelevel") or not _normalizer_ok(tokenizer_json.get("normalizer")):
        return None
    name = _SIGNATURES.get(tuple(sig))
    if name == "smollm" and (tokenizer_config or {}).get("clean_up_tokenization_spaces", False):
        # same split rules; llama.cpp's starcoder entry also cleans up spaces when decoding
        return "starcoder"
    return name


def describe_pre_tokenizer(tokenizer_json: dict) -> str:
    """A short description of the pre_tokenizer for error messages."""
    pt = tokenizer_json.get("pre_tokenizer") or {}
    parts = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    kinds = [p.get("type", "?") for p in parts if isinstance(p, dict)]
    return "+".join(kinds) or "none"


def check_pre_tokenizer_name(name: str) -> str:
    if name not in KNOWN_PRE_TOKENIZERS:
        raise BadInput(f"--pre-tokenizer {name!r} is not a name llama.cpp knows "
                       f"(e.g. llama-bpe, qwen2, gpt-2, smollm, starcoder, tekken, gpt-4o)")
    return name


# ---------------------------------------------------------------------------------------------------------
# exporters

def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (convert_hf_to_gguf.py does_token_look_special)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _gpt2_vocab(model_dir: Path, cfg: dict, pre_override: str | None) -> tuple[list, list, str, int]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(path)
    tj = _load_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise BadInput(f"tokenizer model {model.get('type')!r} is not BPE", path)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = int(t["id"])
    vocab_size = int(cfg.get("vocab_size") or len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise BadInput(f"tokenizer has ids up to {max(vocab.values())} but vocab_size is {vocab_size}", path)
    pre = pre_override or detect_pre_tokenizer(tj, _config(model_dir, "tokenizer_config.json"))
    if pre is None:
        raise BadInput(f"cannot tell which llama.cpp pre-tokenizer matches tokenizer.json "
                       f"(pre_tokenizer {describe_pre_tokenizer(tj)}); pass --pre-tokenizer NAME", path)
    by_id = {i: tok for tok, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            special = added[tok].get("special") or _looks_special(tok)
            tokens.append(tok if special else tok.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    n_real = len(model.get("vocab") or {}) + len(tj.get("added_tokens", []))
    return tokens, types, pre, n_real


def _spm_vocab(model_dir: Path, cfg: dict, with_tokenizer_json: bool) -> tuple[list, list, list]:
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(path)
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise BadInput(f"not a SentencePiece model: {e}", path) from e
    vocab_size = int(cfg.get("vocab_size") or sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), _spm_type(sp, i)

    def put(i: int, text: str, special: bool) -> None:
        if i < vocab_size:
            if not special:
                text = text.replace("\u2581", " ")
            tokens[i], scores[i] = text.encode(), -1000.0
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED

    for text, i in _config(model_dir, "added_tokens.json").items():
        put(int(i), text, False)
    for i, t in (_config(model_dir, "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        put(int(i), t["content"], bool(t.get("special")) or _looks_special(t["content"]))
    if with_tokenizer_json:
        for t in _config(model_dir, "tokenizer.json").get("added_tokens", []):
            put(int(t["id"]), t["content"], bool(t.get("special")))
    return tokens, scores, types


def _spm_type(sp: Any, i: int) -> int:
    if sp.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.IsControl(i):
        return gguf.TokenType.CONTROL
    if sp.IsUnused(i):
        return gguf.TokenType.UNUSED
    if sp.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def special_vocab(model_dir: Path, **kw: Any) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab as the vendored (newer than PyPI 0.19) gguf-py builds it: a ByteLevel
    post-processor in tokenizer.json sets add_bos/add_eos to False first (TemplateProcessing's verdict, if it
    gives one, still wins; tokenizer_config's add_*_token then only fills what is unset)."""
    special = gguf.SpecialVocab(model_dir, **kw)
    tj = model_dir / "tokenizer.json"
    post = (_load_json(tj).get("post_processor") or {}) if tj.is_file() else {}
    processors = post.get("processors", [post])
    if not any(p.get("type") == "ByteLevel" for p in processors):
        return special
    single = next((p.get("single", []) for p in processors if p.get("type") == "TemplateProcessing"), [])
    by_template = {"bos": single[:1], "eos": single[-1:]} if len(single) > 1 else {"bos": [], "eos": []}
    old = special.add_special_token
    first = {t: old.get(t, False) if part and part[0].get("SpecialToken", {}).get("id") else False
             for t, part in by_template.items()}
    special.add_special_token = {**first, **{t: v for t, v in old.items() if t not in first}}
    return special


def _export_spm(w: Any, model_dir: Path, cfg: dict, phi3: bool = False) -> TokenizerInfo:
    tokens, scores, types = _spm_vocab(model_dir, cfg, with_tokenizer_json=phi3)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special_vocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    return TokenizerInfo("llama", "default", len(tokens), len(tokens))


def _export_llama_hf(w: Any, model_dir: Path, cfg: dict) -> TokenizerInfo:
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise FileNotFoundError(tj_path)
    model = _load_json(tj_path).get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback", False):
        raise FileNotFoundError(tj_path)  # not a llama-style BPE: the next exporter applies
    vocab = gguf.LlamaHfVocab(model_dir)
    tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
    # llama.cpp refuses a token list shorter than the embedding: pad as the SentencePiece path does
    # (convert_hf_to_gguf.py's llama_hf path does not, and writes files llama.cpp cannot load)
    vocab_size = int(cfg.get("vocab_size") or len(tokens))
    if len(tokens) > vocab_size:
        raise BadInput(f"tokenizer has {len(tokens)} tokens but vocab_size is {vocab_size}", tj_path)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-10000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special_vocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    return TokenizerInfo("llama", "default", len(tokens), len(tokens))


def _export_gpt2(w: Any, model_dir: Path, cfg: dict, pre_override: str | None,
                 specials: Callable[[Any, dict[str, int]], None] | None = None) -> TokenizerInfo:
    tokens, types, pre, n_real = _gpt2_vocab(model_dir, cfg, pre_override)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = special_vocab(model_dir, load_merges=True)
    if not special.merges:
        raise BadInput("tokenizer.json has no BPE merges", model_dir / "tokenizer.json")
    if specials is not None:
        tj = _load_json(model_dir / "tokenizer.json")
        added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens", [])}
        specials(special, added)
    special.add_to_gguf(w, quiet=True)
    return TokenizerInfo("gpt2", pre, len(tokens), n_real)


def _export_one(kind: str, w: Any, model_dir: Path, cfg: dict, pre: str | None,
                vocab: Vocab = Vocab()) -> TokenizerInfo:
    if kind == "spm":
        return _export_spm(w, model_dir, cfg)
    if kind == "llama_hf":
        return _export_llama_hf(w, model_dir, cfg)
    if kind == "gpt2":
        return _export_gpt2(w, model_dir, cfg, pre, vocab.specials)
    if kind == "phi3":  # GPT2Tokenizer models (Phi-4) are byte-level BPE, the rest SentencePiece
        tok_class = _config(model_dir, "tokenizer_config.json").get("tokenizer_class")
        if tok_class == "GPT2Tokenizer":
            return _export_gpt2(w, model_dir, cfg, pre)
        return _export_spm(w, model_dir, cfg, phi3=True)
    raise ValueError(kind)


def add_tokenizer(w: Any, arch: str, vocab: Vocab, model_dir: Path, cfg: dict,
                  pre_override: str | None = None) -> TokenizerInfo:
    """Write tokenizer.* KVs for a checkpoint directory, with the family's quirks (arch/vocab.py)."""
    if pre_override is not None:
        check_pre_tokenizer_name(pre_override)
    tok_cfg = _config(model_dir, "tokenizer_config.json")
    if vocab.before is not None:
        vocab.before(w, tok_cfg)
    info = None
    for kind in vocab.kinds:
        try:
            info = _export_one(kind, w, model_dir, cfg, pre_override, vocab)
            break
        except FileNotFoundError:
            continue
    if info is None:
        wanted = {"spm": "tokenizer.model", "llama_hf": "tokenizer.json", "gpt2": "tokenizer.json",
                  "phi3": "tokenizer.model"}
        files = " or ".join(sorted({wanted[k] for k in vocab.kinds}))
        raise BadInput(f"no tokenizer found for {arch} (needs {files})", model_dir)
    if vocab.after is not None:
        vocab.after(w, info, cfg)
    if vocab.after_config is not None:
        vocab.after_config(w, tok_cfg)
    return info


# llama-vocab.cpp sets attributes on these tokens by name (token_to_id.at: a missing one aborts the load)
# when general.name contains "phi-3" or "phi3"
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def llama_load_problem(kv: dict[str, Any]) -> str | None:
    """Why llama.cpp would refuse these KVs, for problems it only finds by name; None if none is known."""
    name = str(getattr(kv.get("general.name"), "value", "") or "").lower()
    tokens = getattr(kv.get("tokenizer.ggml.tokens"), "value", None) or []
    if ("phi-3" in name or "phi3" in name) and tokens:
        have = {t.decode() if isinstance(t, bytes) else t for t in tokens}
        missing = [t for t in _PHI3_NAMED_TOKENS if t not in have]
        if missing:
            return (f"llama.cpp cannot load a model named {name!r} whose vocabulary lacks "
                    f"{', '.join(missing)} (it looks them up for Phi-3 names); "
                    f"rename it with --override-kv general.name=str:NAME")
    return None


# ---------------------------------------------------------------------------------------------------------
# the inverse (`convert model.gguf --to hf`): tokenizer.json from a gpt2 vocabulary, the pre-tokenizer
# rebuilt from its llama.cpp name by the same signatures detect_pre_tokenizer reads

_SIGNATURE_OF: dict[str, tuple[str, ...]] = {name: sig for sig, name in _SIGNATURES.items()}
_SIGNATURE_OF["starcoder"] = _SIGNATURE_OF["smollm"]  # smollm's split; the tokenizer cleans up spaces


def _pre_tokenizer(name: str) -> tuple[Any, Any] | None:
    """(normalizer, pre_tokenizer) whose signature is llama.cpp's pre-tokenizer `name`; None if unknown."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    sig = _SIGNATURE_OF.get(name)
    if sig is None:
        return None
    if sig[0].startswith("re:"):
        split = pre_tokenizers.Split(Regex(sig[0][3:]), behavior="isolated", invert=False)
        level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        # Qwen2's own tokenizer.json normalizes NFC (the one normalizer detection accepts)
        return (normalizers.NFC() if name == "qwen2" else None), pre_tokenizers.Sequence([split, level])
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if sig == ("BYTELEVEL",):
        return None, level
    return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])


def hf_tokenizer_files(kv: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """tokenizer.json (a tokenizers.Tokenizer), tokenizer_config.json and special_tokens_map.json from the
    tokenizer.ggml.* KVs; with a note instead when the vocabulary cannot be rebuilt."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model, pre = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.pre", "default")
    if model == "llama":
        return _spm_files(kv), None
    if model != "gpt2":
        return {}, (f"tokenizer model {model!r} (gpt2 and llama vocabularies are rebuilt): "
                    "no tokenizer.json written")
    parts = _pre_tokenizer(str(pre))
    if parts is None:
        return {}, f"pre-tokenizer {pre!r} has no known split: no tokenizer.json written"
    tokens = list(kv["tokenizer.ggml.tokens"])
    types = [int(t) for t in kv.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))]
    merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
    added = {gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED}
    # every token keeps its id in the model's vocabulary (as BpeTrainer and the hub files have it); the added
    # ones are registered on top, so they match before the BPE model sees the text
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    if parts[0] is not None:
        tok.normalizer = parts[0]
    tok.pre_tokenizer = parts[1]
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [(i, t) for i, t in enumerate(tokens) if types[i] in added]
    _add_tokens_at_ids(tok, extra, types, AddedToken)
    return {"tokenizer.json": tok, **_tokenizer_configs(kv, tokens, types, str(pre))}, None


def _add_tokens_at_ids(tok: Any, extra: list[tuple[int, str]], types: list[int], added_token: Any) -> None:
    """Register the CONTROL (special) and USER_DEFINED tokens at their vocabulary ids."""
    for i, text in extra:
        special = types[i] == gguf.TokenType.CONTROL
        tok.add_tokens([added_token(text, special=special, normalized=not special)])
        if tok.token_to_id(text) != i:
            raise BadInput(f"tokenizer.ggml.tokens[{i}] {text!r} cannot keep its id in tokenizer.json")


def _tokenizer_configs(kv: dict[str, Any], tokens: list[str], types: list[int], pre: str) -> dict[str, Any]:
    def token(key: str) -> str | None:
        i = kv.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    specials = {name: token(key) for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                                   ("pad_token", "padding"), ("unk_token", "unknown"))}
    specials = {k: v for k, v in specials.items() if v is not None}
    added = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": types[i] != gguf.TokenType.CONTROL,
                        "rstrip": False, "single_word": False, "special": types[i] == gguf.TokenType.CONTROL}
               for i, t in enumerate(tokens) if types[i] in added}
    config: dict[str, Any] = {"added_tokens_decoder": decoder, **specials, "add_prefix_space": False,
                              "clean_up_tokenization_spaces": pre == "starcoder",
                              "tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("add_bos_token", "add_eos_token"):
        if (value := kv.get(f"tokenizer.ggml.{key}")) is not None:
            config[key] = bool(value)
    if (template := kv.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = str(template)
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def _spm_files(kv: dict[str, Any]) -> dict[str, Any]:
    """A SentencePiece ("llama") vocabulary through transformers' own GGUF tokenizer builders (its GGUF
    loader's: byte-fallback BPE from the pieces, merges from the scores; gemma's and phi3's quirks)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: kv[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in kv}
    tokenizer_dict = {k: (list(v) if isinstance(v, list | tuple) or hasattr(v, "tolist") else v)
                      for k, v in tokenizer_dict.items()}
    if "token_type" in tokenizer_dict:
        tokenizer_dict["token_type"] = [int(t) for t in tokenizer_dict["token_type"]]
    if "scores" in tokenizer_dict:
        tokenizer_dict["scores"] = [float(x) for x in tokenizer_dict["scores"]]
    tok, _ = convert_gguf_tokenizer(str(kv.get("general.architecture")), tokenizer_dict)
    tokens = list(kv["tokenizer.ggml.tokens"])
    types = [int(t) for t in kv.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))]
    configs = _tokenizer_configs(kv, tokens, types, "default")
    cfg = configs["tokenizer_config.json"]
    cfg.setdefault("add_bos_token", True)  # llama.cpp's default for a SentencePiece vocabulary
    _special_template(tok, kv, tokens, bool(cfg["add_bos_token"]), bool(cfg.get("add_eos_token")))
    return {"tokenizer.json": tok, **configs}


def _special_template(tok: Any, kv: dict[str, Any], tokens: list[str], bos: bool, eos: bool) -> None:
    """BOS / EOS added as llama.cpp adds them (tokenizer.json's post-processor: what the fast tokenizer
    reads; tokenizer_config's add_bos_token alone it ignores)."""
    from tokenizers import processors

    ids = {k: kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    pre = [tokens[int(ids["bos"])]] if bos and ids["bos"] is not None else []
    post = [tokens[int(ids["eos"])]] if eos and ids["eos"] is not None else []
    if not pre and not post:
        return
    special = [(t, tokens.index(t)) for t in dict.fromkeys(pre + post)]
    single = " ".join([*pre, "$A", *post])
    pair = " ".join([*pre, "$A", *post, *pre, "$B", *post])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
