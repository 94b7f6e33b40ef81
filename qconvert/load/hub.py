"""Hugging Face hub ids -> a local snapshot directory (through huggingface_hub's cache).

Only what the pipeline reads is fetched: config, tokenizer and index files first, then exactly the
safetensors shards the index names (or `model*.safetensors`, else `*.safetensors`), so repositories that
also ship .bin / .gguf / consolidated weights do not cost a second download. HF_HUB_OFFLINE, HF_HOME and
HF_HUB_CACHE are read at call time (huggingface_hub reads them at import time only).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qconvert.errors import BadInput, IOFailure

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
    "merges.txt",
)
META_PATTERNS = [
    "config.json", "quantize_config.json", "quant_config.json", "*.safetensors.index.json", *TOKENIZER_FILES,
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_FILE_SUFFIXES = (".safetensors", ".gguf", ".json", ".bin", ".pt", ".pth", ".txt", ".dat")


def looks_like_hub_id(source: str) -> bool:
    """'org/name' that is not a local-looking path (callers check for an existing path first)."""
    if not _HUB_ID.match(source) or ".." in source or source.endswith((".", "-")):
        return False
    return not source.lower().endswith(_FILE_SUFFIXES)


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def cache_dir() -> str | None:
    """The hub cache huggingface_hub would use if it read the environment now (None = its default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _not_cached(repo_id: str, detail: str = "") -> BadInput:
    more = f" ({detail})" if detail else ""
    return BadInput(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set{more}")


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir(),
                                      local_files_only=offline()))
    except GatedRepoError:
        raise BadInput(f"{repo_id} is gated on the Hugging Face Hub: accept its terms on the model page "
                       "and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise BadInput(f"{repo_id} was not found on the Hugging Face Hub (if it is private, set HF_TOKEN)") \
            from None
    except RevisionNotFoundError:
        raise BadInput(f"{repo_id}: revision not found on the Hugging Face Hub") from None
    except HFValidationError:
        raise BadInput(f"{repo_id!r} is not a valid Hugging Face hub id") from None
    except LocalEntryNotFoundError:
        if offline():
            raise _not_cached(repo_id) from None
        raise IOFailure(f"{repo_id}: cannot reach the Hugging Face Hub and the model is not in the local "
                        "cache (check the network, or set HF_HUB_OFFLINE=1 to use cached models only)") \
            from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise IOFailure(f"{repo_id}: Hugging Face Hub request failed (HTTP {status})") from None
    except OSError as e:
        raise IOFailure(f"{repo_id}: download failed: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - transport errors of the HTTP client: one line, exit 1
        first = str(e).splitlines()[0] if str(e) else ""
        raise IOFailure(f"{repo_id}: download failed: {type(e).__name__}: {first}") from None


def _index_shards(index: Path) -> list[str] | None:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        return sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return None  # the checkpoint loader reports the malformed index with full detail


def snapshot(repo_id: str) -> Path:
    """Download (or find in the cache) what qconvert needs from `repo_id`; returns the snapshot dir."""
    folder = _download(repo_id, META_PATTERNS)
    index = folder / "model.safetensors.index.json"
    indexes = [index] if index.exists() else sorted(folder.glob("*.safetensors.index.json"))
    shards = _index_shards(indexes[0]) if indexes else None
    if shards:
        folder = _download(repo_id, shards)
        missing = [s for s in shards if not (folder / s).exists()]
        if missing and offline():
            raise _not_cached(repo_id, f"missing {', '.join(missing[:3])}")
        return folder
    for pattern in ("model*.safetensors", "*.safetensors"):
        folder = _download(repo_id, [pattern])
        if any(folder.glob(pattern)):
            return folder
    if offline():
        raise _not_cached(repo_id, "no .safetensors weights cached")
    raise BadInput(f"{repo_id} has no .safetensors weights on the Hugging Face Hub")
