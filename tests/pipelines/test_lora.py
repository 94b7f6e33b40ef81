"""LoRA adapters (issue #19, part 3): `--lora ADAPTER_DIR` on convert / quantize / calibrate merges a PEFT
adapter into the base weights as they are read, as PEFT's merge_and_unload does (its merged model is the
anchor: same tensors bit for bit, same logits in transformers, so every command's output equals running it
on the merged checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.load import open_checkpoint
from qconvert.load.lora import lora_source
from qconvert.pipelines.convert import ConvertOptions, convert
from qconvert.pipelines.to_hf import convert_to_hf
from tests.helpers import open_llama, read_tensors, run_cli

TOKENS = [1, 17, 400, 1021, 33, 2048, 5, 900]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, targets: list[str], seed: int = 0, **kw) -> Path:
    """A PEFT LoRA adapter on `base` with random A and B (init_lora_weights=False), saved as PEFT saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, lora_dropout=0.0,
                     **kw)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """PEFT's own merge_and_unload of the adapter, saved as a checkpoint with the base's side files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out


def _logits(model_dir: Path) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.fixture(scope="module")
def lora_case(synthetic_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, adapter, PEFT-merged checkpoint) on the synthetic llama."""
    base = synthetic_dir("llama")
    tmp = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(base, tmp / "adapter", TARGETS)
    return base, adapter, peft_merged(base, adapter, tmp / "merged")


def test_merge_is_peft_merge_and_unload(lora_case):
    base, adapter, merged = lora_case
    want = read_tensors(merged)
    with lora_source(open_checkpoint(base), adapter) as view:
        assert sorted(view.tensors) == sorted(want)
        changed = 0
        for name in view.tensors:
            got = view.read(name)
            assert got.dtype == want[name].dtype and torch.equal(got, want[name]), name
            assert np.array_equal(view.read_numpy(name), want[name].float().numpy()), name
            changed += name in view.adapter.pairs
        assert changed == 4 * len(TARGETS)


def test_convert_lora_is_converting_the_merged_model(lora_case, tmp_path, capsys):
    base, adapter, merged = lora_case
    ours = tmp_path / "ours.gguf"
    code, _, err = run_cli(capsys, "convert", base, "--lora", adapter, "--type", "Q4_K_M", "-o", ours)
    assert code == 0 and "merged LoRA adapter (28 Linears, r=8, alpha=16)" in err
    ref = convert(str(merged), ConvertOptions(file_type="Q4_K_M", output=tmp_path / "ref.gguf")).output
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    assert [(t.name, bytes(t.data)) for t in a.tensors] == [(t.name, bytes(t.data)) for t in b.tensors]
    # the KVs too, but general.name (the model card's: the directory's name)
    names = ("general.name", "general.basename")
    assert {k: f.contents() for k, f in a.fields.items() if k not in names and not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in b.fields.items() if k not in names and not k.startswith("GGUF.")}
    # and the merged weights are PEFT's: back to HF, transformers gives merge_and_unload's logits exactly
    opts = ConvertOptions(file_type="BF16", output=tmp_path / "m.gguf", lora=adapter)
    bf16 = convert(str(base), opts).output
    back = convert_to_hf(bf16, tmp_path / "hf").output
    np.testing.assert_array_equal(_logits(back), _logits(merged))


def test_quantize_lora_is_quantizing_the_merged_model(lora_case, tmp_path, capsys):
    base, adapter, merged = lora_case
    args = ("--method", "rtn", "--bits", "4", "--group-size", "64")
    code, out, _ = run_cli(capsys, "quantize", base, "--lora", adapter, *args, "-o", tmp_path / "ours")
    assert code == 0 and "merged LoRA adapter" in out
    assert run_cli(capsys, "quantize", merged, *args, "-o", tmp_path / "ref")[0] == 0
    a, b = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "ref")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_calibrate_lora_is_calibrating_the_merged_model(lora_case, calib_text, tmp_path, capsys):
    base, adapter, merged = lora_case
    args = ("--dataset", calib_text, "--num-samples", "2", "--seq-len", "32", "--device", "cpu",
            "--dtype", "f32")
    code, _, err = run_cli(capsys, "calibrate", base, "--lora", adapter, *args, "-o", tmp_path / "ours.st")
    assert code == 0 and "merged LoRA adapter" in err
    assert run_cli(capsys, "calibrate", merged, *args, "-o", tmp_path / "ref.st")[0] == 0
    a, b = load_file(tmp_path / "ours.st"), load_file(tmp_path / "ref.st")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- bad adapters: one line, exit 2, no output

def _edited(adapter: Path, out: Path, edit) -> Path:
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file(edit(tensors), out / "adapter_model.safetensors")
    return out


def _refused(capsys, tmp_path: Path, base: Path, adapter: Path, expect: str) -> None:
    out = tmp_path / "out.gguf"
    capsys.readouterr()  # what building the adapter printed
    code, _, err = run_cli(capsys, "convert", base, "--lora", adapter, "--type", "Q8_0", "-o", out)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()


def test_adapter_for_another_base(lora_case, tmp_path, capsys):
    base, adapter, _ = lora_case
    narrow = _edited(adapter, tmp_path / "narrow", lambda t: {
        k: (v[:, :128].contiguous() if ".lora_A." in k else v) for k, v in t.items()})
    _refused(capsys, tmp_path, base, narrow, "an adapter for another base model")
    extra = _edited(adapter, tmp_path / "extra", lambda t: {
        **t, **{k.replace("layers.0.", "layers.9."): v.clone() for k, v in t.items() if "layers.0." in k}})
    _refused(capsys, tmp_path, base, extra, "which the base model does not have")


def test_unsupported_adapters(lora_case, synthetic_dir, tmp_path, capsys):
    base, adapter, _ = lora_case
    embed = make_adapter(base, tmp_path / "embed", ["embed_tokens"])
    _refused(capsys, tmp_path, base, embed, "embedding (lora_embedding) targets are not supported")
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    _refused(capsys, tmp_path, base, dora, "use_dora is set")
    _refused(capsys, tmp_path, base, tmp_path, "not a PEFT adapter directory")


# ---------------------------------------------------------------- the adapter as a llama.cpp LoRA GGUF

def _llama_logits(path: Path, lora: Path | None = None) -> np.ndarray:
    llm = open_llama(path, lora)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module")
def lora_oracle(fixtures_lib):
    """(convert_lora_to_gguf.py, the sdist's llama.cpp tree)."""
    return fixtures_lib.llamacpp_lora_converter(), fixtures_lib.llamacpp_source()


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_adapter_gguf_is_convert_lora_to_gguf(outtype, lora_case, lora_oracle, tmp_path, capsys):
    from tests.oracle.convert_lora import convert_lora_to_gguf

    base, adapter, _ = lora_case
    ref = convert_lora_to_gguf(*lora_oracle, adapter, base, tmp_path / "ref.gguf", outtype)
    ours = tmp_path / "ours.gguf"
    code, out, _ = run_cli(capsys, "convert", adapter, "--to", "gguf", "--base", base, "--type", outtype,
                           "-o", ours)
    assert code == 0 and "llama LoRA adapter: 28 Linears, r=8, alpha=16" in out
    assert ours.read_bytes() == ref.read_bytes()


def test_qwen2_adapter_gguf_is_convert_lora_to_gguf(synthetic_dir, lora_oracle, tmp_path, capsys):
    """Attention-only targets with biases in the base (qwen2), no Q/K permutation."""
    from tests.oracle.convert_lora import convert_lora_to_gguf

    base = synthetic_dir("qwen2")
    adapter = make_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"], seed=3)
    ref = convert_lora_to_gguf(*lora_oracle, adapter, base, tmp_path / "ref.gguf")
    ours = tmp_path / "ours.gguf"
    assert run_cli(capsys, "convert", adapter, "--to", "gguf", "--base", base, "-o", ours)[0] == 0
    assert ours.read_bytes() == ref.read_bytes()


def test_llama_cpp_applies_the_adapter_as_the_merged_model(lora_case, tmp_path):
    """llama.cpp with --lora on the base gives the logits of the merged model. llama.cpp adds B(Ax) to each
    Linear's output in float32, so the merged model it is held to is merged in float32 too (PEFT's
    merge_and_unload on the float32 base; a bf16 merge rounds W + BA, which moves logits by ~1 %)."""
    from qconvert.pipelines.lora_gguf import convert_lora

    base, adapter, _ = lora_case
    merged = peft_merged(base, adapter, tmp_path / "merged", torch.float32)
    base_gguf = convert(str(base), ConvertOptions(file_type="F32", output=tmp_path / "base.gguf")).output
    lora_gguf = convert_lora(adapter, base, tmp_path / "lora.gguf").output
    merged_gguf = convert(str(merged), ConvertOptions(file_type="F32", output=tmp_path / "m.gguf")).output
    plain, want = _llama_logits(base_gguf), _llama_logits(merged_gguf)
    got = _llama_logits(base_gguf, lora_gguf)
    err = np.abs(got - want).max()
    assert err < 1e-3 * np.abs(want).max(), err
    assert np.abs(plain - want).max() > 100 * err  # the adapter does change the model
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_adapter_gguf_refusals(lora_case, synthetic_dir, tmp_path, capsys):
    base, adapter, _ = lora_case
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    narrow = _edited(adapter, tmp_path / "narrow", lambda t: {
        k: (v[:, :128].contiguous() if ".lora_A." in k else v) for k, v in t.items()})
    for bad, expect in ((narrow, "an adapter for another base model"),):
        code, _, err = run_cli(capsys, "convert", bad, "--to", "gguf", "--base", base, "-o", out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    moe = synthetic_dir("qwen3_moe")
    # PEFT on transformers 5 targets the fused expert parameters (target_parameters): refused on read
    fused = make_adapter(moe, tmp_path / "fused", ["gate_proj", "up_proj"])
    capsys.readouterr()
    code, _, err = run_cli(capsys, "convert", fused, "--to", "gguf", "--base", moe, "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "target_parameters" in err, err
    # per-expert Linears (the hub layout) merge, but have no LoRA GGUF form: the GGUF stacks them
    experts = tmp_path / "experts"
    experts.mkdir()
    shutil.copy2(adapter / "adapter_config.json", experts)
    gen = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.model.layers.0.mlp.experts.{x}.gate_proj.lora_{k}.weight":
               torch.randn(shape, generator=gen) for x in range(8) for k, shape in (("A", (8, 256)),
                                                                                   ("B", (256, 8)))},
              experts / "adapter_model.safetensors")
    code, _, err = run_cli(capsys, "convert", experts, "--to", "gguf", "--base", moe, "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "expert Linears" in err, err
    rs = tmp_path / "rs"
    shutil.copytree(adapter, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    code, _, err = run_cli(capsys, "convert", rs, "--to", "gguf", "--base", base, "-o", out)
    assert code == 2 and "use_rslora" in err
    assert not out.exists()
