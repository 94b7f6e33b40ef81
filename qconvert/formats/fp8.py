"""FP8 checkpoints (checkpoint-formats.md §4): compressed-tensors ``float-quantized`` and vLLM's ``fp8``.

compressed-tensors (llm-compressor's presets; config built with the compressed-tensors classes):
    dynamic  FP8_DYNAMIC  weight [N,K] e4m3, weight_scale [N,1] (model dtype); per-token dynamic inputs
    static   FP8          weight_scale [1]; input_scale [1] from calibration
    block    FP8_BLOCK    weight_scale [N/128, K/128]; inputs dynamic per group of 128
vLLM ``fp8`` (AutoFP8 / DeepSeek layouts; float32 scales):
    dynamic / static  weight_scale 0-d (one per tensor: the only weight granularity this method stores),
                      input_scale 0-d when static; ``activation_scheme``
    block             weight_scale_inv [N/128, K/128] + ``weight_block_size`` (transformers' fine-grained FP8
                      reads it too); block checkpoints must be dynamic

A format maps (scheme, model dtype) to the method's FP8Spec and names the tensors; it never sees how the
scales were found.
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInput
from qconvert.methods.fp8 import FP8Spec, FP8Tensor

SCHEMES = ("dynamic", "static", "block")
BLOCK = (128, 128)


class CompressedTensorsFP8Format:
    name = "compressed-tensors"
    FORMAT = "float-quantized"

    def spec(self, scheme: str, model_dtype: str) -> FP8Spec:
        strategy = {"dynamic": "channel", "static": "tensor", "block": "block"}[scheme]
        return FP8Spec(strategy=strategy, block=BLOCK, scale_dtype=model_dtype)

    def pack(
        self, prefix: str, qt: FP8Tensor, in_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": qt.float8(), f"{prefix}.weight_scale": qt.stored_scale()}
        if in_scale is not None:
            out[f"{prefix}.input_scale"] = in_scale.to(qt.stored_scale().dtype).reshape(1)
        return out

    def quantization_config(self, scheme: str, skipped: list[str], *, lm_head: bool = False) -> dict:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        if scheme == "dynamic":
            weights = QuantizationArgs(**fp8, strategy="channel", dynamic=False)
            inputs = QuantizationArgs(**fp8, strategy="token", dynamic=True)
        elif scheme == "static":
            weights = QuantizationArgs(**fp8, strategy="tensor", dynamic=False)
            inputs = QuantizationArgs(**fp8, strategy="tensor", dynamic=False, observer="static_minmax")
        else:
            weights = QuantizationArgs(**fp8, strategy="block", dynamic=False, block_structure=list(BLOCK))
            inputs = QuantizationArgs(**fp8, strategy="group", group_size=BLOCK[1], dynamic=True)
        group = QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=inputs, format=self.FORMAT
        )
        ignore = sorted(set(skipped) | (set() if lm_head else {"lm_head"}))
        cfg = QuantizationConfig(
            config_groups={"group_0": group},
            format=self.FORMAT,
            quantization_status="compressed",
            ignore=ignore,
        )
        return {
            "version": compressed_tensors.__version__,
            "quant_method": "compressed-tensors",
            "sparsity_config": {},
            "transform_config": {},
            **cfg.model_dump(exclude={"quant_method"}),
        }


class VLLMFP8Format:
    name = "fp8"

    def spec(self, scheme: str, model_dtype: str) -> FP8Spec:
        return FP8Spec(
            strategy="block" if scheme == "block" else "tensor", block=BLOCK, scale_dtype="float32"
        )

    def pack(
        self, prefix: str, qt: FP8Tensor, in_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if qt.spec.strategy == "block":
            return {f"{prefix}.weight": qt.float8(), f"{prefix}.weight_scale_inv": qt.stored_scale()}
        if qt.spec.strategy != "tensor":
            raise BadInput(f"{prefix}: the fp8 format stores one weight scale per tensor or per block")
        out = {f"{prefix}.weight": qt.float8(), f"{prefix}.weight_scale": qt.stored_scale().reshape(())}
        if in_scale is not None:
            out[f"{prefix}.input_scale"] = in_scale.float().reshape(())
        return out

    def quantization_config(self, scheme: str, skipped: list[str], *, lm_head: bool = False) -> dict:
        ignored = sorted(set(skipped) | (set() if lm_head else {"lm_head"}))
        cfg: dict = {
            "quant_method": "fp8",
            "activation_scheme": "static" if scheme == "static" else "dynamic",
            "ignored_layers": ignored,
        }
        if scheme == "block":
            cfg["weight_block_size"] = list(BLOCK)
            cfg["fmt"] = "e4m3"
        return cfg


FORMATS = {"compressed-tensors": CompressedTensorsFP8Format, "fp8": VLLMFP8Format}
