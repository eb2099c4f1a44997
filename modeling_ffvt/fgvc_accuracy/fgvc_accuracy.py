"""Top-1, top-5 and mean per-class accuracy for fine-grained classification, as a local `evaluate` metric.

Loadable without the Hub: `evaluate.load("path/to/fgvc_accuracy")`, or `modeling_ffvt.evaluation.load_fgvc_accuracy()`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy metrics for fine-grained visual classification (FGVC), as reported for FFVT on CUB-200-2011,
Stanford Dogs, Cotton and Soy.Loc:

- accuracy: fraction of examples whose best-ranked prediction is the reference (top-1 accuracy);
- top5_accuracy: fraction of examples whose reference is among the first min(5, k) ranked predictions;
- mean_per_class_accuracy: top-1 accuracy computed per class, averaged over the classes present in the references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each example, class indices ranked by score, best first
        (at least one; only the first five are used), e.g. `logits.topk(min(5, num_classes)).indices`.
    references (`list` of `int`): the true class index of each example.

Returns:
    accuracy (`float`): top-1 accuracy, in [0, 1].
    top5_accuracy (`float`): top-5 accuracy, in [0, 1]; equals top-1 accuracy when one prediction is given.
    mean_per_class_accuracy (`float`): mean over the classes present in `references` of their top-1 accuracy.

Examples:
    >>> metric = evaluate.load("modeling_ffvt/fgvc_accuracy")
    >>> metric.compute(predictions=[[0, 1], [2, 1], [1, 0]], references=[0, 1, 1])
    {'accuracy': 0.6666666666666666, 'top5_accuracy': 1.0, 'mean_per_class_accuracy': 0.75}
"""

_CITATION = """\
@inproceedings{wang2021ffvt,
  title={Feature Fusion Vision Transformer for Fine-Grained Visual Categorization},
  author={Wang, Jun and Yu, Xiaohan and Gao, Yongsheng},
  booktitle={British Machine Vision Conference (BMVC)},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FgvcAccuracy(evaluate.Metric):
    """Top-1, top-5 and mean per-class accuracy from ranked class predictions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if any(len(ranked) == 0 for ranked in predictions):
            raise ValueError("every example needs at least one ranked prediction")
        references = np.asarray(references, dtype=np.int64)
        top1 = np.array([ranked[0] for ranked in predictions]) == references
        top5 = np.array([reference in ranked[:5] for ranked, reference in zip(predictions, references)])
        per_class = [top1[references == label].mean() for label in np.unique(references)]
        return {
            "accuracy": float(top1.mean()),
            "top5_accuracy": float(top5.mean()),
            "mean_per_class_accuracy": float(np.mean(per_class)),
        }
