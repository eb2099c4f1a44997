"""The memory plan of docs/gpu.md: for each backbone FFVT starts from, at 224 and 448 px, the parameter count and the
memory of weights, gradients and optimiser state (SGD with momentum) for full fine-tuning, LoRA of rank 8 (query and
value, as train_hf.py's default targets) and a frozen backbone, on one GPU and sharded by FSDP over 8, the activations
a training step keeps, and which of 24, 48 and 80 GB GPUs each fits at 8 images per GPU.

Models are built on the meta device from their configurations (no weights are needed or allocated); every count is
read from the model itself. Activations are estimated, not measured: per layer and image, in bytes of the 16-bit
compute of mixed precision, s * (15 h + 4.75 i * (1.5 if the MLP is gated else 1)) for s tokens, width h and MLP width i
(Korthikanti et al. 2022's 34 s h for i = 4 h, with sdpa or flash attention, which keep no attention matrix), over
every layer; with gradient checkpointing, each layer's input (2 s h) plus one layer's whole; a frozen backbone keeps
none for its layers, only one layer's while it computes. The fusion layer's few tokens and the head are left out. A
GPU fits when weights + gradients + optimiser state (FSDP: an eighth, plus two whole layers gathered) + 8 images'
activations + 2 GB (CUDA context, workspaces, fragmentation) is at most its size.

`--measure` adds, for the sizes given (small enough for a CPU), the peak resident memory of one real training step on
CPU (fp32 compute, so activations count 4 bytes), each in a fresh process, beside the same estimate in fp32.

    python benchmarks/memory_plan.py --markdown            # the tables of docs/gpu.md
    python benchmarks/memory_plan.py --measure ViT-B/16    # and the CPU measurement
"""

import argparse
import json
import subprocess
import sys

import torch

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.parameter_efficient import TrainingMethod

DINOV2 = dict(patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)
DINOV3 = dict(patch_size=16, layerscale_value=1e-5, layer_norm_eps=1e-5, num_register_tokens=4,
              position_embedding_type="rope", key_bias=False, query_bias=True, value_bias=True)
MODELS = {
    "ViT-B/16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "ViT-L/16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "DINOv2-L/14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        **DINOV2),
    "DINOv2-g/14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, intermediate_size=4096,
                        use_gated_mlp=True, hidden_act="silu", **DINOV2),
    "DINOv3-L/16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        **DINOV3),
    "DINOv3-H+/16": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                         use_gated_mlp=True, hidden_act="silu", **DINOV3),
    "DINOv3-7B/16": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, intermediate_size=8192,
                         use_gated_mlp=True, hidden_act="silu", **DINOV3),
}
METHODS = {"full": {}, "LoRA r8": {"lora_rank": 8}, "frozen": {"freeze_backbone": True}}
IMAGE_SIZES = (224, 448)
GPUS = (24, 48, 80)
BATCH = 8
OVERHEAD_GB = 2
SHARDS = 8
GB = 1e9


def build(name: str, image_size: int) -> FFVTForImageClassification:
    """FFVT of `name`'s shape with 200 classes (CUB), on the meta device."""
    with torch.device("meta"):
        return FFVTForImageClassification(FFVTConfig(**MODELS[name], image_size=image_size, num_labels=200))


def counts(model: FFVTForImageClassification, method: str) -> dict:
    """Parameters: all of the training forward's, the trained ones, the frozen ones, and the largest layer's."""
    torch.manual_seed(0)
    trained_model = TrainingMethod(**METHODS[method]).apply(model)
    used = [(n, p) for n, p in trained_model.named_parameters() if ".original_module." not in n]
    layer = sum(p.numel() for p in model.vit.encoder.layer[0].parameters())
    trained = sum(p.numel() for _, p in used if p.requires_grad)
    total = sum(p.numel() for _, p in used)
    return {"total": total, "trained": trained, "frozen": total - trained, "layer": layer}


def activations_per_image(config: FFVTConfig, method: str, checkpointing: bool, bytes_per_value: int = 2) -> float:
    """Bytes a training step keeps for backward per image (see the module's docstring); a frozen backbone keeps none
    for its layers (nothing before the fusion layer needs a gradient), only one layer's while it computes."""
    grid = config.image_size // config.patch_size
    tokens = 1 + config.num_register_tokens + grid * grid
    h, i = config.hidden_size, config.intermediate_size
    layer = tokens * (15 * h + 4.75 * i * (1.5 if config.use_gated_mlp else 1)) * bytes_per_value / 2
    layers = config.num_hidden_layers - config.feature_fusion
    if method == "frozen":
        return layer
    if checkpointing:
        return layers * tokens * h * bytes_per_value + layer
    return layers * layer


def state_bytes(count: dict, frozen_bytes: int = 4) -> float:
    """Weights (trained in float32, frozen in `frozen_bytes`), float32 gradients and momentum of the trained ones."""
    return count["frozen"] * frozen_bytes + count["trained"] * 4 * 3


def smallest_gpu(needed_bytes: float) -> str:
    fitting = [size for size in GPUS if needed_bytes + OVERHEAD_GB * GB <= size * GB]
    return f"{fitting[0]} GB" if fitting else "none"


def plan() -> list[dict]:
    rows = []
    for name in MODELS:
        for image_size in IMAGE_SIZES:
            config = build(name, image_size).config
            for method in METHODS:
                full_activations = activations_per_image(config, method, checkpointing=False) * BATCH
                checkpointed = activations_per_image(config, method, checkpointing=True) * BATCH
                count = counts(build(name, image_size), method)
                state = state_bytes(count)
                half_frozen = state_bytes(count, frozen_bytes=2)
                sharded = state / SHARDS + 2 * count["layer"] * 4
                rows.append({
                    "model": name, "image_size": image_size, "method": method, "parameters": count["total"],
                    "trained": count["trained"], "state_gb": state / GB, "state_bf16_frozen_gb": half_frozen / GB,
                    "state_fsdp8_gb": sharded / GB, "activations_gb": full_activations / GB,
                    "activations_checkpointed_gb": checkpointed / GB,
                    "fits": smallest_gpu(state + full_activations),
                    "fits_checkpointed": smallest_gpu(state + checkpointed),
                    "fits_bf16_frozen_checkpointed": smallest_gpu(half_frozen + checkpointed)
                    if method != "full" else "",
                    "fits_fsdp8_checkpointed": smallest_gpu(sharded + checkpointed),
                })
    return rows


MEASURE = """
import resource, sys, torch
sys.path.insert(0, "benchmarks")
from memory_plan import MODELS, METHODS
from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.parameter_efficient import TrainingMethod
torch.manual_seed(0)
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
name, image_size, method, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
before = rss()
model = FFVTForImageClassification(FFVTConfig(**MODELS[name], image_size=image_size, num_labels=200))
model = TrainingMethod(**METHODS[method]).apply(model).train()
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
pixel_values = torch.randn(batch, 3, image_size, image_size)
model(pixel_values=pixel_values, labels=torch.zeros(batch, dtype=torch.long)).loss.backward()
optimizer.step()
with open("/proc/self/status") as status:  # VmHWM: ru_maxrss would carry the parent's peak over exec
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
print((peak - before) / 1e9)
"""


def measure(name: str, image_size: int, method: str, batch: int) -> float:
    """Peak resident GB above the imports of one fp32 CPU training step, in a fresh process."""
    output = subprocess.run([sys.executable, "-c", MEASURE, name, str(image_size), method, str(batch)],
                            capture_output=True, text=True, check=True)
    return float(output.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="Print the tables as markdown.")
    parser.add_argument("--measure", nargs="*", default=[], choices=list(MODELS), help="Models to measure on CPU.")
    parser.add_argument("--measure_batch", type=int, default=8)
    parser.add_argument("--output_json", help="Write the plan (and measurements) here.")
    args = parser.parse_args(argv)
    rows = plan()
    measured = []
    for name in args.measure:
        for method in METHODS:
            count = counts(build(name, 224), method)
            batch = args.measure_batch
            estimate = state_bytes(count) + activations_per_image(build(name, 224).config, method, False, 4) * batch
            measured.append({"model": name, "image_size": 224, "method": method, "batch": batch,
                             "estimate_gb": estimate / GB, "measured_gb": measure(name, 224, method, batch)})
    if args.markdown:
        print("| model | px | method | parameters | trained | weights + grads + momentum, GB (frozen in bf16) | "
              "same, FSDP over 8 | activations of 8 images, GB (checkpointed) | fits | fits, checkpointed "
              "(frozen in bf16) | fits, FSDP over 8, checkpointed |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            bf16 = f" ({r['state_bf16_frozen_gb']:.1f})" if r["method"] != "full" else ""
            frozen_fit = f" ({r['fits_bf16_frozen_checkpointed']})" if r["method"] != "full" else ""
            print(f"| {r['model']} | {r['image_size']} | {r['method']} | {r['parameters'] / 1e6:,.0f} M | "
                  f"{r['trained'] / 1e6:,.1f} M | {r['state_gb']:.1f}{bf16} | {r['state_fsdp8_gb']:.1f} | "
                  f"{r['activations_gb']:.1f} ({r['activations_checkpointed_gb']:.1f}) | {r['fits']} | "
                  f"{r['fits_checkpointed']}{frozen_fit} | {r['fits_fsdp8_checkpointed']} |")
        if measured:
            print("\n| model | px | method | batch | estimated GB (fp32 CPU) | measured peak GB above imports |")
            print("|---|---|---|---|---|---|")
            for m in measured:
                print(f"| {m['model']} | {m['image_size']} | {m['method']} | {m['batch']} | {m['estimate_gb']:.2f} | "
                      f"{m['measured_gb']:.2f} |")
    else:
        for r in rows + measured:
            print(json.dumps(r))
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump({"plan": rows, "measured": measured}, file, indent=1)


if __name__ == "__main__":
    main()
