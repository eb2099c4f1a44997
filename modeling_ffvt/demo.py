"""ffvt-demo: a Gradio app that classifies an uploaded image with an FFVT model and, for a model with feature fusion,
shows what MAWS picked.

    ffvt-demo --model ffvt-cub --examples birds/          # http://127.0.0.1:7860
    ffvt-demo --model user/ffvt-cub --port 8080
    ffvt-demo --model user/ffvt-cub --write_space space/  # a folder to push as a Hugging Face Space

Gradio is the optional extra `demo` (`pip install "modeling_ffvt[demo]"`). The page uses system fonts and no
analytics, so it works without a network. docs/usage.md shows it.
"""

import importlib.metadata
import shutil
import threading
from pathlib import Path

import torch
from transformers import AutoConfig

# Importing any module of the package runs its __init__, which registers FFVT with the Auto classes.
from .inputs import CommandParser, check_model_name, exits_on_input_error, load_classifier, scan_images
from .model_card import markdown_text
from .predict import predict
from .selection_map import selection_map

TOP_K = 5
SPACE_MODEL_FOLDER = "model"
SPACE_EXAMPLES_FOLDER = "examples"
PACKAGE = Path(__file__).resolve().parent


class MissingGradioError(ImportError):
    def __init__(self):
        super().__init__('ffvt-demo needs Gradio: pip install "modeling_ffvt[demo]" (or pip install gradio).')


def _gradio():
    try:
        import gradio
    except ImportError:
        raise MissingGradioError() from None
    return gradio


def parse_args(argv=None):
    parser = CommandParser(prog="ffvt-demo", description="A Gradio app of an FFVT model.")
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub id.")
    parser.add_argument("--port", type=int, default=7860, help="The port to serve on (default 7860).")
    parser.add_argument(
        "--host", default="127.0.0.1", help="The address to serve on (default 127.0.0.1; 0.0.0.0 for every one)."
    )
    parser.add_argument("--examples", type=Path, metavar="FOLDER", help="Images offered as examples on the page.")
    parser.add_argument(
        "--write_space",
        type=Path,
        metavar="DIR",
        help="Write a folder to push as a Hugging Face Space (app.py, requirements.txt, README.md) instead of serving.",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available).")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: give a port from 1 to 65535.")
    return args


def example_images(folder) -> list[Path]:
    """The images below `folder` (as ffvt-predict finds them), or ValueError naming the flag and the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--examples {folder} is not a folder: give a folder of images.")
    images = scan_images(folder).images
    if not images:
        raise ValueError(f"--examples {folder} holds no images.")
    return images


@torch.no_grad()
def classify(model, processor, image):
    """The `TOP_K` best classes of a PIL image as {id2label name: probability}, as ffvt-predict ranks them, and its
    selection map (a PIL image; None for a model without feature fusion)."""
    result = next(predict(model, processor, [image], top_k=TOP_K))
    labels = {prediction["label"]: prediction["probability"] for prediction in result["predictions"]}
    picture = selection_map(model, processor, image)[0] if getattr(model.config, "feature_fusion", False) else None
    return labels, picture


def build_demo(model, processor, examples=(), title: str = "FFVT"):
    """A `gradio.Blocks` app: an image input, a `gr.Label` of the five best classes and the selection map.

    `model` is in eval mode on its device; `examples` are image paths offered below the input. Raises
    MissingGradioError (an ImportError) without Gradio.
    """
    gr = _gradio()
    fusion = getattr(model.config, "feature_fusion", False)

    def run(image):
        if image is None:
            raise gr.Error("Upload an image or pick an example first.")
        return classify(model, processor, image)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {markdown_text(title)}\nUpload an image or pick an example: the {TOP_K} most probable classes, and"
            + (" where MAWS picked tokens in each layer (outlined) and how often (heat map)." if fusion else "."),
            latex_delimiters=[],  # the title is a model's name, not maths
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", image_mode="RGB", label="image", elem_id="ffvt-input")
                button = gr.Button("Classify", variant="primary", elem_id="ffvt-classify")
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=image)
            with gr.Column():
                labels = gr.Label(num_top_classes=TOP_K, label="classes", elem_id="ffvt-labels")
                # No label: its badge would cover the panel titles at the top of the picture.
                picks = gr.Image(
                    type="pil", format="png", show_label=False, visible=fusion, elem_id="ffvt-selection-map"
                )
        button.click(run, inputs=image, outputs=[labels, picks])
    return demo


def load_demo(model_name: str, examples=None, device=None):
    """The app of the model `model_name` (folder or Hub id) on `device` (default: cuda when available), with the
    images of the folder `examples`. Raises ValueError for a bad examples folder, SystemExit (from
    `inputs.load_classifier`) for a model that cannot be loaded."""
    images = example_images(examples) if examples is not None else []
    model, processor = load_classifier(model_name)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return build_demo(model, processor, images, title=f"FFVT: {Path(model_name).name}")


def _requirements() -> list[str]:
    """This package's requirements and those of its `demo` extra, as installed (a Space installs them from PyPI)."""
    requirements = []
    for requirement in importlib.metadata.requires("modeling_ffvt") or []:
        name, _, marker = requirement.partition(";")
        if not marker or "demo" in marker:
            requirements.append(name.strip())
    return requirements


def _feature_fusion(folder) -> bool | None:
    """Whether the model saved in `folder` has feature fusion; None when its config cannot be read."""
    try:
        return bool(getattr(AutoConfig.from_pretrained(folder), "feature_fusion", False))
    except (OSError, ValueError):
        return None


def write_space(folder, model_name: str, examples=None) -> Path:
    """Write a Gradio Space into `folder`: app.py, requirements.txt, a README.md whose YAML header the Hub reads,
    this package's code, and the model itself when `model_name` is a local folder (a Hub id is loaded by the Space).

    Raises MissingGradioError without Gradio, FileExistsError for a folder that holds files, ValueError for a bad
    examples folder, InputError (from `inputs.check_model_name`) for a `model_name` that is neither a folder nor a
    Hub id.
    """
    from huggingface_hub import SpaceCard, SpaceCardData

    gradio = _gradio()  # its version goes into the README's header
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"--write_space {folder} exists and is not empty: give a new or empty folder.")
    images = example_images(examples) if examples is not None else []
    check_model_name(model_name)
    local = Path(model_name).is_dir()
    fusion = _feature_fusion(model_name) if local else None  # a Hub id is not looked up here: the Space loads it
    shows = {True: " and the tokens MAWS picked in each layer", False: "",
             None: " and, for a model with feature fusion, the tokens MAWS picked in each layer"}[fusion]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PACKAGE, folder / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    if local:
        shutil.copytree(model_name, folder / SPACE_MODEL_FOLDER, ignore=shutil.ignore_patterns("checkpoint*", "runs"))
    for number, image in enumerate(images, start=1):
        (folder / SPACE_EXAMPLES_FOLDER).mkdir(exist_ok=True)
        shutil.copy(image, folder / SPACE_EXAMPLES_FOLDER / f"{number:03d}_{image.name}")
    space_model = SPACE_MODEL_FOLDER if local else model_name
    examples_argument = f", examples={SPACE_EXAMPLES_FOLDER!r}" if images else ""
    (folder / "app.py").write_text(
        "# The Space's entry point, written by ffvt-demo --write_space.\n"
        "from modeling_ffvt.demo import load_demo\n\n"
        f"demo = load_demo({space_model!r}{examples_argument})\n"
        "demo.launch()\n"
    )
    (folder / "requirements.txt").write_text("\n".join(_requirements()) + "\n")
    card_data = SpaceCardData(
        title=f"FFVT {Path(model_name).name}"[:30],
        sdk="gradio",
        sdk_version=gradio.__version__,
        app_file="app.py",
        models=None if local else [model_name],
        tags=["ffvt", "image-classification"],
    )
    body = (
        f"\n# FFVT: {Path(model_name).name}\n\nThe `ffvt-demo` app of the FFVT image classifier "
        f"{'saved in ' + SPACE_MODEL_FOLDER + '/' if local else model_name}: upload an image to see its five most "
        f"probable classes{shows}.\n"
    )
    SpaceCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(folder / "README.md")
    return folder


@exits_on_input_error
def main(argv=None):
    args = parse_args(argv)
    try:
        if args.write_space is not None:
            folder = write_space(args.write_space, args.model, args.examples)
            print(f"Space written to {folder}: push it with `hf upload USER/SPACE {folder} --repo-type space`.")
            return
        demo = load_demo(args.model, args.examples, args.device)
    except (OSError, ValueError, MissingGradioError) as error:
        raise SystemExit(str(error)) from None
    # Served until Ctrl-C, which ends the command with one line and status 130 (exits_on_input_error) rather than
    # Gradio's own message and status 0 (what `launch` without prevent_thread_lock gives).
    demo.launch(server_name=args.host, server_port=args.port, share=False, prevent_thread_lock=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        demo.close(verbose=False)
        raise KeyboardInterrupt("Stopped the demo server.") from None


if __name__ == "__main__":
    main()
