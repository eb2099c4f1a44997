"""The model card (README.md with the YAML the Hub reads) and its selection-map picture, for a folder train_hf.py
saved."""

import json
import re
import shlex
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModelForImageClassification

from .data import load_rgb
from .image_processor import load_image_processor
from .inputs import quiet_progress_bars
from .selection_map import selection_map

SELECTION_MAP_FILE = "selection_map.png"
CITATION = """@inproceedings{wang2021ffvt,
  title={Feature Fusion Vision Transformer for Fine-Grained Visual Categorization},
  author={Wang, Jun and Yu, Xiaohan and Gao, Yongsheng},
  booktitle={British Machine Vision Conference (BMVC)},
  year={2021},
  eprint={2107.02341},
  archivePrefix={arXiv}
}"""


# The characters that can start Markdown markup inside a line (CommonMark, GitHub's tables, the `$` of the Hub's and
# Gradio's maths, a heading's closing `#`), each escaped with a backslash where names are written as text.
_MARKDOWN_MARKUP = re.compile(r"([\\`*_\[\]<>&|$~#])")


def markdown_text(text) -> str:
    """`text` (a class, data set or model name) as Markdown that renders it literally, on one line."""
    return _MARKDOWN_MARKUP.sub(r"\\\1", " ".join(str(text).splitlines()))


def _code_span(text: str) -> str:
    """`text` as a Markdown code span, fenced by more backticks than it holds in a row."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


# (metric type, name shown, key of the evaluation results)
METRICS = [
    ("accuracy", "Top-1 accuracy", "eval_accuracy"),
    ("accuracy", "Top-5 accuracy", "eval_top5_accuracy"),
    ("accuracy", "Mean per-class accuracy", "eval_mean_per_class_accuracy"),
]


def draw_card_selection_map(output_dir, image) -> None:
    """The MAWS selection map of one validation image, drawn by the model saved in `output_dir`, for its card; for a
    model without feature fusion none, and a map an earlier model left in the folder (--overwrite_output_dir) is
    removed, so that neither the card nor an upload shows picks this model never made."""
    with quiet_progress_bars():
        model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    if not model.config.feature_fusion:
        Path(output_dir, SELECTION_MAP_FILE).unlink(missing_ok=True)
        return
    with torch.no_grad():
        picture, _ = selection_map(model, load_image_processor(output_dir), load_rgb(image))
    picture.save(Path(output_dir, SELECTION_MAP_FILE))


def dataset_title(dataset: str, subset: str | None = None) -> str:
    """How cards and messages name data: "NAME", or "NAME (SUBSET)" for a subset (configuration) of a data set."""
    return dataset if subset is None else f"{dataset} ({subset})"


def write_model_card(
    output_dir, *, repo_id: str, dataset: str, dataset_id: str | None, base_model: str | None, num_classes: int,
    hyperparameters: dict, best: dict, evaluated: str = "validation", held_out: float | None = None,
    feature_fusion: bool = True, dataset_config: str | None = None,
) -> None:
    """README.md in `output_dir` for the model saved there (`feature_fusion` False: the baseline without a fusion
    layer, which MAWS does not feed).

    `dataset` names the data (its Hub id, or a local folder's name) and `dataset_config` its subset, if any: the
    model-index's `dataset` gets them as `type` and `config` (the Hub's schema: {type, name, config, split}), its
    `name` and the prose "NAME (SUBSET)"; `dataset_id` and `base_model` are Hub ids for the YAML (None for local
    data or starts); `hyperparameters` become the training table, name to value; `best` holds the evaluation results
    of the saved model (METRICS' keys, "eval_loss" and "step"), on the split named `evaluated` ("test",
    "validation", ...) or, when `held_out` is a fraction, on that part of train held out from training.
    """
    title = dataset_title(dataset, dataset_config)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["ffvt", "image-classification", "fine-grained", "vision"],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        base_model=base_model,
        model_name=repo_id,
        eval_results=[
            EvalResult(
                task_type="image-classification", dataset_type=dataset, dataset_name=title,
                dataset_config=dataset_config, dataset_split=evaluated, metric_type=metric_type, metric_name=name,
                metric_value=round(best[key], 4),
            )
            for metric_type, name, key in METRICS
        ],
    )
    rows = "\n".join(f"| {markdown_text(name)} | {markdown_text(value)} |" for name, value in hyperparameters.items())
    # The id as a Python string and as one shell word, so that the snippets run whatever characters it holds.
    repo = json.dumps(repo_id, ensure_ascii=False)
    demo, space = (_code_span(f"ffvt-demo --model {shlex.quote(repo_id)}{flags}")
                   for flags in ("", " --write_space space"))
    results_on = (f"the {markdown_text(evaluated)} split" if held_out is None
                  else f"the validation split ({held_out:.0%} of train, held out from training)")
    scores = "\n".join(f"| {name} | {best[key]:.4f} |" for _, name, key in METRICS)
    selection_map_section = ""
    if feature_fusion and Path(output_dir, SELECTION_MAP_FILE).exists():
        selection_map_section = f"""
## What MAWS picks

![MAWS selection map of a validation image]({SELECTION_MAP_FILE})

For one validation image, the patches MAWS picked in each layer before the fusion layer (outlined), and how often
each patch was picked across layers.
"""
    baseline = ("" if feature_fusion else "\n\nThis model is the baseline without feature fusion: the backbone's own "
                "last layer and LayerNorm read by a new head, with no fusion layer and no MAWS, trained with "
                "`train_hf.py --no_feature_fusion` to compare with FFVT.")
    demo_maws = " and the tokens MAWS picked in each layer" if feature_fusion else ""
    body = f"""
# {markdown_text(repo_id)}

An FFVT (Feature Fusion Vision Transformer) image classifier for the {num_classes} classes of {markdown_text(title)},
trained with `train_hf.py` of modeling_ffvt, the Transformers port of [FFVT](https://github.com/Markin-Wang/FFVT)
(Wang, Yu and Gao, BMVC 2021, [arXiv:2107.02341](https://arxiv.org/abs/2107.02341)). FFVT is a ViT whose last layer
attends only to the CLS token and to the tokens that mutual attention weight selection (MAWS) picks from every
earlier layer, which suits fine-grained categorisation.{baseline}

## How to use

```python
from transformers import pipeline

classifier = pipeline("image-classification", model={repo}, trust_remote_code=True)
classifier("image.jpg")
```

or with the Auto classes:

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained({repo})
model = AutoModelForImageClassification.from_pretrained({repo}, trust_remote_code=True)
logits = model(**processor(Image.open("image.jpg").convert("RGB"), return_tensors="pt")).logits
print(model.config.id2label[logits.argmax(-1).item()])
```

To try it in a browser, install modeling_ffvt (the package that wrote this card) with its `demo` extra and run
{demo}: a Gradio page at <http://127.0.0.1:7860> shows the five most probable classes of an
uploaded image{demo_maws}. {space} writes
that page as a folder to push as a Hugging Face Space.

## Training

| hyper-parameter | value |
|---|---|
{rows}

## Results

On {results_on}, at step {best["step"]} (the best top-1 accuracy of the run):

| metric | value |
|---|---|
{scores}
| Evaluation loss | {best["eval_loss"]:.4f} |
{selection_map_section}
## Citation

```bibtex
{CITATION}
```
"""
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(Path(output_dir, "README.md"))
