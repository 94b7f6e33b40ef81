"""calib stage: calibration data → layer-sequential forward → activation statistics.

    from qconvert.calib import LayerwiseRunner, LayerStep, LinearStats, CalibStats
    from qconvert.calib.datasets import load_calibration, load_tokenizer
    from qconvert.calib.stats import save_stats, load_stats

The jobs that run on it (`qconvert calibrate`, `qconvert imatrix`) are in qconvert.pipelines.

Heavy imports (torch, transformers) happen when these modules are imported, not here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CalibStats", "LayerStep", "LayerwiseRunner", "LinearStats"]


def __getattr__(name: str) -> Any:  # lazy: `import qconvert.calib` stays cheap for the CLI
    if name in ("LayerwiseRunner", "LayerStep"):
        from qconvert.calib import runner

        return getattr(runner, name)
    if name in ("LinearStats", "CalibStats"):
        from qconvert.calib import stats

        return getattr(stats, name)
    raise AttributeError(name)
