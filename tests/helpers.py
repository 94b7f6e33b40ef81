"""Small helpers the test modules share (imported as ``tests.helpers``, as ``tests.oracle`` is)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in a checkpoint directory (shards in name order)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    """`qconvert ARGS` in-process, as users run it: (exit code, stdout, stderr)."""
    from qconvert import cli

    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- GGUF files against llama.cpp's

TOKENS = [1, 17, 400, 1021, 33, 2048, 5, 900]  # a short "text" every synthetic vocabulary has


def tensor_bytes(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (ggml type, data bytes) of every tensor of a GGUF file, in file order."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in r.tensors}


def gguf_kvs(path: Path) -> list[tuple[str, list, object]]:
    """(key, types, value) of every KV but the general.* provenance, in file order."""
    import gguf

    skip = ("GGUF.", "general.")
    r = gguf.GGUFReader(path)
    return [(k, f.types, f.contents()) for k, f in r.fields.items() if not k.startswith(skip)]


def assert_same_gguf(ours: Path, ref: Path, *, order: bool = True) -> None:
    """Every tensor byte for byte (and in the same order unless order=False: the converter writes its own
    emit order, llama-quantize and we write llama.cpp's), the same KVs in the same order with the same
    types apart from general.* provenance, and the same general.file_type."""
    import gguf

    ta, tb = tensor_bytes(ours), tensor_bytes(ref)
    assert sorted(ta) == sorted(tb), f"tensor names differ: {sorted(set(ta) ^ set(tb))[:8]}"
    if order:
        assert list(ta) == list(tb), "tensor order differs"
    bad = [(n, ta[n][0], tb[n][0]) for n in ta if ta[n] != tb[n]]
    assert not bad, f"{len(bad)} tensors differ (name, our type, their type), e.g. {bad[:5]}"
    ka, kb = gguf_kvs(ours), gguf_kvs(ref)
    assert [k for k, _, _ in ka] == [k for k, _, _ in kb], "KV keys or their order differ"
    assert ka == kb, [k for (k, *va), (_, *vb) in zip(ka, kb, strict=True) if va != vb]
    ft_ours, ft_ref = (gguf.GGUFReader(p).fields["general.file_type"].contents() for p in (ours, ref))
    assert ft_ours == ft_ref, f"general.file_type {ft_ours} != {ft_ref}"


def open_llama(path: Path, lora: Path | None = None):
    """llama_cpp.Llama (with a LoRA adapter GGUF if given) without extra buffer types: on CPUs with AMX the
    wheel (GGML_NATIVE) repacks quantized weights for AMX tiles, which segfaults in this sandbox (no AMX
    permission); plain CPU buffers do not."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True,
                     verbose=False)
    finally:
        lib.llama_model_default_params = default


def llama_logits(path: Path, tokens: list[int]):
    """llama.cpp's logits (float32 [n_tokens, n_vocab]) for a GGUF file on the tokens."""
    import numpy as np

    llm = open_llama(path)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def hf_logits(model_dir: Path, tokens: list[int]):
    """transformers' float32 logits for an HF checkpoint on the tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def assert_convert_refused(model: Path, tmp_path: Path, match: str, **options) -> None:
    """`convert` of ``model`` to Q4_K_M raises one line of BadInput matching ``match`` and writes nothing."""
    import pytest

    from qconvert.errors import BadInput
    from qconvert.pipelines.convert import ConvertOptions, convert

    target = tmp_path / "out" / "o.gguf"
    target.parent.mkdir()
    with pytest.raises(BadInput, match=match) as e:
        convert(str(model), ConvertOptions(file_type="Q4_K_M", output=target, threads=2, **options))
    assert "\n" not in str(e.value)
    assert list(target.parent.iterdir()) == []
