"""Export an FFVT classifier to ONNX, then check the file with onnxruntime against PyTorch.

    python -m modeling_ffvt.export_onnx --model ffvt-cub --output ffvt-cub.onnx

The graph takes `pixel_values` (batch, 3, height, width) at the model's image size, with any batch size, and returns
`logits` (batch, num_labels) and, with feature fusion, `selected_token_indices` (batch, layers, num_token): the picks
of every layer before the fusion layer, stacked, indexing each layer's sequence [CLS, registers, patches] as the
PyTorch model's do (patch p is `1 + config.num_register_tokens + p`; registers are never picked). docs/onnx.md lists
what the export does not cover.
"""

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

# Importing any module of the package runs its __init__, which registers FFVT with the Auto classes.
from .configuration_ffvt import _pair
from .inputs import CommandParser, exits_on_input_error, load_classifier

EXPORTERS = ("dynamo", "torchscript")
# torch.export implements no opset below 18 and cannot convert this graph down; the TorchScript exporter can.
LOWEST_DYNAMO_OPSET = 18


class _TensorOutputs(torch.nn.Module):
    """The model with a plain tuple of tensors as output, which is what an ONNX graph can return."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        outputs = self.model(pixel_values=pixel_values)
        if not outputs.selected_token_indices:
            return (outputs.logits,)
        return outputs.logits, torch.stack(outputs.selected_token_indices, dim=1)


# The dynamo exporter says, for each of torchvision's operators, that it skips them when torchvision is absent; this
# model uses none of them.
_TORCH_ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _quiet_logger(name):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def output_names(model) -> list[str]:
    return ["logits", "selected_token_indices"] if model.config.feature_fusion else ["logits"]


def _example_input(model, batch_size, seed=0):
    height, width = _pair(model.config.image_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, model.config.num_channels, height, width, generator=generator)


def export_onnx(model, output, opset: int = LOWEST_DYNAMO_OPSET, exporter: str = "dynamo") -> Path:
    """Write `model` (an FFVTForImageClassification, put in eval mode) to the ONNX file `output`, weights included.

    `exporter` is "dynamo" (torch.export, needs onnxscript and opset >= 18) or "torchscript" (PyTorch's deprecated
    tracer, for opsets 14 to 17). Attention runs as the model's `attn_implementation` says; "eager" gives the plainest
    graph (MatMul, Softmax). The batch axis is dynamic; the image size is fixed at `config.image_size`.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}.")
    if exporter == "dynamo" and opset < LOWEST_DYNAMO_OPSET:
        raise ValueError(
            f"The dynamo exporter writes opset {LOWEST_DYNAMO_OPSET} or later, not {opset}: raise the opset or use "
            'exporter="torchscript" (--exporter torchscript).'
        )
    model.eval()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    names = output_names(model)
    # A batch of 2, since torch.export takes a batch of 1 as a constant.
    example = _example_input(model, 2).to(model.device)
    if exporter == "dynamo":
        axes = {"dynamic_shapes": {"pixel_values": {0: torch.export.Dim("batch")}}}
    else:
        axes = {"dynamic_axes": {name: {0: "batch"} for name in ["pixel_values", *names]}}
    with warnings.catch_warnings(), _quiet_logger(_TORCH_ONNX_REGISTRATION_LOGGER):
        # The tracer warns that the model's size checks become constants, which is right for a fixed image size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        # torch.export's own use of a pytree API that torch has deprecated; nothing a caller can change.
        warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated", category=FutureWarning)
        torch.onnx.export(
            _TensorOutputs(model).eval(),
            (example,),
            str(output),
            input_names=["pixel_values"],
            output_names=names,
            opset_version=opset,
            dynamo=exporter == "dynamo",
            external_data=False,  # one file; ONNX's protobuf limit of 2 GB is well above ViT-L's 1.2 GB
            verbose=False,
            **axes,
        )
    return Path(output)


@torch.no_grad()
def verify_onnx(model, onnx_path, batch_sizes=(1, 3), atol: float = 1e-4) -> float:
    """Run random inputs of each batch size through onnxruntime and PyTorch; return the largest logit difference.

    Raises ValueError when logits differ by more than `atol` or the picks differ.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model.eval()
    largest = 0.0
    for batch_size in batch_sizes:
        pixel_values = _example_input(model, batch_size, seed=batch_size)
        expected = [tensor.cpu().numpy() for tensor in _TensorOutputs(model)(pixel_values.to(model.device))]
        found = session.run(None, {"pixel_values": pixel_values.numpy()})
        difference = float(np.abs(found[0] - expected[0]).max())
        if difference > atol:
            raise ValueError(f"ONNX logits differ from PyTorch's by {difference:.2e} (> {atol}) at batch {batch_size}.")
        if len(found) > 1 and not np.array_equal(found[1], expected[1]):
            raise ValueError(f"The ONNX model picks other tokens than PyTorch at batch {batch_size}.")
        largest = max(largest, difference)
    return largest


def parse_args(argv=None):
    parser = CommandParser(
        prog="ffvt-export-onnx", description="Export an FFVT classifier to ONNX and check it with onnxruntime."
    )
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub id.")
    parser.add_argument("--output", required=True, type=Path, help="The .onnx file to write.")
    parser.add_argument("--opset", type=int, default=LOWEST_DYNAMO_OPSET, help="ONNX opset (default 18).")
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="dynamo", help="torch.export (default), or TorchScript for opset < 18."
    )
    parser.add_argument("--attn_implementation", default="eager", help="Attention to export (eager or sdpa).")
    return parser.parse_args(argv)


@exits_on_input_error
def main(argv=None):
    args = parse_args(argv)
    model, _ = load_classifier(args.model, with_processor=False, attn_implementation=args.attn_implementation)
    if model.config.model_type != "ffvt":
        raise SystemExit(f"{args.model} is a {model.config.model_type} model, not FFVT.")
    try:
        export_onnx(model, args.output, args.opset, args.exporter)
        difference = verify_onnx(model, args.output)
    except ImportError as error:
        raise SystemExit(f"{error}: install the onnx extra, pip install 'modeling_ffvt[onnx]'.") from None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(
        f"wrote {args.output} (opset {args.opset}, outputs {', '.join(output_names(model))}); onnxruntime matches "
        f"PyTorch at batch sizes 1 and 3: largest logit difference {difference:.1e}, same picks"
    )


if __name__ == "__main__":
    main()
