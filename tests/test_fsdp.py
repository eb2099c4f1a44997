"""FSDP as Accelerate's FSDP2 shards FFVT (`fully_shard` on each transformer layer, the fusion layer included, then the
root), on two CPU processes with gloo: Accelerate itself takes FSDP only on accelerators (a CPU launch with an FSDP
config runs as plain multi-CPU), so torch's `fully_shard` is called directly, as Accelerate calls it."""

import textwrap

from conftest import run_python

WORKER = textwrap.dedent('''
    import copy, gc, sys, tempfile
    import torch, torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    sys.path.insert(0, "tests")
    from conftest import randomized, tiny_config
    from modeling_ffvt import FFVTForImageClassification
    from modeling_ffvt.modeling_ffvt import FFVTLayer
    from modeling_ffvt.parameter_efficient import TrainingMethod, merged_model

    dist.init_process_group("gloo")


    def check():
        rank, world = dist.get_rank(), dist.get_world_size()
        generator = torch.Generator().manual_seed(3)
        pixel_values, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 1])
        mine = slice(rank * 2, rank * 2 + 2)  # each process its half of the global batch

        def close(name, ours, theirs):
            error = (ours - theirs).abs().max().item()
            assert error < 1e-6, f"{name}: {error}"

        # Full fine-tuning, LoRA, and LoRA and a frozen backbone with their frozen weights held in bf16: FSDP2 gathers
        # each layer's bf16 frozen weights beside its float32 LoRA matrices.
        for lora, frozen, held in ((False, False, "float32"), (True, False, "float32"), (True, False, "bfloat16"),
                                   (False, True, "bfloat16")):
            model = randomized(FFVTForImageClassification(tiny_config(num_labels=3, hidden_dropout_prob=0.0)))
            torch.manual_seed(1)
            method = TrainingMethod(lora_rank=2 if lora else 0, freeze_backbone=frozen, frozen_weights_dtype=held)
            model = method.apply(model).train()
            reference, sharded = model, copy.deepcopy(model)
            for module in sharded.modules():
                if isinstance(module, FFVTLayer):  # the plain layers and the fusion layer
                    fully_shard(module)
            fully_shard(sharded)

            reference_loss = reference(pixel_values=pixel_values, labels=labels).loss
            reference_loss.backward()
            loss = sharded(pixel_values=pixel_values[mine], labels=labels[mine]).loss
            loss.backward()
            dist.all_reduce(total := loss.detach().clone())
            close("loss", total / world, reference_loss)
            trained = [(name, p) for name, p in reference.named_parameters() if p.requires_grad]
            shards = dict(sharded.named_parameters())
            assert len(trained) == sum(p.requires_grad for p in shards.values()) > 0
            for name, parameter in trained:
                close(name + ".grad", shards[name].grad.full_tensor(), parameter.grad)
            for net in (reference, sharded):
                torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9).step()
            for name, parameter in reference.named_parameters():
                close(name, shards[name].full_tensor(), parameter)

            state_dict = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                whole = copy.deepcopy(reference)
                whole.load_state_dict(state_dict)  # the gathered weights, which are the reference's (checked above)
                with tempfile.TemporaryDirectory() as folder:
                    whole = (merged_model(whole) if lora else whole).eval()
                    whole.save_pretrained(folder)
                    loaded = FFVTForImageClassification.from_pretrained(folder).eval()
                    if frozen and held != "float32":  # loaded in float32: the held weights exactly, computed in float32
                        weights = whole.state_dict()
                        for name, tensor in loaded.state_dict().items():
                            assert torch.equal(tensor, weights[name].float()), name
                    else:
                        with torch.no_grad():
                            assert torch.equal(loaded(pixel_values).logits, whole(pixel_values).logits)
            dist.barrier()

        # Under FSDP's mixed precision (bf16 compute, as Accelerate's FSDP2 sets it for --mixed_precision bf16) every
        # weight is gathered in bf16: frozen weights held in bf16 give the same loss and gradients as float32 ones.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for lora, frozen in ((True, False), (False, True)):
            start = randomized(FFVTForImageClassification(tiny_config(num_labels=3, hidden_dropout_prob=0.0)))
            runs = []
            for held in ("float32", "bfloat16"):
                torch.manual_seed(1)
                method = TrainingMethod(lora_rank=2 if lora else 0, freeze_backbone=frozen, frozen_weights_dtype=held)
                model = method.apply(copy.deepcopy(start)).train()
                for module in model.modules():
                    if isinstance(module, FFVTLayer):
                        fully_shard(module, mp_policy=policy)
                fully_shard(model, mp_policy=policy)
                loss = model(pixel_values=pixel_values[mine], labels=labels[mine]).loss
                loss.backward()
                trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
                runs.append((loss, {name: p.grad.full_tensor() for name, p in trained}))
            (loss, gradients), (held_loss, held_gradients) = runs
            close("mixed-precision loss", held_loss, loss)
            assert gradients.keys() == held_gradients.keys()
            for name, gradient in gradients.items():
                close(name + ".grad (mixed precision)", held_gradients[name], gradient)
        print(f"rank {rank}: equal")


    check()
    # Leaving the group before exiting, and only once the sharded models are gone: their device meshes hold the
    # group, and a gloo group torn down at interpreter exit can abort the process after its work is done.
    gc.collect()
    dist.destroy_process_group()
''')


def test_fsdp2_sharding_matches_one_process(tmp_path):
    """Two processes, each half of a global batch of 4, against one process on the whole batch: the loss, the
    gradients gathered from the shards and the weights after one SGD step with momentum agree to 1e-6, for full
    fine-tuning, LoRA, and LoRA or a frozen backbone with the frozen weights in bf16 (--frozen_weights_dtype); the
    full state dict gathered from the shards saves to a folder from_pretrained loads with the same logits (LoRA
    merged) or, for a frozen backbone held in bf16, the same weights."""
    (tmp_path / "worker.py").write_text(WORKER)
    result = run_python(tmp_path / "worker.py", processes=2, timeout=300)
    assert result.returncode == 0 and result.stdout.count(": equal") == 2, result.stdout[-3000:]
