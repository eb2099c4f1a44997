"""Evaluation helpers that work offline."""

from pathlib import Path

import evaluate
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

FGVC_ACCURACY_PATH = Path(__file__).resolve().parent / "fgvc_accuracy"


def load_fgvc_accuracy(**kwargs):
    """Load the FGVC accuracy metric (top-1, top-5, mean per-class) shipped with this package.

    Metrics loaded by name come from the Hub, which is out of reach offline; this module loads from the package
    folder instead. Keyword arguments such as
    `process_id`, `num_process` and `experiment_id` are passed to `evaluate.load`.
    """
    return evaluate.load(str(FGVC_ACCURACY_PATH), **kwargs)


@torch.no_grad()
def rank_classes(model, dataloader, accelerator, progress: bool = False, even: bool = True) -> dict[str, list]:
    """Run `model` over `dataloader` ({"pixel_values", "labels"} batches, prepared by `accelerator`) and gather, from
    every process and without the padding that evens out the last batch: "rankings", the top-5 class ids of each image
    best first; "probabilities", their probabilities (softmax of the logits); "references", the true class ids;
    "losses", each image's cross-entropy. The model is left in eval mode. With `even` False (a streamed split, whose
    processes' shares differ in length) each process keeps its results until the end, when they are gathered in
    process order."""
    model.eval()
    rankings, probabilities, references, losses = [], [], [], []
    for batch in tqdm(dataloader, desc="evaluating", disable=not (progress and accelerator.is_local_main_process)):
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        top = logits.softmax(-1).topk(min(5, logits.shape[-1]))
        ranking, probability, labels = top.indices, top.values, batch["labels"]
        if even:
            ranking, probability, labels, loss = accelerator.gather_for_metrics((ranking, probability, labels, loss))
        rankings += ranking.tolist()
        probabilities += probability.tolist()
        references += labels.tolist()
        losses += loss.tolist()
    results = {"rankings": rankings, "probabilities": probabilities, "references": references, "losses": losses}
    if not even and accelerator.num_processes > 1:
        results = {key: gather_object(values) for key, values in results.items()}
    return results
