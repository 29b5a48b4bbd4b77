"""A training run on disk: its checkpoints, resuming one exactly, the checks around saving.

train_utils.train_model is the loop; it calls, once per need:

    TrainState                  where a run is (step, epoch, batch, tokens, history)
    check_train_config(c)       a TrainConfig's values in range; recorded_settings: what a
                                checkpoint records of them; save_history(history, path)
    plan_steps(...) -> StepPlan how long a run is: batches per epoch, steps, warmup
    epoch_batches(...)          an epoch's batches: a pure function of (seed, epoch), sliced
                                per process; in_order(loader): a loader's, unshuffled
    save_run(...)               the whole state -> the checkpoint (a collective under torchrun)
    resume_run(...)             the checkpoint -> model, optimizer, RNG and position, after
                                checking that nothing deciding the batch order changed
    clip_gradients              the gradient norm, clipped
    weights_copy / update_ratios  how far a step moved each part of the model
    check_finite / check_model_finite
                                a diverged run stops before it writes over a good checkpoint
    RunLog                      the progress bar, the lines above it, the metrics log
                                (<path>_metrics.jsonl, TensorBoard), what Ctrl-C says
    note_replaced(path)         one line when a fresh run will replace another run's file
    run_lock(path)              one run per checkpoint at a time (``<path>.lock``)
    saved_run(path)             a run's config and settings, read cheaply (train.py --resume)
    source_id / same_source     the weights a run started from, as resolved paths

On disk, beside the checkpoint ``<path>``: ``<path>.prev``, the checkpoint it replaced
(while a run saves: the last one that verifies when the newest is damaged), and
``<path>.lock`` while a run is writing. Nothing here knows GPT-2: the model, the optimizer,
the loss of the current weights and LoRA's state transform are handed in.
"""

import contextlib
import json
import math
import os
import random
import socket
import sys
import types
from dataclasses import asdict, dataclass, field
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
from torch.utils.data import DataLoader
from tqdm import tqdm  # the plain text bar: needs no widgets in notebooks

from engine.checkpoints import (
    DamagedFileError,
    first_non_finite,
    read_checkpoint,
    tensors_sha256,
    write_checkpoint,
)
from engine.devices import gather, mean_across_processes, rank_and_world
from engine.fileio import atomic_write, ctrl_c_after
from engine.records import group_by_length


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
    base_sha256: str = None     # LoRA: the fingerprint of the frozen base (tensors_sha256)

    def finish(self, elapsed_s):
        """The history with the final_* values train_model returns."""
        h = self.history
        h.update(final_step=self.step, final_train_loss=h["train_loss"][-1],
                 final_val_loss=h["val_loss"][-1], elapsed_s=elapsed_s)
        return h


# ---------------------------------------------------------------------------------------
# How long a run is, and the batch order

@dataclass
class StepPlan:
    """How long a run is, in optimizer steps (plan_steps makes it)."""
    batches_per_epoch: int      # micro-batches one process trains on per epoch
    steps_per_epoch: int        # optimizer steps per epoch (grad_accum_steps batches each)
    total_steps: int            # of the whole run: epochs x steps_per_epoch, or max_steps
    warmup_steps: int           # linear warmup; 5% of total_steps unless given


def plan_steps(n_windows, batch_size, grad_accum_steps=1, num_epochs=1, max_steps=None,
               warmup_steps=None, world_size=1, drop_last=True):
    """The step arithmetic of a run, in one place: train_model, train.py and train.ipynb.

    Each of ``world_size`` processes takes every world_size-th of the ``n_windows`` training
    windows (epoch_batches), in batches of ``batch_size``; ``grad_accum_steps`` of them
    make one optimizer step. ``warmup_steps=None`` means 5% of all steps (at least 1).
    """
    per_process = n_windows // world_size
    batches = per_process // batch_size if drop_last else math.ceil(per_process / batch_size)
    steps_per_epoch = math.ceil(batches / grad_accum_steps)
    total = num_epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = max(1, total // 20) if warmup_steps is None else warmup_steps
    return StepPlan(batches, steps_per_epoch, total, warmup)


def in_order(loader, batch_size=None):
    """The same batches without shuffling, so evaluations compare like with like. Its own
    generator: every DataLoader iterator draws a seed, from torch's global generator
    otherwise, and how often you evaluate would change training's dropout masks."""
    return DataLoader(loader.dataset, batch_size=batch_size or loader.batch_size,
                      shuffle=False, drop_last=loader.drop_last, collate_fn=loader.collate_fn,
                      generator=torch.Generator())


def epoch_batches(n_items, batch_size, shuffle, drop_last, seed, epoch, rank=0, world_size=1,
                  lengths=None):
    """Index lists of one epoch's batches for process ``rank`` of ``world_size``.

    The order is a pure function of (seed, epoch), so a resumed run replays exactly the
    batches an uninterrupted run would have seen. With several processes every rank takes
    a disjoint slice of the same global order. ``lengths`` (one per item; instruction records
    grouped by length, records.group_by_length): batches of items of similar length.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_items, generator=g).tolist() if shuffle else list(range(n_items))
    # Every rank must run the same number of steps (each step is a collective), so the
    # order is cut to a multiple of world_size before it is dealt out round-robin.
    order = order[:len(order) - len(order) % world_size][rank::world_size]
    if lengths is not None and shuffle:
        batches = group_by_length(order, lengths, batch_size, g)
        return [b for b in batches if len(b) == batch_size or not drop_last]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


# ---------------------------------------------------------------------------------------
# A run's settings: checked, and what its checkpoint records

def check_train_config(c):
    """Raise ValueError naming the first setting of train_utils.TrainConfig ``c`` that is out
    of range."""
    if c.grad_accum_steps < 1 or c.eval_freq < 1 or c.eval_iter < 1:
        raise ValueError(f"grad_accum_steps, eval_freq and eval_iter must be >= 1, got "
                         f"{c.grad_accum_steps}, {c.eval_freq}, {c.eval_iter}")
    if c.num_epochs < 1 or (c.max_steps is not None and c.max_steps < 1):
        raise ValueError(f"num_epochs and max_steps (when given) must be >= 1, got "
                         f"{c.num_epochs}, {c.max_steps}: fewer trains nothing, and "
                         f"would still overwrite checkpoint_path with the untrained weights")
    if c.grad_clip is not None and c.grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 or None = no clipping), got "
                         f"{c.grad_clip}: clipping to a negative norm flips the gradients")
    if (c.warmup_steps is not None and c.warmup_steps < 0) or (
            c.checkpoint_every is not None and c.checkpoint_every < 0):
        raise ValueError(f"warmup_steps and checkpoint_every must be >= 0, got "
                         f"{c.warmup_steps}, {c.checkpoint_every}")


def recorded_settings(c, batch_size, **data):
    """The settings a checkpoint records: TrainConfig ``c``'s (less where the run is saved),
    its extra ``settings``, and what the data gives (stride, window count)."""
    skip = ("checkpoint_path", "resume", "progress", "settings", "tokenizer_json")
    return {**{k: v for k, v in asdict(c).items() if k not in skip}, **c.settings,
            "batch_size": batch_size, **data}


def save_history(history, path):
    """Write a run's history (train_model's) as JSON, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(history, indent=1).encode()))


# ---------------------------------------------------------------------------------------
# Save

def save_run(path, gpt, optimizer, run, world_size, batch_size, settings, split_state=None):
    """Write the whole training state to ``path`` (a collective: every rank calls it).

    ``split_state(model_state) -> (state to save, extra entries)``: how a model with adapters
    (LoRA) saves merged weights plus what resumes it; None saves the state as it is. A LoRA
    checkpoint also records the fingerprint of the frozen base (``lora["base_sha256"]``),
    which resume_run checks. The file this save replaces stays as ``<path>.prev`` when it
    is this run's (saved or resumed from) and of an earlier step; another run's is replaced
    outright, and its ``.prev`` deleted.
    """
    if not path:
        return
    # Gathering the full state is a collective: every rank takes part, rank 0 writes.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = model_state = get_model_state_dict(gpt, options=full)
    optim_state = get_optimizer_state_dict(gpt, optimizer, options=full)
    rng_states = gather(_rng_state(), world_size)
    extra = {}
    if split_state is not None:
        model_state, extra = split_state(model_state)
    with ctrl_c_after():        # the file and saved_step change together (the Ctrl-C message)
        if rank_and_world()[0] == 0:
            if "lora" in extra:
                if run.base_sha256 is None:         # frozen: once per run is enough
                    run.base_sha256 = _base_sha256(state, extra["lora"]["adapters"])
                extra["lora"]["base_sha256"] = run.base_sha256
            previous = previous_path(path)
            if run.saved_step is None:
                previous.unlink(missing_ok=True)    # another run's: nothing to go back to
            # the same step again (the end of a run right after a periodic save): the file
            # kept stays the one of an earlier step
            keep = run.saved_step is not None and run.saved_step != run.step
            write_checkpoint(path, gpt.cfg, model_state, **extra,
                             previous=previous if keep else None,
                             optimizer_state_dict=optim_state, step=run.step, epoch=run.epoch,
                             batch_in_epoch=run.batch_in_epoch, tokens_seen=run.tokens_seen,
                             history=run.history, rng_state=rng_states, world_size=world_size,
                             batch_size=batch_size, settings=settings)
        run.saved_step = run.step


def previous_path(path):
    """``<path>.prev``: the checkpoint a run's save replaced (see save_run)."""
    return Path(f"{path}.prev")


def _base_sha256(state, adapters):
    """The fingerprint of a LoRA model's frozen weights: every tensor but the adapters."""
    return tensors_sha256({k: v for k, v in state.items() if k not in adapters})


# ---------------------------------------------------------------------------------------
# Resume

def resume_run(path, gpt, optimizer, plan, num_epochs, batch_size, seed, now, must_match,
               lora_now=None):
    """Load the run saved at ``path`` into ``gpt`` and ``optimizer``; returns its TrainState.

    ``now``: this run's settings; those named in ``must_match`` (and the global batch) must
    equal the saved ones. ``plan`` (StepPlan) takes the saved warmup when ``now``
    gives none. ``lora_now``: the model's LoRA settings (lora.lora_config), or None.
    """
    rank, world_size = rank_and_world()
    ckpt = _read_good_run(path)
    saved_cfg = ckpt.get("config") or {}
    if saved_cfg != gpt.cfg:
        diffs = _differences(saved_cfg, gpt.cfg, sorted(set(saved_cfg) | set(gpt.cfg)))
        raise ValueError(f"checkpoint {path} was trained with another model "
                         f"config: {'; '.join(diffs)}. Resume with the saved values, or "
                         f"train into a new --out without --resume.")
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
    run_base = None
    if saved_lora is not None:
        # LoRA: the frozen base is the pretrained model this run was built from again, the
        # adapters are the saved ones (the checkpoint's merged weights are for other readers)
        base = get_model_state_dict(gpt, options=full)
        run_base = _check_same_base(ckpt, path, base, saved_lora)
        state = {**base, **saved_lora["adapters"]}
    set_model_state_dict(gpt, state, options=full)
    set_optimizer_state_dict(gpt, optimizer, ckpt["optimizer_state_dict"], options=full)
    run = TrainState(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["tokens_seen"],
                     ckpt["history"], saved_step=ckpt["step"], base_sha256=run_base)
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


def _read_good_run(path):
    """The checkpoint at ``path``, verified and finite (weights, adapters, optimizer state);
    else a one-line error that names the last checkpoint of the run that is."""
    try:
        ckpt = read_checkpoint(path)
    except DamagedFileError as e:
        raise DamagedFileError(path, e.why, _last_good(path)) from None
    if not isinstance(ckpt, dict) or "optimizer_state_dict" not in ckpt:
        raise ValueError(f"{path} holds weights only, not a training state; it cannot be "
                         f"resumed (to fine-tune it, start a run with --init-from {path} and "
                         f"another --out)")
    for what, part in (("weights", ckpt.get("model_state_dict")),
                       ("LoRA adapters", (ckpt.get("lora") or {}).get("adapters")),
                       ("optimizer state", ckpt["optimizer_state_dict"])):
        if (bad := first_non_finite(part)) is not None:
            raise ValueError(
                f"cannot resume {path}: there are NaN or infinite numbers in its {what} "
                f"({bad}), so it is not a good checkpoint (the file was damaged, or saved by "
                f"a run that diverged); {_last_good(path)}")
    return ckpt


def _last_good(path):
    """Advice naming ``<path>.prev`` when it verifies and is finite, for a bad ``path``."""
    previous = previous_path(path)
    if not previous.is_file():
        return (f"no earlier checkpoint of this run is kept ({previous.name} does not exist): "
                f"start afresh without --resume, or restore {path} from a copy")
    try:
        ckpt = _read_good_run(previous)
    except (ValueError, OSError):
        return (f"{previous}, the checkpoint before it, does not verify either: start afresh "
                f"without --resume, or restore {path} from a copy")
    return (f"the last checkpoint that verifies is {previous} (step {ckpt.get('step')}): "
            f"`mv {previous} {path}` and --resume again, or start afresh without --resume")


def _check_same_base(ckpt, path, base, saved_lora):
    """Raise ValueError when the frozen base of a LoRA model (its state ``base``, before the
    saved adapters go in) is not the one the run was saved with; return its fingerprint."""
    now = _base_sha256(base, saved_lora["adapters"])
    saved = saved_lora.get("base_sha256")       # None: a checkpoint from before it was kept
    if saved is not None and saved != now:
        source = (ckpt.get("settings") or {}).get("init_from")
        raise ValueError(
            f"cannot resume {path}: its LoRA adapters were trained on other base weights than "
            f"{source or 'the model'} holds now (the frozen weights' fingerprint differs: the "
            f"source was re-saved or replaced); resume with the weights the run started from, "
            f"or train into a new --out without --resume")
    return now


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


def check_model_finite(gpt, current_loss, device, world_size, run, path, optimizer=None):
    """Raise FloatingPointError when the weights (or the ``optimizer``'s state) about to be
    saved, or the loss they give, are not finite: then nothing is written, and the last
    checkpoint stays, a good one to resume from.

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
    states = optimizer.state.values() if optimizer is not None else ()
    tensors = [*gpt.parameters(), *(t for state in states for t in state.values()
                                    if isinstance(t, torch.Tensor) and t.is_floating_point())]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    # .to(device): an optimizer may keep its step counts on the CPU
    weights_ok = float(torch.stack([torch.isfinite(t).all().to(device) for t in local]).all())
    if mean_across_processes(weights_ok, device, world_size) < 1.0:
        loss = float("nan")
    check_finite(loss, run, path, when="with the weights after")


# ---------------------------------------------------------------------------------------
# How one step moved the weights (the run's health, in the metrics log)

def clip_gradients(model, max_norm):
    """Scale the gradients down to a total norm of ``max_norm`` when above it (0 or None: no
    clipping); return their total norm before: a rising norm warns of divergence early.

    As torch.nn.utils.clip_grad_norm_, which multiplies every gradient by
    min(max_norm / (norm + 1e-6), 1) even when that is 1 (so that a GPU need not wait for the
    norm): here the norm is read anyway (the log), so that pass over every gradient (~25 ms
    a step at 124M on a 2-core CPU) is made only when it changes them. A non-finite norm
    still goes through it, as in PyTorch."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm and not bool(max_norm / (norm + 1e-6) >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def weights_copy(model):
    """A copy of every trainable weight (before an update, to measure it)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def update_ratios(model, before, group_of, device):
    """{part: ||update|| / ||weights||} of one optimizer step, the parts named by
    ``group_of(parameter name)``; ``before``: weights_copy from before the step."""
    sums = {}
    for name, p in model.named_parameters():
        if name in before:
            now, old = (t.to_local() if hasattr(t, "to_local") else t
                        for t in (p.detach(), before[name]))
            d, w = sums.get(group_of(name), (0.0, 0.0))
            sums[group_of(name)] = (d + float((now - old).float().pow(2).sum()),
                                    w + float(old.float().pow(2).sum()))
    # FSDP: each rank holds a shard of every weight, so the sums add up across ranks
    world = rank_and_world()[1] if any(hasattr(p, "to_local") for p in model.parameters()) else 1
    return {g: math.sqrt(mean_across_processes(d, device, world) /
                         max(mean_across_processes(w, device, world), 1e-30))
            for g, (d, w) in sums.items()}


# ---------------------------------------------------------------------------------------
# What the user sees

class RunLog:
    """The progress bar (when on), the lines printed above it, and the metrics log (rank 0).

    Every optimizer step and every evaluation is also one JSON line in ``metrics_path``
    (``<out>_metrics.jsonl`` beside the checkpoint), and, with ``tensorboard`` (a folder),
    the same numbers as TensorBoard scalars. A resumed run keeps the lines up to the step
    its checkpoint holds and appends from there (the steps after it, which a killed run may
    have logged, are trained again). As a context manager around the loop it closes the bar
    and the files on the way out, and turns Ctrl-C into a KeyboardInterrupt whose message
    says what is saved and how to go on.
    """

    def __init__(self, show_bar, total_steps, run, checkpoint_path, metrics_path=None,
                 tensorboard=None):
        self.main = rank_and_world()[0] == 0
        self.run, self.checkpoint_path = run, checkpoint_path
        self.bar = (tqdm(total=total_steps, initial=run.step, desc="training", unit="step")
                    if show_bar and self.main else None)
        self.metrics = self.board = None
        if self.main and metrics_path:
            self.metrics = _metrics_file(Path(metrics_path), run.saved_step)
        if self.main and tensorboard:
            self.board = _tensorboard_writer(tensorboard, run.saved_step)

    def write(self, msg):
        if self.main:
            (self.bar.write if self.bar is not None else print)(msg)

    def step(self, loss, lr, tokens=None, seconds=None, **health):
        """One optimizer step: the bar, and a "step" record (tokens: the step's own)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        speed = tokens / seconds if tokens and seconds else None
        self.record("step", loss=loss, lr=lr, tokens_per_s=speed, **health)

    def record(self, kind, **values):
        """A JSON line {"kind", "step", "tokens_seen", **values}, and its TensorBoard scalars."""
        if not self.main or (self.metrics is None and self.board is None):
            return
        run = self.run
        values = {k: v for k, v in values.items() if v is not None}     # not measured then
        line = {"kind": kind, "step": run.step, "tokens_seen": run.tokens_seen, **values}
        if self.metrics is not None:
            self.metrics.write(json.dumps(line) + "\n")
            self.metrics.flush()
        if self.board is not None:
            for name, value in _flat(values):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(f"{kind}/{name}", value, run.step)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for f in (self.bar, self.metrics, self.board):
            if f is not None:
                f.close()
        if exc_type is KeyboardInterrupt:
            run, path = self.run, self.checkpoint_path
            raise KeyboardInterrupt(f"interrupted at optimizer step {run.step}; " + (
                f"{path} holds step {run.saved_step}: continue from there with --resume and "
                f"the same settings (train_model(..., resume=True))"
                if run.saved_step is not None else "nothing of this run was saved yet")
            ) from None


def metrics_path(checkpoint_path):
    """``<out>_metrics.jsonl`` beside the checkpoint (like its _history.json and _loss.png)."""
    out = Path(checkpoint_path)
    return out.with_name(out.stem + "_metrics.jsonl")


def _metrics_file(path, saved_step):
    """The metrics log opened for appending: a fresh run's starts empty; a resumed run's
    keeps the lines of the steps its checkpoint holds (a cut last line is dropped)."""
    kept = []
    if saved_step is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= saved_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue        # the line a killed process was writing
    atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a", encoding="utf-8")


def _tensorboard_writer(folder, saved_step):
    """torch.utils.tensorboard's SummaryWriter for ``folder``; a resumed run's purges the
    events after its checkpoint's step. Needs the ``tensorboard`` package."""
    # TensorBoard imports TensorFlow when it is installed (seconds, and its log lines), only
    # to write event files it can write itself: this module name tells it not to.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package: pip install "
                          "tensorboard (or leave --tensorboard out: the metrics are in the "
                          "_metrics.jsonl file beside the checkpoint)") from None
    purge = None if saved_step is None else saved_step + 1
    return SummaryWriter(str(folder), purge_step=purge)


def _flat(values, prefix=""):
    """("update_to_weight/attention", 0.001), ... from nested dicts."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def note_replaced(path):
    """One line when a fresh run's checkpoints will replace another run's."""
    if not path or not Path(path).is_file():
        return
    try:
        ckpt = read_checkpoint(path, verify=False, mmap=True)
        what = f"a run saved at step {ckpt['step']}" if "step" in ckpt else "a model"
    except Exception:           # unreadable: it is replaced all the same
        what = "a file"
    print(f"note: {path} holds {what}; this run starts afresh and replaces it at its first "
          f"checkpoint (to continue that run instead, use --resume)")


# ---------------------------------------------------------------------------------------
# Before a run: which run is at a path, where its weights came from, one run at a time

def saved_run(path):
    """The checkpoint at ``path`` with its tensors mapped, not read (its config, settings
    and LoRA entries, cheaply); resume_run verifies the whole file later.

    A missing file is a FileNotFoundError that says what --resume needs (and names
    ``<path>.prev`` when a save was cut between its two renames)."""
    path = Path(path)
    if not path.is_file():
        previous = previous_path(path)
        kept = (f"; {previous} is the run's previous checkpoint: `mv {previous} {path}` to "
                f"resume from it" if previous.is_file() else "")
        raise FileNotFoundError(f"--resume: there is no checkpoint at {path} (--out) to "
                                f"continue{kept}; check --out, or start without --resume")
    try:
        return read_checkpoint(path, verify=False, mmap=True)
    except DamagedFileError as e:
        raise DamagedFileError(path, e.why, _last_good(path)) from None


def source_id(source):
    """How a run records the weights it started from: a local file or folder as its
    resolved path (``./hf`` and ``hf`` are one source), a Hub id or size name as given."""
    if source is None:
        return None
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def same_source(saved, now):
    """Whether two recorded sources (source_id) name the same weights; one that is gone
    from disk since (a moved or deleted folder) still matches its resolved path."""
    if saved is None or now is None:
        return saved == now
    return saved == now or Path(saved).resolve() == Path(now).resolve()


class RunInProgressError(OSError):
    """Another live process is writing the checkpoint this run would write."""


_HELD = {}      # lock path -> [open file descriptor, how many run_lock blocks hold it]


@contextlib.contextmanager
def run_lock(path):
    """Hold ``<path>.lock`` while a run may write ``path`` (rank 0 only; None: no lock).

    A second run on the same path is refused with RunInProgressError naming the process
    that holds the lock. The lock is one of the operating system's on that file
    (fcntl.flock; on Windows msvcrt.locking), so it ends with its process however that ends
    (kill -9 included); the file, which names the process, is removed on every normal way
    out. A file left by a process that is gone is taken over with a note. The same process
    may nest run_lock blocks on one path (train.py holds it around train_model, which takes
    it too). The lock file is written in place, not through fileio.atomic_write: the lock
    lives on the open file itself.
    """
    if not path or rank_and_world()[0] != 0:
        yield
        return
    lock = Path(f"{path}.lock").resolve()
    if lock in _HELD:
        _HELD[lock][1] += 1
        try:
            yield
        finally:
            _HELD[lock][1] -= 1
        return
    fd = _take_lock(lock, path)
    _HELD[lock] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[lock]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)     # names nobody now (Windows cannot remove an open file)
            lock.unlink()           # while still locked: a waiting run then makes a new file
        os.close(fd)


def _take_lock(lock, path):
    """Open and lock ``lock``; write this process into it; return its descriptor."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        holder = os.read(fd, 200).decode(errors="replace").strip()
        try:
            held = _is_held(fd, holder)
        except BaseException:
            os.close(fd)
            raise
        if held:
            os.close(fd)
            raise RunInProgressError(
                f"another run ({holder or 'a process'}) is writing {path} right now ({lock} is "
                f"held): wait for it to end or stop it, or choose another --out")
        # The file may have been removed between our open and our lock (by the run that
        # held it, on its way out): then the lock is on a file nobody else will open.
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if holder:
        print(f"note: {lock} was left by {holder}, which is no longer running (killed?); "
              f"taking it over")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    os.fsync(fd)
    return fd


# Windows locks byte ranges, and a locked range cannot be read by others: lock a byte far
# past the text naming the holder, so that a refused run can still say who it is.
_WINDOWS_LOCK_OFFSET = 1 << 30


def _is_held(fd, holder):
    """Whether another live process holds the lock on ``fd`` (else this one holds it now)."""
    try:
        if os.name == "nt":
            import msvcrt
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        if os.name == "nt":     # msvcrt's refusal (EACCES, EDEADLOCK)
            return True
    # A file system without flock (NFS without its lock daemon): the process id decides.
    words = holder.split()
    if len(words) < 4 or not words[1].isdigit() or words[3] != socket.gethostname():
        return bool(holder)     # another machine's (or unreadable): do not guess it is gone
    try:
        os.kill(int(words[1]), 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return int(words[1]) != os.getpid()
