"""ffvt-predict prints the model's softmax over the saved processor's output, as a table or JSON."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import digit_image, pipeline_scores, randomized, save_tiny_model, tiny_config
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.predict import main, selection_map_paths
from modeling_ffvt.selection_map import draw_selection_map, model_input_image, selection_map

LABELS = {i: f"digit_{i}" for i in range(5)}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ffvt-tiny")
    return save_tiny_model(folder, list(LABELS.values())), folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three digits in a folder tree, saved as grey, RGBA and palette PNGs."""
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    grey = [digit_image(index) for index in range(3)]
    paths = [root / "a.png", root / "nested" / "b.png", root / "nested" / "c.png"]
    grey[0].save(paths[0])
    grey[1].convert("RGBA").save(paths[1])
    grey[2].convert("P").save(paths[2])
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return root, paths


def expected_probabilities(model, paths):
    processor = make_image_processor(32, 36)
    pixel_values = processor([Image.open(path).convert("RGB") for path in paths], return_tensors="pt").pixel_values
    with torch.no_grad():
        return model(pixel_values).logits.softmax(-1)


def test_json_probabilities_are_the_models_softmax(saved_model, images, capsys):
    model, folder = saved_model
    root, paths = images
    main([str(root), "--model", str(folder), "--top_k", "3", "--json", "--batch_size", "2"])
    results = json.loads(capsys.readouterr().out)
    assert [result["file"] for result in results] == [str(path) for path in paths]
    probabilities = expected_probabilities(model, paths)
    for result, expected in zip(results, probabilities):
        top = expected.topk(3)
        assert [p["rank"] for p in result["predictions"]] == [1, 2, 3]
        assert [p["id"] for p in result["predictions"]] == top.indices.tolist()
        assert [p["label"] for p in result["predictions"]] == [LABELS[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], top.values, atol=1e-6)


def test_probabilities_are_pipelines_on_jpegs_of_every_size(saved_model, photos, capsys):
    """What pipeline("image-classification") gives on the whole image, also for JPEGs that Pillow's draft would
    decode at an eighth, a quarter or a half of their size; --reduced_decoding trades that for speed on those."""
    _, folder = saved_model
    main([*map(str, photos), "--model", str(folder), "--json"])
    results = json.loads(capsys.readouterr().out)
    expected = pipeline_scores(folder, photos)
    for result, scores in zip(results, expected, strict=True):
        assert {p["label"]: p["probability"] for p in result["predictions"]} == pytest.approx(scores, abs=1e-5)

    main([*map(str, photos), "--model", str(folder), "--json", "--reduced_decoding"])
    reduced = json.loads(capsys.readouterr().out)
    moved = [max(abs(p["probability"] - scores[p["label"]]) for p in result["predictions"])
             for result, scores in zip(reduced, expected, strict=True)]
    assert min(moved[:3]) > 1e-4 and moved[3] < 1e-5, moved


def test_table(saved_model, images, capsys):
    model, folder = saved_model
    _, paths = images
    main([str(paths[1]), str(paths[0]), "--model", str(folder)])  # top_k defaults to 5, all classes here
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "rank", "label", "probability"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 10
    probabilities = expected_probabilities(model, [paths[1], paths[0]])
    for row, (file, rank) in zip(rows, [(path, rank) for path in (paths[1], paths[0]) for rank in range(5)]):
        expected = probabilities[0 if file == paths[1] else 1].sort(descending=True)
        assert row[:3] == [str(file), str(rank + 1), LABELS[expected.indices[rank].item()]]
        assert abs(float(row[3]) - expected.values[rank].item()) <= 5e-5


def test_selection_maps(saved_model, images, tmp_path, capsys):
    model, folder = saved_model
    root, paths = images
    main([str(root), "--model", str(folder), "--json", "--selection_map", str(tmp_path / "maps" / "picks.png")])
    results = json.loads(capsys.readouterr().out)
    written = [tmp_path / "maps" / f"picks_{stem}.png" for stem in ("a", "b", "c")]
    assert [result["selection_map"] for result in results] == [str(path) for path in written]
    for path, image in zip(written, paths):
        expected, _ = selection_map(model, make_image_processor(32, 36), image)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))

    main([str(paths[0]), "--model", str(folder), "--selection_map", str(tmp_path / "one.png")])
    assert (tmp_path / "one.png").is_file()


def test_selection_map_of_a_model_with_registers(images, tmp_path):
    """Picks index [CLS, registers, patches]: the map shows patch p where the model picked token 1 + registers + p."""
    _, paths = images
    model = randomized(FFVTForImageClassification(tiny_config(num_register_tokens=2, layerscale_value=0.5)))
    model.save_pretrained(tmp_path / "model")
    processor = make_image_processor(32, 36)
    processor.save_pretrained(tmp_path / "model")
    main([str(paths[0]), "--model", str(tmp_path / "model"), "--selection_map", str(tmp_path / "map.png")])
    pixel_values = processor(Image.open(paths[0]).convert("RGB"), return_tensors="pt").pixel_values
    with torch.no_grad():
        picks = model(pixel_values).selected_token_indices
    assert all(not ((layer >= 1) & (layer <= 2)).any() for layer in picks)
    patch_picks = [layer[0] - 2 * (layer[0] > 0) for layer in picks]  # as a model without registers would number
    expected = draw_selection_map(model_input_image(pixel_values[0], processor), patch_picks, (8, 8), 4)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "map.png")), np.asarray(expected))


def test_selection_map_names_keep_repeated_stems_apart(tmp_path):
    files = [tmp_path / "x" / "1.jpg", tmp_path / "y" / "1.jpg", tmp_path / "2.png"]
    names = [path.name for path in selection_map_paths(tmp_path / "out.png", files)]
    assert names == ["out_1.png", "out_1_2.png", "out_2.png"]


def test_bad_inputs_are_named_before_anything_runs(images, tmp_path, capsys):
    _, paths = images
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.png").write_text("text pretending to be a PNG")
    bad = [tmp_path / "missing.jpg", tmp_path / "empty", tmp_path / "fake.png"]
    # The model does not exist either: the inputs are checked before it is loaded.
    with pytest.raises(SystemExit) as exit_info:
        main([str(paths[0]), *map(str, bad), "--model", str(tmp_path / "no-model")])
    message = exit_info.value.code  # a message, not a number: Python prints it, without a traceback, and exits with 1
    assert isinstance(message, str) and capsys.readouterr().out == ""
    assert f"{bad[0]}: no such file or folder" in message
    assert f"{bad[1]}: no images in this folder" in message
    assert f"{bad[2]}: not a readable image" in message
    assert str(paths[0]) not in message


def test_a_missing_model_is_a_clear_error(images, tmp_path):
    _, paths = images
    with pytest.raises(SystemExit, match="no-model: there is no folder of that name"):
        main([str(paths[0]), "--model", str(tmp_path / "no-model")])
