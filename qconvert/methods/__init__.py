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
from qconvert.methods.types import SCHEMES


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
        scheme = given.get("scheme")
        if scheme is not None:
            check_scheme(scheme, self.name)
        config_type = self.load().Config
        known = set(config_type.__dataclass_fields__)
        for key in given:
            if key not in known:
                raise BadInput(f"--{key.replace('_', '-')} does not apply to --method {self.name}")
        return config_type(**given)


def check_scheme(scheme: str, method_name: str) -> None:
    """A --scheme the method does not find is refused, naming the methods that do (from SCHEMES)."""
    if scheme not in SCHEMES:
        raise BadInput(f"--scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    offered = SCHEMES[scheme].methods
    if method_name not in offered:
        raise BadInput(f"--scheme {scheme} is not offered by --method {method_name}; use --method "
                       f"{' or '.join(offered)}")


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
