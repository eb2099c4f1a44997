"""What train_hf.py needs to load large data sets: unreadable images found where they are decoded anyway, and each
process's position in a streamed epoch saved with a checkpoint so that a resume continues from there.

docs/training.md ("Large data sets") says what users see.
"""

import logging
import pickle
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
                f"Unreadable image{'s' * (len(met) > 1)}: {'; '.join(met)}. Replace "
                f"{'them' if len(met) > 1 else 'it'} with a readable copy and resume from the last checkpoint (a "
                "checkpoint resumes only on the data it was written on), or pass --skip_bad_images to train without "
                f"{'them' if len(met) > 1 else 'it'}."
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


# How the stream a saved position belongs to is built: 2 since its rows are numbered before the shuffle
# (modeling_ffvt.streaming.located); positions saved before (no layout) name parts that stream no longer has.
STREAM_LAYOUT = 2


def loader_state_file(folder, process_index: int) -> Path:
    return Path(folder, f"train_loader_{process_index}.pt")


def save_loader_state(folder, dataloader, process_index: int) -> None:
    """Write this process's position in a streamed epoch (a torchdata `StatefulDataLoader` state: where each worker
    had read its shards to) into the checkpoint folder, one file a process, since each process reads its own shards,
    with the number of workers, which the position depends on, and `STREAM_LAYOUT`."""
    state = {"num_workers": dataloader.dataloader.num_workers, "layout": STREAM_LAYOUT,
             "state": dataloader.state_dict()}
    torch.save(state, loader_state_file(folder, process_index))


def load_loader_state(folder, dataloader, process_index: int, num_processes: int) -> None:
    """Give `dataloader` the position `save_loader_state` wrote, so that its next iteration continues the epoch
    where the checkpoint was taken. Raises InputError when the checkpoint was written by another number of processes
    or data-loader workers (each reads its own shards), for a stream of another `STREAM_LAYOUT`, or when its file
    holds anything but plain data (it is read with `weights_only=True`: a checkpoint never runs pickled code)."""
    path = loader_state_file(folder, process_index)
    saved = len(list(Path(folder).glob("train_loader_*.pt")))
    if not path.is_file() or saved != num_processes:
        raise InputError(
            f"--resume_from_checkpoint {folder}: its stream positions are those of {saved} processes, not "
            f"{num_processes}: resume with --num_processes {saved}, the number that wrote it."
        )
    try:  # the state is plain containers of numbers and strings: nothing a checkpoint holds may run as code
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"--resume_from_checkpoint {folder}: {path.name} holds more than a data loader's position "
            f"({str(error).splitlines()[0]}); it was not written by train_hf.py and is not loaded."
        ) from None
    if state.get("layout") != STREAM_LAYOUT:
        raise InputError(
            f"--resume_from_checkpoint {folder}: its stream positions were written by an earlier train_hf.py, whose "
            "stream is built otherwise, and cannot be continued: resume from a checkpoint written at the end of an "
            "epoch (it holds no position), or train anew in another --output_dir."
        )
    if state["num_workers"] != dataloader.dataloader.num_workers:
        raise InputError(
            f"--resume_from_checkpoint {folder}: its stream positions are those of {state['num_workers']} data-loader "
            f"workers a process: resume with --dataloader_num_workers {state['num_workers']}."
        )
    dataloader.load_state_dict(state["state"])
