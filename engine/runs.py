"""A training run on disk: its checkpoints, resuming one exactly, the checks around saving.

train_utils.train_model is the loop; it calls, once per need:

    TrainState                  where a run is (step, epoch, batch, tokens, history)
    epoch_batches(...)          an epoch's batches: a pure function of (seed, epoch), sliced
                                per process
    save_run(...)               the whole state -> the checkpoint (a collective under torchrun)
    resume_run(...)             the checkpoint -> model, optimizer, RNG and position, after
                                checking that nothing deciding the batch order changed
    check_finite / check_model_finite
                                a diverged run stops before it writes over a good checkpoint
    RunLog                      the progress bar, the lines above it, what Ctrl-C says
    note_replaced(path)         one line when a fresh run will replace another run's file

Nothing here knows GPT-2: the model, the optimizer, the loss of the current weights and
LoRA's state transform are handed in.
"""

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm  # the plain text bar: needs no widgets in notebooks

from engine.checkpoints import read_checkpoint, write_checkpoint
from engine.devices import gather, mean_across_processes, rank_and_world
from engine.fileio import ctrl_c_after


def new_history():
    # one entry per evaluation, except step_loss: the training loss of every optimizer step
    return {"step": [], "tokens_seen": [], "epoch": [], "train_loss": [], "val_loss": [],
            "step_loss": []}


@dataclass
class TrainState:
    """Where a run is; a checkpoint saves it and --resume continues from it."""
    step: int = 0               # optimizer steps taken
    epoch: int = 0              # epochs finished
    batch_in_epoch: int = 0     # micro-batches of the current epoch trained on
    tokens_seen: int = 0        # training tokens of all processes so far
    history: dict = field(default_factory=new_history)
    saved_step: int = None      # the step the checkpoint file holds (None: none of this run)

    def finish(self, elapsed_s):
        """The history with the final_* values train_model returns."""
        h = self.history
        h.update(final_step=self.step, final_train_loss=h["train_loss"][-1],
                 final_val_loss=h["val_loss"][-1], elapsed_s=elapsed_s)
        return h


# ---------------------------------------------------------------------------------------
# The batch order

def epoch_batches(n_items, batch_size, shuffle, drop_last, seed, epoch, rank=0, world_size=1):
    """Index lists of one epoch's batches for process ``rank`` of ``world_size``.

    The order is a pure function of (seed, epoch), so a resumed run replays exactly the
    batches an uninterrupted run would have seen. With several processes every rank takes
    a disjoint slice of the same global order.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n_items, generator=g).tolist()
    else:
        order = list(range(n_items))
    # Every rank must run the same number of steps (each step is a collective), so the
    # order is cut to a multiple of world_size before it is dealt out round-robin.
    order = order[:len(order) - len(order) % world_size][rank::world_size]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


# ---------------------------------------------------------------------------------------
# Save

def save_run(path, gpt, optimizer, run, world_size, batch_size, settings, split_state=None):
    """Write the whole training state to ``path`` (a collective: every rank calls it).

    ``split_state(model_state) -> (state to save, extra entries)``: how a model with adapters
    (LoRA) saves merged weights plus what resumes it; None saves the state as it is.
    """
    if not path:
        return
    # Gathering the full state is a collective: every rank takes part, rank 0 writes.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(gpt, options=full)
    optim_state = get_optimizer_state_dict(gpt, optimizer, options=full)
    rng_states = gather(_rng_state(), world_size)
    extra = {}
    if split_state is not None:
        model_state, extra = split_state(model_state)
    with ctrl_c_after():        # the file and saved_step change together (the Ctrl-C message)
        if rank_and_world()[0] == 0:
            write_checkpoint(path, gpt.cfg, model_state, **extra,
                             optimizer_state_dict=optim_state, step=run.step, epoch=run.epoch,
                             batch_in_epoch=run.batch_in_epoch, tokens_seen=run.tokens_seen,
                             history=run.history, rng_state=rng_states, world_size=world_size,
                             batch_size=batch_size, settings=settings)
        run.saved_step = run.step


# ---------------------------------------------------------------------------------------
# Resume

def resume_run(path, gpt, optimizer, plan, num_epochs, batch_size, seed, now, must_match,
               lora_now=None):
    """Load the run saved at ``path`` into ``gpt`` and ``optimizer``; returns its TrainState.

    ``now``: this run's settings; those named in ``must_match`` (and the global batch) must
    equal the saved ones. ``plan`` (train_utils.StepPlan) takes the saved warmup when ``now``
    gives none. ``lora_now``: the model's LoRA settings (lora.lora_config), or None.
    """
    rank, world_size = rank_and_world()
    ckpt = read_checkpoint(path)
    saved_cfg = ckpt.get("config") or {}
    if saved_cfg != gpt.cfg:
        diffs = _differences(saved_cfg, gpt.cfg, sorted(set(saved_cfg) | set(gpt.cfg)))
        raise ValueError(f"checkpoint {path} was trained with another model "
                         f"config: {'; '.join(diffs)}. Resume with the saved values, or "
                         f"train into a new --out without --resume.")
    if "optimizer_state_dict" not in ckpt:
        raise ValueError(f"{path} holds weights only, not a training state; "
                         f"it cannot be resumed")
    if now["warmup_steps"] is None:
        now["warmup_steps"] = (ckpt.get("settings") or {}).get("warmup_steps")
    _check_resume_settings(ckpt, path, now, must_match, batch_size, world_size)
    saved_lora = ckpt.get("lora")
    saved = saved_lora and {k: saved_lora[k] for k in ("rank", "alpha", "targets")}
    if saved != lora_now:
        raise ValueError(f"cannot resume {path}: it was trained with LoRA {saved}, and this "
                         f"model has {lora_now}; resume with the same --lora-rank, "
                         f"--lora-alpha and --lora-targets")
    full = StateDictOptions(full_state_dict=True)
    state = ckpt["model_state_dict"]
    if saved_lora is not None:
        # LoRA: the frozen base is the pretrained model this run was built from again, the
        # adapters are the saved ones (the checkpoint's merged weights are for other readers)
        state = {**get_model_state_dict(gpt, options=full), **saved_lora["adapters"]}
    set_model_state_dict(gpt, state, options=full)
    set_optimizer_state_dict(gpt, optimizer, ckpt["optimizer_state_dict"], options=full)
    run = TrainState(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["tokens_seen"],
                     ckpt["history"], saved_step=ckpt["step"])
    if ckpt.get("world_size", 1) == world_size:
        _set_rng_state(ckpt["rng_state"][rank])
    else:
        # Another number of processes sees the data in other slices anyway; fresh
        # random streams (for dropout) are as good as the saved ones then.
        torch.manual_seed(seed * 1_000 + run.step * 10 + rank)
    # The saved position counts micro-batches of the old shape (batch_size x processes
    # windows each); count it in windows, then in this run's micro-batches. With the
    # global batch unchanged (checked above) that is the same place in the epoch.
    saved_shape = ckpt.get("batch_size", batch_size) * ckpt.get("world_size", 1)
    run.batch_in_epoch = run.batch_in_epoch * saved_shape // (batch_size * world_size)
    if rank == 0 and (run.step >= plan.total_steps or run.epoch >= num_epochs):
        print(f"{path} is a finished run (step {run.step} of {plan.total_steps}): "
              f"nothing left to train; raise --num-epochs or --max-steps to go on.")
    elif rank == 0:
        print(f"Resumed from {path} at step {run.step} (epoch {run.epoch + 1}, "
              f"batch {run.batch_in_epoch}).")
    if now["warmup_steps"] is not None:
        plan.warmup_steps = now["warmup_steps"]
    return run


def _differences(saved, now, keys):
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys
            if saved.get(k) != now.get(k)]


def _check_resume_settings(ckpt, path, now, must_match, batch_size, world_size):
    """Raise ValueError naming every setting that differs from the saved run's."""
    saved = ckpt.get("settings") or {}
    diffs = _differences(saved, now, [k for k in must_match if k in saved and k in now])
    if "grad_accum_steps" in saved and "batch_size" in ckpt:
        was = (ckpt["batch_size"], saved["grad_accum_steps"], ckpt.get("world_size", 1))
        is_ = (batch_size, now["grad_accum_steps"], world_size)
        if math.prod(was) != math.prod(is_):
            diffs.append("global batch (batch_size x grad_accum_steps x processes): saved "
                         "{} x {} x {} = {}, now {} x {} x {} = {}".format(
                             *was, math.prod(was), *is_, math.prod(is_)))
    if diffs:
        raise ValueError(
            f"cannot resume {path}: these settings differ from the saved run's, and they "
            f"decide the batch order and the learning-rate schedule: {'; '.join(diffs)}. "
            f"Resume with the saved values, or train into a new --out without --resume.")


def _rng_state():
    # Plain tensors and tuples only, so the checkpoint loads with weights_only=True.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# Checks: a diverged model is never saved

def check_finite(loss, run, checkpoint_path, when="at"):
    """Stop a diverged run, keeping the last checkpoint it saved (always a finite one)."""
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint is {checkpoint_path} (step {run.saved_step})"
                if run.saved_step is not None else "nothing of this run was saved")
        raise FloatingPointError(
            f"loss became {loss} {when} optimizer step {run.step}; training stopped and {kept}. "
            f"Lower learning_rate, raise warmup_steps or keep gradient clipping on.")


def check_model_finite(gpt, current_loss, device, world_size, run, path):
    """Raise FloatingPointError when the weights about to be saved, or the loss they give,
    are not finite: then nothing is written, and the last checkpoint stays.

    A step's loss is computed before its update, so an update that breaks the weights
    shows only in the next step's loss: too late for a checkpoint written right after it.
    The loss of the current weights is the last evaluation's when it was just made, else
    ``current_loss()`` (every process takes part: FSDP needs them all).
    """
    if not path:
        return
    h = run.history
    if h["step"] and h["step"][-1] == run.step:
        loss = h["train_loss"][-1]
    else:
        loss = mean_across_processes(current_loss(), device, world_size)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in gpt.parameters()]
    weights_ok = float(torch.stack([torch.isfinite(t).all() for t in local]).all())
    if mean_across_processes(weights_ok, device, world_size) < 1.0:
        loss = float("nan")
    check_finite(loss, run, path, when="with the weights after")


# ---------------------------------------------------------------------------------------
# What the user sees

class RunLog:
    """The progress bar (when on) and the lines printed above it (rank 0 only).

    As a context manager around the loop it closes the bar on the way out, and turns
    Ctrl-C into a KeyboardInterrupt whose message says what is saved and how to go on.
    """

    def __init__(self, show_bar, total_steps, run, checkpoint_path):
        self.main = rank_and_world()[0] == 0
        self.run, self.checkpoint_path = run, checkpoint_path
        self.bar = (tqdm(total=total_steps, initial=run.step, desc="training", unit="step")
                    if show_bar else None)

    def write(self, msg):
        if self.main:
            (self.bar.write if self.bar is not None else print)(msg)

    def step(self, loss, lr):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.bar is not None:
            self.bar.close()
        if exc_type is KeyboardInterrupt:
            run, path = self.run, self.checkpoint_path
            raise KeyboardInterrupt(f"interrupted at optimizer step {run.step}; " + (
                f"{path} holds step {run.saved_step}: continue from there with --resume and "
                f"the same settings (train_model(..., resume=True))"
                if run.saved_step is not None else "nothing of this run was saved yet")
            ) from None


def note_replaced(path):
    """One line when a fresh run's checkpoints will replace another run's."""
    if not path or not Path(path).is_file():
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        what = f"a run saved at step {ckpt['step']}" if "step" in ckpt else "a model"
    except Exception:           # unreadable: it is replaced all the same
        what = "a file"
    print(f"note: {path} holds {what}; this run starts afresh and replaces it at its first "
          f"checkpoint (to continue that run instead, use --resume)")
