"""The model card train_hf.py writes, read back by the Hub's own parser of model-card metadata."""

import ast
import shlex

import pytest
from huggingface_hub import ModelCard

from modeling_ffvt.model_card import METRICS, write_model_card

BEST = {
    "eval_accuracy": 0.8312345,
    "eval_top5_accuracy": 0.96875,
    "eval_mean_per_class_accuracy": 0.82,
    "eval_loss": 0.61,
    "step": 400,
}


def test_model_index_reads_back_to_the_card_numbers(tmp_path):
    write_model_card(
        tmp_path, repo_id="user/ffvt-cub", dataset="CUB-200-2011", dataset_id="user/cub", base_model=None,
        num_classes=200, hyperparameters={"learning rate": 0.02}, best=BEST,
    )
    card = ModelCard.load(tmp_path / "README.md")
    results = {result.metric_name: result for result in card.data.eval_results}
    assert sorted(results) == sorted(name for _, name, _ in METRICS)
    for _, name, key in METRICS:
        result = results[name]
        assert result.metric_value == round(BEST[key], 4)
        assert f"| {name} | {BEST[key]:.4f} |" in card.text  # the table shows what the model-index holds
        assert (result.task_type, result.dataset_name, result.dataset_split) == (
            "image-classification", "CUB-200-2011", "validation"
        )
    assert card.data.model_name == "user/ffvt-cub"
    assert "`ffvt-demo --model user/ffvt-cub`" in card.text
    assert "`ffvt-demo --model user/ffvt-cub --write_space space`" in card.text


def test_names_are_written_literally(tmp_path):
    """A run folder, data set and start path with Markdown, HTML and maths characters: the rendered card shows them as
    they are, and its snippets run with them (the id as one Python string, one shell word)."""
    markdown_it = pytest.importorskip("markdown_it")
    repo_id, dataset = "run <3> & $5 `x` *y* #", "birds_of_<b>$1 | $2</b> & 'é' \"q\""
    start = "runs/$HOME/*best*|[x](y)"
    write_model_card(
        tmp_path, repo_id=repo_id, dataset=dataset, dataset_id=None, base_model=None, num_classes=3,
        hyperparameters={"start": start}, best=BEST, evaluated="test",
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == repo_id and card.data.eval_results[0].dataset_name == dataset
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(card.text)
    shown = [rendered(token) for token in tokens if token.type == "inline"]
    assert shown[0] == repo_id  # the heading
    assert any(f"classes of {dataset}," in text for text in shown)
    assert start in shown  # its cell of the training table
    code = [token.content for token in tokens if token.type == "fence"][0]
    (call,) = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call) and node.keywords]
    assert ast.literal_eval(call.keywords[0].value) == repo_id
    spans = [child.content for token in tokens if token.type == "inline" for child in token.children
             if child.type == "code_inline" and child.content.startswith("ffvt-demo")]
    assert [shlex.split(span) for span in spans] == [["ffvt-demo", "--model", repo_id],
                                                     ["ffvt-demo", "--model", repo_id, "--write_space", "space"]]


def rendered(inline) -> str:
    """The text an inline token shows: its children's text, code and softbreaks, without markup."""
    return "".join(child.content if child.type in ("text", "code_inline") else " " if child.type == "softbreak"
                   else "" for child in inline.children)


def test_a_baseline_card_and_hint_claim_no_maws(tmp_path):
    """A model trained with --no_feature_fusion has no fusion layer for MAWS to feed: its card says it is the baseline,
    promises no MAWS picks in the demo, and the hint after training offers no selection map (which ffvt-predict
    refuses for it), even where a selection map lies in its folder."""
    from train_hf import next_steps

    (tmp_path / "selection_map.png").write_bytes(b"")  # left by a fusion model trained into the same folder
    for fusion in (True, False):
        write_model_card(tmp_path, repo_id="ffvt-cub", dataset="CUB", dataset_id=None, base_model=None, num_classes=3,
                         hyperparameters={}, best=BEST, evaluated="test", feature_fusion=fusion)
        text = (tmp_path / "README.md").read_text()
        assert ("This model is the baseline without feature fusion" in text) is not fusion
        assert ("the tokens MAWS picked in each layer" in text) is fusion
        assert ("## What MAWS picks" in text) is fusion
        assert ("--selection_map" in next_steps(tmp_path, None, "--data_dir val", fusion)) is fusion
