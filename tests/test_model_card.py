"""The model card train_hf.py writes, read back by the Hub's own parser of model-card metadata."""

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
