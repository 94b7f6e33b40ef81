"""`qconvert convert --to gguf` on Mixture-of-Experts checkpoints, against llama.cpp's own two steps:
the vendored convert_hf_to_gguf.py --outtype bf16, then llama_model_quantize (libllama) to each file type.
Tensor for tensor byte-identical, KVs equal apart from general.* provenance; llama.cpp loads our file and
its logits match transformers'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qconvert.errors import BadInput
from qconvert.formats.gguf.imatrix import Imatrix, write_imatrix_gguf
from qconvert.pipelines.convert import ConvertOptions, convert
from tests.helpers import TOKENS, assert_convert_refused, assert_same_gguf, hf_logits, llama_logits
from tests.oracle.convert_hf import convert_hf_to_gguf
from tests.oracle.llamacpp import model_quantize

FT = gguf.LlamaFileType
Q = gguf.GGMLQuantizationType
# arch -> the pre-tokenizer name the converter's hash gives the real tokenizer the fixture's imitates
MOE = {"qwen3_moe": "qwen2", "olmoe": "smollm", "qwen2_moe": "qwen2", "mixtral": "smollm",
       "deepseek_v3": "smollm"}
# a representative set on qwen3_moe (8 experts), a smaller one on the other families (the rules are shared;
# what differs per family is the tensor set and KVs); the imatrix ones also exercise the per-expert slices
# (one expert without tokens)
FILE_TYPES = ["Q8_0", "Q4_K_M", "Q6_K", "Q2_K", "MXFP4_MOE"]
IMATRIX_FILE_TYPES = ["IQ4_XS", "IQ2_XS"]
OTHERS = list(MOE)[1:]
CASES = [("qwen3_moe", t) for t in FILE_TYPES] + [(a, t) for a in OTHERS for t in ("Q4_K_M", "MXFP4_MOE")]
IMATRIX_CASES = [("qwen3_moe", t) for t in IMATRIX_FILE_TYPES] + [(a, "IQ2_XS") for a in OTHERS]


@pytest.fixture(scope="module")
def reference_bf16(llamacpp_converter, synthetic_dir, tmp_path_factory):
    """arch -> (HF dir, the converter's BF16 GGUF of it), converted once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            model = synthetic_dir(arch)
            out = tmp_path_factory.mktemp(f"ref-{arch}") / f"{arch}-bf16.gguf"
            made[arch] = (model, convert_hf_to_gguf(llamacpp_converter, model, out, MOE[arch]))
        return made[arch]

    return get


def _convert(model: Path, out: Path, file_type: str, **kw) -> Path:
    convert(str(model), ConvertOptions(file_type=file_type, output=out, threads=2, **kw))
    return out


def _expert_imatrix(bf16: Path) -> Imatrix:
    """Random Σx² for every 2-D and expert tensor; expert 3 of every layer's gate stack saw no token, so its
    slice takes llama-quantize's all-ones weights."""
    rng = np.random.default_rng(7)
    entries = {}
    for t in gguf.GGUFReader(bf16).tensors:
        if not t.name.startswith("blk.") or len(t.shape) < 2:
            continue
        # experts: a count per expert; MLA's 3-D attn_k_b / attn_v_b: one count over every head's slice
        n_mat = int(t.shape[2]) if len(t.shape) > 2 else 1
        n_counts = n_mat if "_exps." in t.name else 1
        counts = rng.integers(20, 200, n_counts).astype(np.float32)
        if n_counts > 1 and "ffn_gate_exps" in t.name:
            counts[3] = 0
        sums = rng.gamma(2.0, 1.0, (n_counts, n_mat // n_counts * int(t.shape[0]))).astype(np.float32)
        sums *= counts[:, None]
        entries[t.name] = (sums, counts)
    return Imatrix(entries, datasets=["calib.txt"], chunk_count=10, chunk_size=512)


# ---------------------------------------------------------------- the converter's BF16 file

@pytest.mark.parametrize("arch", list(MOE))
def test_bf16_equals_convert_hf_to_gguf(arch, reference_bf16, tmp_path):
    model, ref = reference_bf16(arch)
    ours = _convert(model, tmp_path / "ours.gguf", "BF16")
    # the converter writes tensors in its own emit order; llama-quantize (and we) write llama.cpp's
    assert_same_gguf(ours, ref, order=False)
    r = gguf.GGUFReader(ours)
    cfg = json.loads((model / "config.json").read_text())
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
    last = cfg["num_hidden_layers"] - 1  # deepseek_v3's first layer is dense
    down = next(t for t in r.tensors if t.name == f"blk.{last}.ffn_down_exps.weight")
    expert_ff = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    assert down.tensor_type == Q.BF16 and tuple(down.shape) == (expert_ff, cfg["hidden_size"], n_exp)
    router = next(t for t in r.tensors if t.name == f"blk.{last}.ffn_gate_inp.weight")
    assert router.tensor_type == Q.F32
    assert r.fields["general.size_label"].contents() == gguf.GGUFReader(ref).fields[
        "general.size_label"].contents()


# ---------------------------------------------------------------- llama-quantize of it

@pytest.mark.parametrize(("arch", "file_type"), CASES)
def test_file_types_equal_llama_quantize(arch, file_type, reference_bf16, tmp_path):
    model, bf16 = reference_bf16(arch)
    ours = _convert(model, tmp_path / "ours.gguf", file_type)
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")))
    assert_same_gguf(ours, ref)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    if file_type == "Q4_K_M" and arch in ("qwen3_moe", "mixtral"):  # 8 experts: the n_expert == 8 rules
        assert types["blk.0.attn_k.weight"] == types["blk.0.attn_v.weight"] == Q.Q8_0
        assert types["blk.0.attn_output.weight"] == Q.Q5_K
    if file_type == "MXFP4_MOE":
        assert types["blk.3.ffn_down_exps.weight"] == Q.MXFP4 and types["blk.0.attn_output.weight"] == Q.Q8_0
        if arch == "deepseek_v3":  # every 3-D tensor, MLA's per-head attn_k_b / attn_v_b too
            assert types["blk.0.attn_k_b.weight"] == types["blk.0.attn_v_b.weight"] == Q.MXFP4


@pytest.mark.parametrize(("arch", "file_type"), IMATRIX_CASES)
def test_imatrix_file_types_equal_llama_quantize(arch, file_type, reference_bf16, tmp_path):
    model, bf16 = reference_bf16(arch)
    imx = _expert_imatrix(bf16)
    write_imatrix_gguf(tmp_path / "imatrix.gguf", imx)
    ours = _convert(model, tmp_path / "ours.gguf", file_type, imatrix=tmp_path / "imatrix.gguf")
    ref = tmp_path / "ref.gguf"
    kvs = {"quantize.imatrix.file": str(tmp_path / "imatrix.gguf"), "quantize.imatrix.dataset": "calib.txt",
           "quantize.imatrix.entries_count": len(imx.entries), "quantize.imatrix.chunks_count": 10}
    weights = {n: imx.weights(n) for n in imx.entries}
    model_quantize(bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")), imatrix=weights, kv_overrides=kvs)
    assert_same_gguf(ours, ref)


# ---------------------------------------------------------------- llama.cpp runs it like transformers

@pytest.mark.parametrize("arch", list(MOE))
def test_llama_cpp_logits_match_transformers(arch, synthetic_dir, tmp_path):
    """F32, not BF16 as for the dense families: llama.cpp rounds a BF16 matmul's activations to bf16, and
    top-k routing is not continuous (qwen2_moe's layer 0 routes one token with a 3e-4 margin between its
    2nd and 3rd expert, which that rounding flips). The weights are the checkpoint's bf16 values either
    way."""
    model = synthetic_dir(arch)
    out = _convert(model, tmp_path / "m.gguf", "F32")
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max(), f"max |Δlogit| {np.abs(got - ref).max():.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


# ---------------------------------------------------------------- transformers 5's fused layout

def _fuse(model: Path, out: Path) -> Path:
    """The checkpoint as transformers 5 holds it in memory: per layer one gate_up_proj [E, 2I, H] (gate rows
    first) and one down_proj [E, H, I] instead of a Linear per expert."""
    import re

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    tensors = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    n = cfg.get("num_local_experts") or cfg["num_experts"]
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    layers = sorted({int(m[1]) for k in tensors if (m := re.search(r"layers\.(\d+)\.mlp\.experts\.", k))})
    import torch

    for i in layers:
        p = f"model.layers.{i}.mlp.experts"
        gate = [tensors[f"{p}.{x}.gate_proj.weight"] for x in range(n)]
        up = [tensors[f"{p}.{x}.up_proj.weight"] for x in range(n)]
        fused[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1).contiguous()
        fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{x}.down_proj.weight"] for x in range(n)])
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_fused_experts_equal_the_per_expert_layout(synthetic_dir, reference_bf16, tmp_path):
    model, bf16 = reference_bf16("qwen3_moe")
    fused = _fuse(model, tmp_path / "fused")
    ours = _convert(fused, tmp_path / "fused.gguf", "Q4_K_M")
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, FT.MOSTLY_Q4_K_M)
    assert_same_gguf(ours, ref)


# ---------------------------------------------------------------- bad input: one line, no output

def _edit(model: Path, out: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    tensors = load_file(str(out / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_missing_expert_is_refused(synthetic_dir, tmp_path):
    model = _edit(synthetic_dir("qwen3_moe"), tmp_path / "m",
                  lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    assert_convert_refused(model, tmp_path, r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing")


def test_expert_shapes_that_disagree_are_refused(synthetic_dir, tmp_path):
    def shrink(t):
        name = "model.layers.1.mlp.experts.3.gate_proj.weight"
        t[name] = t[name][:128].clone()

    model = _edit(synthetic_dir("qwen3_moe"), tmp_path / "m", shrink)
    assert_convert_refused(model, tmp_path,
                           r"experts\.3\.gate_proj\.weight is BF16 \[128, 256\] but .* \[256, 256\]")


def test_fused_tensor_of_the_wrong_shape_is_refused(synthetic_dir, tmp_path):
    fused = _fuse(synthetic_dir("qwen3_moe"), tmp_path / "fused")

    def drop_expert(t):
        name = "model.layers.0.mlp.experts.gate_up_proj"
        t[name] = t[name][:7].clone()

    shutil.rmtree(tmp_path / "fused-bad", ignore_errors=True)
    model = _edit(fused, tmp_path / "fused-bad", drop_expert)
    assert_convert_refused(model, tmp_path,
                           r"fused expert tensor model\.layers\.0\.mlp\.experts\.gate_up_proj has shape "
                              r"\[7, 512, 256\], expected \[E, 2\*I, H\] with E=8")


def test_imatrix_with_another_expert_count_is_refused(synthetic_dir, tmp_path):
    bad = Imatrix({"blk.0.ffn_down_exps.weight": (np.ones((4, 256), np.float32), np.ones(4, np.float32))},
                  datasets=["x"], chunk_count=1, chunk_size=512)
    write_imatrix_gguf(tmp_path / "bad.gguf", bad)
    with pytest.raises(BadInput, match=r"blk\.0\.ffn_down_exps\.weight has 1024 values but the tensor needs "
                                       r"2048"):
        _convert(synthetic_dir("qwen3_moe"), tmp_path / "o.gguf", "Q4_K_M", imatrix=tmp_path / "bad.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_awq_refuses_mla_without_q_lora_in_one_line(synthetic_dir, calib_text, quantize_cli, capsys,
                                                    tmp_path):
    # AWQ on every MoE family: tests/methods/test_awq.py, tests/pipelines/test_quantize_moe.py. A deepseek_v3
    # without q_lora_rank projects q with one q_proj: MLA_BLOCK's q_a_proj/q_b_proj groups do not apply
    from transformers import AutoConfig, AutoModelForCausalLM

    src = synthetic_dir("deepseek_v3")
    cfg = AutoConfig.from_pretrained(src)
    cfg.q_lora_rank = None
    model = tmp_path / "m"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    capsys.readouterr()  # save_pretrained's progress bar
    code, out, err = quantize_cli(model, "--method", "awq", "--dataset", calib_text, "--num-samples", "2",
                                  "--seq-len", "32", "-o", tmp_path / "q")
    assert code == 2 and "self_attn.q_a_proj" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "q").exists()


def test_tied_lm_head_where_llama_cpp_needs_one_is_refused(synthetic_dir, tmp_path):
    """convert_hf_to_gguf.py writes a tied qwen2moe / olmoe without output.weight: llama.cpp cannot load
    it."""
    model = tmp_path / "m"
    shutil.copytree(synthetic_dir("olmoe"), model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    _edit(model, tmp_path / "tied", lambda t: t.pop("lm_head.weight"))
    assert_convert_refused(tmp_path / "tied", tmp_path,
                           r"llama\.cpp's olmoe loader needs an lm_head \(output\.weight\)")


# ---------------------------------------------------------------- inspect

def test_inspect_shows_experts_and_their_types(synthetic_dir, tmp_path):
    from qconvert.load.summary import inspect

    model = synthetic_dir("qwen3_moe")
    out = _convert(model, tmp_path / "q.gguf", "Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    g = inspect(out)["experts"]
    assert (g["count"], g["used"]) == (8, 2)
    assert {s["name"]: s["type"] for s in g["stacks"]} == {n: t for n, t in types.items() if "_exps." in n}
    assert all(s["experts"] == 8 for s in g["stacks"]) and len(g["stacks"]) == 3 * 4
    hf = inspect(model)["experts"]
    assert (hf["count"], hf["used"]) == (8, 2) and len(hf["stacks"]) == 3 * 4
    assert {s["type"] for s in hf["stacks"]} == {"BF16"} and all(s["experts"] == 8 for s in hf["stacks"])
    assert "model.layers.0.mlp.experts.*.gate_proj.weight" in {s["name"] for s in hf["stacks"]}
    assert inspect(synthetic_dir("llama"))["experts"] is None


@pytest.mark.parametrize(("arch", "routers"), [("mixtral", ["block_sparse_moe.gate"]),
                                               ("qwen2_moe", ["mlp.gate", "mlp.shared_expert_gate"])])
def test_data_free_quantize_keeps_routers(arch, routers, synthetic_dir, quantize_cli, tmp_path):
    """rtn quantizes each expert under its own name and keeps the routers as they are (every family's)."""
    from safetensors import safe_open

    code, out, err = quantize_cli(synthetic_dir(arch), "--method", "rtn", "-o", tmp_path / "q")
    assert code == 0, err
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for r in routers:
            assert f.get_slice(f"model.layers.0.{r}.weight").get_dtype() == "BF16"
            packed = [n for n in names if n.startswith(f"model.layers.0.{r}.") and not n.endswith(".weight")]
            assert not packed
    expert = "block_sparse_moe.experts.3.w2" if arch == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{expert}.qweight" in names


def test_deepseek_v3_yarn_rope_kvs_equal_convert_hf_to_gguf(llamacpp_converter, synthetic_dir, tmp_path):
    """DeepSeek-V3's own rope settings (yarn x40 from 4096, beta 32/1, mscale_all_dim 1): the yarn KVs and the
    legacy 0.1 x mscale_all_dim log multiplier, as the converter writes them."""
    model = tmp_path / "ds"
    shutil.copytree(synthetic_dir("deepseek_v3"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 163840
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(cfg))
    ref = convert_hf_to_gguf(llamacpp_converter, model, tmp_path / "ref.gguf", MOE["deepseek_v3"])
    ours = _convert(model, tmp_path / "ours.gguf", "BF16")
    assert_same_gguf(ours, ref, order=False)
    kv = gguf.GGUFReader(ours).fields
    assert kv["deepseek2.rope.scaling.yarn_beta_fast"].contents() == 32.0
    assert kv["deepseek2.rope.scaling.yarn_log_multiplier"].contents() == pytest.approx(0.1)
