"""Quantize methods: one registry entry each, its module imported only when it runs (the CLI stays light).

Each module defines ``Config`` (a frozen dataclass of the options it takes; ``check()``, ``spec()`` — the
weight grid before a format adapts it — and ``pack_options()``) and ``run(job)`` (methods/plan.py).
Adding a method: one module and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from qconvert.errors import BadInput


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # defines Config and run(job)
    default_format: str  # --format when none is given: the method's native layout
    help: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def make_config(self, given: dict[str, Any]) -> Any:
        """The method's Config from the options the user gave; an option the method does not take is
        refused (it would be silently ignored otherwise)."""
        config_type = self.load().Config
        known = set(config_type.__dataclass_fields__)
        for key in given:
            if key not in known:
                raise BadInput(f"--{key.replace('_', '-')} does not apply to --method {self.name}")
        return config_type(**given)


METHODS = {m.name: m for m in (
    Method("gptq", "qconvert.methods.gptq_layerwise", "gptq", "GPTQ (calibrated, layer by layer)"),
    Method("rtn", "qconvert.methods.rtn", "gptq", "round-to-nearest (no data)"),
    Method("awq", "qconvert.methods.awq_block", "awq", "activation-aware scaling + clipping (calibrated)"),
    Method("fp8", "qconvert.methods.fp8", "compressed-tensors", "E4M3 weights (see --scheme)"),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise BadInput(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
