"""The layer-sequential engine computes the same statistics as a plain full-model forward with hooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from qconvert.calib.model import attn_implementation
from qconvert.calib.runner import LayerwiseRunner
from qconvert.load import open_checkpoint

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
SEQ = 48


def _small_window(src: Path, dst: Path) -> Path:
    """A view of a synthetic checkpoint whose sliding window (if any) is shorter than the test sequences, so
    sliding and full attention layers really differ."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("sliding_window"):
        cfg["sliding_window"] = 16
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _tokens(vocab: int, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n, SEQ), generator=g)


def _reference_stats(model_dir: Path, tokens: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Full model in float32, one forward over all samples, hooks on every nn.Linear (no engine code)."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation=attn_implementation(cfg)
    ).eval()
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        return lambda _m, args: seen.setdefault(name, []).append(
            args[0].reshape(-1, args[0].shape[-1]).clone()
        )

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(hook(name))
    with torch.inference_mode():
        model(input_ids=tokens, use_cache=False)
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs).double()
        out[name] = {
            "hessian": x.T @ x,
            "abs_sum": x.abs().sum(0),
            "sq_sum": (x * x).sum(0),
            "abs_max": x.abs().amax(0),
            "count": x.shape[0],
        }
    return out


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.double(), want.double()
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item() / scale
    assert err < 2e-5, f"{what}: max error {err:.2e} relative to the largest value"


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_full_forward(arch: str, synthetic_dir, tmp_path: Path) -> None:
    model_dir = _small_window(synthetic_dir(arch), tmp_path / arch)
    ckpt = open_checkpoint(model_dir)
    tokens = _tokens(int(ckpt.config.get("vocab_size", 256)))
    got = LayerwiseRunner(ckpt, device="cpu", dtype="f32", batch_size=2).run(tokens, lm_head_stats=True)
    want = _reference_stats(model_dir, tokens)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, ref in want.items():
        st = got[name]
        assert st.count == ref["count"] == tokens.numel()
        for kind in ("hessian", "abs_sum", "sq_sum", "abs_max"):
            _close(getattr(st, kind), ref[kind], f"{arch} {name} {kind}")


def test_shared_inputs_share_one_stats_object(synthetic_dir) -> None:
    ckpt = open_checkpoint(synthetic_dir("llama"))
    got = LayerwiseRunner(ckpt, device="cpu", dtype="f32").run(_tokens(256, 1), kinds="sq_sum")
    q, k, v = (got[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert got["model.layers.0.mlp.gate_proj"] is got["model.layers.0.mlp.up_proj"]
    assert got["model.layers.0.self_attn.o_proj"] is not q
    assert q.hessian is None and q.abs_max is None and q.sq_sum is not None  # only what was asked


def test_spilled_activations_give_the_same_stats(synthetic_dir, tmp_path: Path) -> None:
    ckpt = open_checkpoint(synthetic_dir("qwen3"))
    tokens = _tokens(256)
    mem = LayerwiseRunner(ckpt, device="cpu", dtype="f32", batch_size=2).run(tokens, kinds="sq_sum,abs_max")
    disk = LayerwiseRunner(ckpt, device="cpu", dtype="f32", batch_size=2, offload_dir=tmp_path).run(
        tokens, kinds="sq_sum,abs_max"
    )
    for name in mem:
        assert torch.equal(mem[name].sq_sum, disk[name].sq_sum), name
        assert torch.equal(mem[name].abs_max, disk[name].abs_max), name
    assert not any(tmp_path.rglob("*.pt")), "spill files must be removed"


def test_on_layer_changes_propagate(synthetic_dir, tmp_path: Path) -> None:
    """Quantize-as-you-go: weights replaced by on_layer feed the next layer (only when it returns True)."""
    src = synthetic_dir("llama")
    ckpt = open_checkpoint(src)
    tokens = _tokens(256, 2)
    calls = []

    def halve_down_proj(step) -> bool:
        calls.append((step.index, step.name, sorted(step.stats)[:1]))
        if step.index == 1:
            step.module.mlp.down_proj.weight.mul_(0.5)
            return True
        return False

    got = LayerwiseRunner(ckpt, device="cpu", dtype="f32").run(
        tokens, kinds="sq_sum", on_layer=halve_down_proj
    )
    assert [c[0] for c in calls] == list(range(int(ckpt.config["num_hidden_layers"])))
    assert calls[1][1] == "model.layers.1"
    # reference: the same change made to a full model before its forward
    from safetensors.torch import load_file, save_file

    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    weights = next(edited.glob("*.safetensors"))
    sd = load_file(str(weights))
    sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"] * 0.5
    save_file(sd, str(weights), metadata={"format": "pt"})
    want = _reference_stats(edited, tokens)
    for name in (
        "model.layers.1.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.3.mlp.down_proj",
    ):
        _close(got[name].sq_sum, want[name]["sq_sum"], name)
    # step.forward() reruns the layer with its current weights
    outs = []
    LayerwiseRunner(ckpt, device="cpu", dtype="f32").run(
        tokens, kinds="sq_sum", on_layer=lambda s: outs.append(s.forward()) if s.index == 0 else None
    )
    assert len(outs) == 1 and [o.shape for o in outs[0]] == [(1, SEQ, int(ckpt.config["hidden_size"]))] * 2
