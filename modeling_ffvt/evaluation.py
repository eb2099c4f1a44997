"""Evaluation helpers that work offline."""

from pathlib import Path

import evaluate

FGVC_ACCURACY_PATH = Path(__file__).resolve().parent / "fgvc_accuracy"


def load_fgvc_accuracy(**kwargs):
    """Load the FGVC accuracy metric (top-1, top-5, mean per-class) shipped with this package.

    Metrics loaded by name come from the Hub, which is out of reach offline; this module loads from the package
    folder instead. Keyword arguments such as
    `process_id`, `num_process` and `experiment_id` are passed to `evaluate.load`.
    """
    return evaluate.load(str(FGVC_ACCURACY_PATH), **kwargs)
