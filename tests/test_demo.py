"""ffvt-demo without a browser: what the page shows for each kind of model the project starts from, the Space folder
--write_space writes, and the refusals. tests/test_demo_browser.py drives the page itself."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from huggingface_hub import SpaceCard
from PIL import Image

from conftest import digit_image, pipeline_scores, randomized, run_python, save_tiny_model, tiny_config, write_digits
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.configuration_ffvt import patch_grid
from modeling_ffvt.demo import build_demo, classify, main
from modeling_ffvt.image_processor import load_image_processor, make_image_processor
from modeling_ffvt.selection_map import draw_selection_map, model_input_image

gradio = pytest.importorskip("gradio")

CLASSES = [f"digit {digit}" for digit in range(10)]
# The switches a start from each backbone sets (docs/backbones.md), on the tiny model of conftest.
BACKBONES = {
    "vit": {},
    "dinov2 with registers": dict(num_register_tokens=4, layerscale_value=1.0),
    "clip": dict(hidden_act="quick_gelu", patch_bias=False, embeddings_layernorm=True, layer_norm_eps=1e-5),
    "no feature fusion": dict(feature_fusion=False),
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_page_shows_the_top5_and_the_selection_map(backbone):
    config = tiny_config(num_labels=10, id2label=dict(enumerate(CLASSES)), **BACKBONES[backbone])
    model = randomized(FFVTForImageClassification(config))
    processor = make_image_processor(32, 36)
    image = digit_image(5)
    labels, picture = classify(model, processor, image)

    pixel_values = processor(image.convert("RGB"), return_tensors="pt").pixel_values
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    top = outputs.logits[0].softmax(-1).topk(5)
    assert list(labels) == [CLASSES[index] for index in top.indices.tolist()]
    assert list(labels.values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    if not config.feature_fusion:
        assert picture is None
        return
    expected = draw_selection_map(
        model_input_image(pixel_values[0], processor),
        [layer[0] for layer in outputs.selected_token_indices],
        patch_grid(pixel_values.shape[-2:], config.patch_size),
        num_register_tokens=config.num_register_tokens,
    )
    assert np.array_equal(np.asarray(picture), np.asarray(expected))


def test_probabilities_are_pipelines_on_jpegs_of_every_size(photos, tmp_path):
    """The page's classes are pipeline("image-classification")'s on the uploaded image, whatever its size."""
    model = save_tiny_model(tmp_path, CLASSES, seed=4)
    processor = load_image_processor(tmp_path)
    for photo, scores in zip(photos, pipeline_scores(tmp_path, photos), strict=True):
        with Image.open(photo) as image:  # as Gradio hands an upload over: a PIL image
            labels, _ = classify(model, processor, image)
        top = sorted(scores, key=scores.get, reverse=True)[:5]
        assert list(labels) == top
        assert list(labels.values()) == pytest.approx([scores[name] for name in top], abs=1e-5)


def rendered_text(markdown: str) -> str:
    """What a CommonMark renderer shows of `markdown`: its HTML's text, entities decoded."""
    from markdown_it import MarkdownIt

    texts = []
    parser = HTMLParser()
    parser.handle_data = texts.append
    parser.feed(MarkdownIt("commonmark").render(markdown))
    return "".join(texts)


def test_names_are_shown_literally():
    """Class names reach the page's gr.Label as they are; the model's name in the title is not Markdown, HTML or
    maths."""
    names = ["$1", "$5", "<b>bold</b>", "a & b", "\"quoted\" 'é'", "*star* _under_ `tick` [link](x) # | ~"]
    config = tiny_config(num_labels=len(names), id2label=dict(enumerate(names)))
    model, processor = randomized(FFVTForImageClassification(config)), make_image_processor(32, 36)
    labels, _ = classify(model, processor, digit_image(5))
    shown = gradio.Label().postprocess(labels)
    assert {confidence.label for confidence in shown.confidences} <= set(names) and shown.label in names

    title = "FFVT: birds <b>$$x^2$$</b> & *co* #"
    demo = build_demo(model, processor, title=title)
    (markdown,) = [block for block in demo.blocks.values() if isinstance(block, gradio.Markdown)]
    assert rendered_text(markdown.value).startswith(title + "\n")
    assert markdown.latex_delimiters == []


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The Space --write_space writes for a local model folder and two examples, and that model folder."""
    root = tmp_path_factory.mktemp("space")
    model_folder = root / "ffvt-digits"
    save_tiny_model(model_folder, CLASSES, seed=2)
    write_digits(root / "examples", [3, 5])
    main(["--model", str(model_folder), "--examples", str(root / "examples"), "--write_space", str(root / "space")])
    return root / "space", model_folder


def test_write_space(space):
    space, model_folder = space
    card = SpaceCard.load(space / "README.md")  # the Hub's own parser of the header
    assert (card.data.sdk, card.data.app_file, card.data.sdk_version) == ("gradio", "app.py", gradio.__version__)
    requirements = (space / "requirements.txt").read_text().split()
    assert "gradio" in requirements and any(line.startswith("transformers") for line in requirements)
    assert json.loads((space / "model" / "config.json").read_text())["id2label"]["3"] == "digit 3"
    assert len(list((space / "examples").glob("*.png"))) == 2
    assert "probable classes and the tokens MAWS picked in each layer." in card.text
    with pytest.raises(SystemExit, match=f"--write_space {space} exists and is not empty: give a new or empty folder"):
        main(["--model", str(model_folder), "--write_space", str(space)])


def test_a_baseline_page_and_space_speak_of_no_maws(tmp_path):
    """A model without feature fusion picks no tokens: neither its page nor its Space's README promise MAWS picks,
    and the page's picture stays hidden; a Hub id's README (not looked up) says the picks need feature fusion."""
    config = tiny_config(num_labels=10, id2label=dict(enumerate(CLASSES)), feature_fusion=False)
    model = randomized(FFVTForImageClassification(config))
    model.save_pretrained(tmp_path / "baseline")
    make_image_processor(32, 36).save_pretrained(tmp_path / "baseline")
    main(["--model", str(tmp_path / "baseline"), "--write_space", str(tmp_path / "space")])
    assert "MAWS" not in SpaceCard.load(tmp_path / "space" / "README.md").text
    demo = build_demo(model.eval(), make_image_processor(32, 36))
    texts = [block.value for block in demo.blocks.values() if isinstance(block, gradio.Markdown)]
    assert texts and not any("MAWS" in text for text in texts)
    (picture,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "ffvt-selection-map"]
    assert picture.visible is False
    main(["--model", "user/ffvt-cub", "--write_space", str(tmp_path / "hub_space")])
    assert "and, for a model with feature fusion, the tokens MAWS picked" in SpaceCard.load(
        tmp_path / "hub_space" / "README.md").text


@pytest.mark.slow
def test_space_app_runs_from_its_own_copy(space):
    """app.py builds the page from the Space's copy of the package and model; launch() is where the Space takes
    over, so it only reports here."""
    space, _ = space
    script = (
        "import gradio\n"
        "gradio.Blocks.launch = lambda self, **kwargs: print('launched', len(self.blocks))\n"
        "import runpy, modeling_ffvt\n"
        "print(modeling_ffvt.__file__)\n"
        "runpy.run_path('app.py')\n"
    )
    run = run_python("-c", script, cwd=space)
    assert run.returncode == 0, run.stdout[-3000:]
    assert str(space / "modeling_ffvt" / "__init__.py") in run.stdout and "launched" in run.stdout


def test_clear_errors(tmp_path):
    model_folder = tmp_path / "model"
    save_tiny_model(model_folder, CLASSES)
    with pytest.raises(SystemExit, match=f"--examples {tmp_path}/nowhere is not a folder: give a folder of images"):
        main(["--model", str(model_folder), "--examples", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=f"--examples {tmp_path}/empty holds no images"):
        main(["--model", str(model_folder), "--examples", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="--model no-such-model: there is no folder of that name"):
        main(["--model", "no-such-model", "--write_space", str(tmp_path / "space")])
    assert not (tmp_path / "space").exists()
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(model_folder), "--port", "70000"])
    assert stopped.value.code == 2  # argparse's usage error
