"""What train_hf.py needs to load large data sets: unreadable images found where they are decoded anyway, and each
process's data-loader position saved with a checkpoint so that a resume continues mid-epoch without replaying it.

docs/training.md ("Large data sets") says what users see.
"""

import logging
from pathlib import Path

import torch
from accelerate.utils import gather_object

from .inputs import InputError

logger = logging.getLogger(__name__)


class UnreadableImages:
    """The unreadable images a run has met (batches of `modeling_ffvt.data.collate_images` name them), and what
    follows: without `skip` (--skip_bad_images) the run stops at the first batch that holds one, before the optimiser
    step it belongs to, so that every checkpoint written before stays as it was; with `skip` the image stays out
    (its row weighs nothing) and its name is kept in `found`, in the order met, once.

    Every process calls `check` on the batches of the same step, so every process learns the same names and stops or
    goes on together. `found` is the list names are added to, in place: the run's record, which a resumed run
    continues.
    """

    def __init__(self, skip: bool, found: list[str]):
        self.skip, self.found = skip, found

    def check(self, accelerator, batches) -> None:
        """Gather the names of the unreadable images of `batches` (this process's) from every process. Raises
        InputError naming them without `skip`. Costs one all-reduce of a number; the names travel only when there
        are some."""
        local = [name for batch in batches for name in batch["unreadable"]]
        count = accelerator.reduce(torch.tensor(len(local), device=accelerator.device), "sum")
        if not int(count):
            return
        met = list(dict.fromkeys(gather_object(local) if accelerator.num_processes > 1 else local))
        if not self.skip:
            raise InputError(
                f"Unreadable image{'s' * (len(met) > 1)}: {'; '.join(met)}. Fix or remove "
                f"{'them' if len(met) > 1 else 'it'} and resume from the last checkpoint, or pass --skip_bad_images "
                "to train without them."
            )
        new = [name for name in met if name not in self.found]
        if new:
            self.found += new
            logger.warning(f"Skipped {len(new)} unreadable image{'s' * (len(new) > 1)} ({len(self.found)} so far): "
                           f"{'; '.join(new)}")

    def checked(self, accelerator, batches):
        """`batches` one by one, each checked (for evaluation, where each batch is a step of its own)."""
        for batch in batches:
            self.check(accelerator, [batch])
            yield batch


def own_loader_states(accelerator, dataloaders) -> None:
    """Make the prepared stateful `dataloaders` this run's to save and start, rather than accelerate's:

    - accelerate's `save_state` writes every process's loader state into one file (dl_state_dict.bin) at once, so
      the processes' differing positions would overwrite one another: `save_loader_state` writes one file a process
      instead, and accelerate is left none to save;
    - torchdata's `state_dict()`, which accelerate calls when it wraps a loader, starts an iterator (and its workers)
      that the first epoch would then reuse, made before `set_epoch`: with workers its order is not the seeded one.
      An empty state drops it, so that the first epoch starts as every other does.
    """
    for dataloader in dataloaders:
        accelerator._dataloaders.remove(dataloader)
        dataloader.load_state_dict({})


def loader_state_file(folder, process_index: int) -> Path:
    return Path(folder, f"train_loader_{process_index}.pt")


def save_loader_state(folder, dataloader, process_index: int) -> None:
    """Write this process's training data-loader position (a torchdata `StatefulDataLoader` state: batches yielded,
    sampler and worker states) into the checkpoint folder, one file a process, since each process reads its own
    share of the data."""
    torch.save(dataloader.state_dict(), loader_state_file(folder, process_index))


def load_loader_state(folder, dataloader, process_index: int, num_processes: int) -> None:
    """Give `dataloader` the position `save_loader_state` wrote, so that its next iteration continues the epoch
    where the checkpoint was taken. Raises InputError when the checkpoint was written by another number of
    processes (each process's position is that of its own share)."""
    path = loader_state_file(folder, process_index)
    saved = len(list(Path(folder).glob("train_loader_*.pt")))
    if not path.is_file() or saved != num_processes:
        raise InputError(
            f"--resume_from_checkpoint {folder}: its data-loader positions are those of {saved} processes, not "
            f"{num_processes}: resume with --num_processes {saved}, the number that wrote it."
        )
    dataloader.load_state_dict(torch.load(path, weights_only=False))
