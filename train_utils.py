"""Loss, evaluation, plots and the one training loop (train.py and train.ipynb both call it).

One optimizer step, as train_model does it:

    for each of grad_accum_steps micro-batches:        (B, T) token ids -> (B, T, vocab) logits
        loss = cross_entropy(logits, targets)          next-token prediction at every position
        (loss * share_of_the_step's_tokens).backward()  gradients add up across micro-batches
    clip the gradient norm -> set the scheduled learning rate -> AdamW step -> zero grads

Around it: evaluation every ``eval_freq`` steps, a sample after each epoch, and resumable
checkpoints (the helpers after train_model). Several processes (torchrun) are devices.py's.
"""

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader
from tqdm import tqdm  # the plain text bar: needs no widgets in notebooks

from cpu_kernels import tune_malloc
from devices import (
    gather,
    get_device,  # noqa: F401  (train_utils.get_device, as the README shows)
    grad_sync,
    is_fsdp,
    mean_across_processes,
    rank_and_world,
)
from fileio import atomic_write, ctrl_c_after, read_checkpoint
from generate import generate_and_print
from lora import lora_config, merged_state
from model import GPTModel, save_checkpoint, unwrap_model

# ---------------------------------------------------------------------------------------
# The loss: next-token cross-entropy

def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of predicting each next token in one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if isinstance(unwrap_model(model), GPTModel):
        # the same number as below, without holding every logit at once (GPTModel.loss)
        return model(input_batch, targets=target_batch)
    logits = model(input_batch)                                              # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Mean loss per target token over the first ``num_batches`` batches (all when None).

    Every token counts the same: a short last batch (drop_last=False) weighs by its
    tokens, not as much as a full batch, which averaging the batch means would do.
    """
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        return float("nan")
    total, n_tokens = 0.0, 0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= n:
            break
        loss = calc_loss_batch(input_batch, target_batch, model, device)
        total += loss.item() * target_batch.numel()      # the batch's summed loss
        n_tokens += target_batch.numel()
    return total / n_tokens


def _in_order(loader, batch_size=None):
    """The same batches without shuffling, so evaluations compare like with like.

    The loader gets a generator of its own because every DataLoader iterator draws a
    seed from one: from torch's global generator otherwise, which would make how often
    you evaluate change the dropout masks of training."""
    return DataLoader(loader.dataset, batch_size=batch_size or loader.batch_size,
                      shuffle=False, drop_last=loader.drop_last, collate_fn=loader.collate_fn,
                      generator=torch.Generator())


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """(train loss, validation loss) over ``eval_iter`` batches each, in eval mode."""
    was_training = model.training
    model.eval()
    train_loss = calc_loss_loader(_in_order(train_loader), model, device, num_batches=eval_iter)
    val_loss = calc_loss_loader(_in_order(val_loader), model, device, num_batches=eval_iter)
    model.train(was_training)
    return train_loss, val_loss


# ---------------------------------------------------------------------------------------
# The optimizer, the learning-rate schedule and the number of steps

def make_optimizer(model, learning_rate=4e-4, weight_decay=0.1, betas=(0.9, 0.95)):
    """AdamW that decays only the matrices of linear layers.

    Weight decay pulls weights towards zero. That regularises the big matrices, but for
    biases and LayerNorm gains it just fights useful values, and embeddings are rows
    looked up one token at a time, so they are left alone too (as in GPT-2 and nanoGPT).
    """
    model = unwrap_model(model)
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused=True does AdamW's whole update in one pass over each parameter instead of a
    # dozen whole-tensor operations: 62 ms instead of 190 ms per step for the 124M model
    # on CPU. PyTorch has it for CPU and CUDA; elsewhere (MPS) keep its default.
    params = decay + no_decay
    fused = True if not params or params[0].device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def lr_at(step, peak_lr, total_steps, warmup_steps=0, min_lr_ratio=0.1):
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from ~0 to ``peak_lr`` over ``warmup_steps`` (large early updates on
    random weights are unstable), then a cosine down to ``peak_lr * min_lr_ratio``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


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


# ---------------------------------------------------------------------------------------
# One optimizer step's gradients

def _autocast(device, dtype):
    """bf16 autocast: matmuls in bfloat16 (half the bytes, faster units), the rest fp32."""
    use_bf16 = dtype == "bf16"
    if dtype == "auto":   # on by default only where it is a sure win
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dtype not in ("fp32", "bf16", "auto"):
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'auto', got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def collate(samples):
    """[(input, target), ...] -> (inputs (B, T), targets (B, T))."""
    return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])


def accumulate_gradients(model, micro_batches, device, dtype="fp32"):
    """Forward and backward over several (inputs, targets) micro-batches; one step's worth.

    Each micro-batch's loss is weighted by its share of all target tokens in the group,
    so the summed gradient equals the gradient of one batch holding all of them, also
    when the last group of an epoch is short or its batches differ in size. Returns
    (the group's mean loss, its number of target tokens).
    """
    n_tokens = [targets.numel() for _, targets in micro_batches]
    group_tokens = sum(n_tokens)
    mean_loss = 0.0
    for k, (inputs, targets) in enumerate(micro_batches):
        # with several processes, gradients are averaged across them on the last one only
        with grad_sync(model, last=k == len(micro_batches) - 1):
            with _autocast(device, dtype):
                loss = calc_loss_batch(inputs, targets, model, device)
            (loss * (n_tokens[k] / group_tokens)).backward()
        mean_loss += loss.item() * n_tokens[k] / group_tokens
    return mean_loss, group_tokens


def recompute_activations(model):
    """Activation checkpointing, in place: each block keeps only its input during the
    forward pass and computes its activations again in backward, when they are needed.

    Fine-tuning memory is weights + gradients + AdamW's moments + activations; this cuts
    the last to about one block's worth, for about a third more compute per step
    (bench/finetune_memory.py). Values, dropout masks and gradients are unchanged (the
    recomputation replays the same random numbers), and so are the state dict's names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    gpt = unwrap_model(model)
    for i, block in enumerate(gpt.trf_blocks):
        gpt.trf_blocks[i] = checkpoint_wrapper(block)
    return model


# ---------------------------------------------------------------------------------------
# The training loop

def train_model(model, train_loader, val_loader, optimizer=None, device=None, num_epochs=1,
                eval_freq=50, eval_iter=5, start_context="Every effort moves you",
                tokenizer=None, *, learning_rate=4e-4, weight_decay=0.1, grad_accum_steps=1,
                warmup_steps=0, min_lr_ratio=0.1, max_steps=None, grad_clip=1.0, dtype="fp32",
                compile=False, seed=123, checkpoint_path=None, checkpoint_every=None,
                resume=False, settings=None, sample_tokens=50, progress=True,
                eval_at_start=False):
    """Train ``model`` on ``train_loader``'s dataset; return the history dict.

    The loaders supply datasets and batch sizes; the batch order comes from
    ``epoch_batches`` (seeded per epoch) so that ``resume=True`` continues from
    ``checkpoint_path`` exactly where the saved run was. ``optimizer`` defaults to
    ``make_optimizer(model, learning_rate, weight_decay)``; the learning rate of every
    group is set each step from ``lr_at``; ``warmup_steps=None`` means 5% of all steps
    (on resume: the saved run's). ``grad_clip`` 0 or None turns clipping off;
    ``checkpoint_every`` 0 or None saves only at the end; ``eval_at_start`` evaluates once
    before the first step (fine-tuning: where the pretrained model starts). Returns ``{"step",
    "tokens_seen", "epoch", "train_loss", "val_loss"}`` lists (one entry per evaluation),
    ``"step_loss"`` (one per optimizer step) and ``final_*`` values.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    _check_loop_args(grad_accum_steps, eval_freq, eval_iter, num_epochs, max_steps, grad_clip,
                     warmup_steps, checkpoint_every)
    rank, world_size = rank_and_world()
    if device.type == "cpu":
        tune_malloc()        # glibc keeps the activation buffers between steps (cpu_kernels)
    gpt = unwrap_model(model)
    optimizer = optimizer or make_optimizer(gpt, learning_rate, weight_decay)
    dataset, batch_size = train_loader.dataset, train_loader.batch_size
    shuffle = not isinstance(train_loader.sampler, torch.utils.data.SequentialSampler)
    plan = plan_steps(len(dataset), batch_size, grad_accum_steps, num_epochs, max_steps,
                      warmup_steps, world_size, train_loader.drop_last)
    if plan.batches_per_epoch == 0:
        raise ValueError(f"the training data gives no full batch of {batch_size} windows "
                         f"(it has {len(dataset)}); lower batch_size or add text")
    # what decides the batch order and the learning rate of every step (checked on resume)
    run_settings = dict(settings or {}, learning_rate=learning_rate, weight_decay=weight_decay,
                        grad_accum_steps=grad_accum_steps, warmup_steps=warmup_steps, seed=seed,
                        min_lr_ratio=min_lr_ratio, stride=getattr(dataset, "stride", None),
                        windows=len(dataset))
    run = TrainState()
    if resume:      # the saved weights, optimizer, RNG and position (and its warmup)
        run = _resume(checkpoint_path, gpt, optimizer, plan, num_epochs, rank, world_size,
                      batch_size, seed, run_settings)
    elif rank == 0:
        _note_replaced(checkpoint_path)
    run_settings.update(warmup_steps=plan.warmup_steps, total_steps=plan.total_steps)
    # Every process evaluates the same windows: those of the first eval_iter global
    # batches, so the figures do not depend on how many processes share the work.
    eval_loaders = (_in_order(train_loader, batch_size * world_size),
                    _in_order(val_loader, val_loader.batch_size * world_size))
    log = _Log(progress and rank == 0, plan.total_steps, run, checkpoint_path)

    def evaluate():
        _evaluate(model, eval_loaders, device, eval_iter, run, plan, log)

    def save():     # never a diverged model: the last good checkpoint stays good
        _check_model_finite(model, gpt, eval_loaders[0], device, world_size, run, checkpoint_path)
        _save(checkpoint_path, gpt, optimizer, run, world_size, batch_size, run_settings)

    fwd_model = torch.compile(model) if compile else model
    model.train()
    start_time = time.time()
    with log:       # closes the progress bar; Ctrl-C says what is saved
        if eval_at_start and run.step == 0:
            evaluate()
        while run.step < plan.total_steps and run.epoch < num_epochs:
            batches = epoch_batches(len(dataset), batch_size, shuffle, train_loader.drop_last, seed,
                                    run.epoch, rank, world_size)
            while run.batch_in_epoch < len(batches) and run.step < plan.total_steps:
                # one optimizer step: the next grad_accum_steps micro-batches of windows
                step_batches = batches[run.batch_in_epoch:run.batch_in_epoch + grad_accum_steps]
                micro_batches = [collate([dataset[i] for i in batch]) for batch in step_batches]
                loss, n_tokens = accumulate_gradients(fwd_model, micro_batches, device, dtype)
                loss = mean_across_processes(loss, device, world_size)   # the log, the NaN check
                _check_finite(loss, run, checkpoint_path)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                lr = lr_at(run.step, learning_rate, plan.total_steps, plan.warmup_steps,
                           min_lr_ratio)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                run.batch_in_epoch += len(step_batches)
                run.tokens_seen += n_tokens * world_size
                run.history["step_loss"].append(loss)
                log.step(loss, lr)
                if run.step % eval_freq == 0:
                    evaluate()
                if checkpoint_every and run.step % checkpoint_every == 0:
                    save()
            if run.batch_in_epoch >= len(batches):
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
                _sample(model, gpt, tokenizer, device, start_context, sample_tokens, rank,
                        seed + run.epoch)
        if not run.history["step"] or run.history["step"][-1] != run.step:
            evaluate()
        save()
    return run.finish(time.time() - start_time)


def save_history(history, path):
    """Write the loss history as JSON, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(history, indent=1).encode()))


# ---------------------------------------------------------------------------------------
# The loop's helpers: its position, evaluation, samples, the log, checks

def _new_history():
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
    history: dict = field(default_factory=_new_history)
    saved_step: int = None      # the step the checkpoint file holds (None: none of this run)

    def finish(self, elapsed_s):
        """The history with the final_* values train_model returns."""
        h = self.history
        h.update(final_step=self.step, final_train_loss=h["train_loss"][-1],
                 final_val_loss=h["val_loss"][-1], elapsed_s=elapsed_s)
        return h


def _evaluate(model, eval_loaders, device, eval_iter, run, plan, log):
    """Evaluate, add the result to the history and print one line."""
    train_loss, val_loss = evaluate_model(model, *eval_loaders, device, eval_iter)
    h = run.history
    h["step"].append(run.step)
    h["tokens_seen"].append(run.tokens_seen)
    h["epoch"].append(run.epoch + run.batch_in_epoch / plan.batches_per_epoch)
    h["train_loss"].append(train_loss)
    h["val_loss"].append(val_loss)
    shown_epoch = run.epoch + 1 if run.batch_in_epoch else run.epoch    # 1-based, just ended
    log.write(f"Ep {shown_epoch} (Step {run.step:06d}): "
              f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")


def _sample(model, gpt, tokenizer, device, start_context, sample_tokens, rank, seed):
    """After each epoch: print how the model continues ``start_context`` (rank 0).

    Sampled as generate.py samples (temperature 0.8, top-k 50): greedy decoding of a young
    model repeats its most frequent token, mostly newlines. The draws come from a generator
    of their own, seeded by the run's seed: the sample is the same in every run, and
    training's random numbers are untouched (a resumed run stays the same).
    """
    if tokenizer is None or not start_context:
        return
    generator = torch.Generator(device).manual_seed(seed)
    sample = partial(generate_and_print, gpt, tokenizer, device, start_context, sample_tokens,
                     temperature=0.8, top_k=50, generator=generator)
    if rank == 0:
        sample()
    elif is_fsdp(model):
        # FSDP needs every rank in each forward pass (they gather the shards).
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            sample()


class _Log:
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


def _note_replaced(path):
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


def _check_loop_args(grad_accum_steps, eval_freq, eval_iter, num_epochs, max_steps, grad_clip,
                     warmup_steps, checkpoint_every):
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if eval_freq < 1 or eval_iter < 1:
        raise ValueError(f"eval_freq and eval_iter must be >= 1, got {eval_freq}, {eval_iter}")
    if num_epochs < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"num_epochs and max_steps (when given) must be >= 1, got "
                         f"{num_epochs}, {max_steps}: fewer trains nothing, and would still "
                         f"overwrite checkpoint_path with the untrained weights")
    if grad_clip is not None and grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 or None = no clipping), got {grad_clip}: "
                         f"clipping to a negative norm flips the gradients")
    if (warmup_steps is not None and warmup_steps < 0) or (checkpoint_every is not None
                                                           and checkpoint_every < 0):
        raise ValueError(f"warmup_steps and checkpoint_every must be >= 0, got {warmup_steps}, "
                         f"{checkpoint_every}")


def _check_finite(loss, run, checkpoint_path, when="at"):
    """Stop a diverged run, keeping the last checkpoint it saved (always a finite one)."""
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint is {checkpoint_path} (step {run.saved_step})"
                if run.saved_step is not None else "nothing of this run was saved")
        raise FloatingPointError(
            f"loss became {loss} {when} optimizer step {run.step}; training stopped and {kept}. "
            f"Lower learning_rate, raise warmup_steps or keep gradient clipping on.")


def _check_model_finite(model, gpt, loader, device, world_size, run, path):
    """Raise FloatingPointError when the weights about to be saved, or the loss they give,
    are not finite: then nothing is written, and the last checkpoint stays.

    A step's loss is computed before its update, so an update that breaks the weights
    shows only in the next step's loss: too late for a checkpoint written right after it.
    The loss of the current weights is the last evaluation's when it was just made, else
    that of one batch of ``loader`` (every process takes part: FSDP needs them all).
    """
    if not path:
        return
    h = run.history
    if h["step"] and h["step"][-1] == run.step:
        loss = h["train_loss"][-1]
    else:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = calc_loss_loader(loader, model, device, num_batches=1)
        model.train(was_training)
        loss = mean_across_processes(loss, device, world_size)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in gpt.parameters()]
    weights_ok = float(torch.stack([torch.isfinite(t).all() for t in local]).all())
    if mean_across_processes(weights_ok, device, world_size) < 1.0:
        loss = float("nan")
    _check_finite(loss, run, path, when="with the weights after")


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
# Checkpoints of a run: save, and resume exactly where it was

def _save(path, gpt, optimizer, run, world_size, batch_size, settings):
    """Write the whole training state to ``path`` (a collective: every rank calls it)."""
    if not path:
        return
    # Gathering the full state is a collective: every rank takes part, rank 0 writes.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(gpt, options=full)
    optim_state = get_optimizer_state_dict(gpt, optimizer, options=full)
    rng_states = gather(_rng_state(), world_size)
    extra = {}
    adapted = lora_config(gpt)
    if adapted is not None:     # the merged weights load anywhere, the adapters resume the run
        model_state, adapters = merged_state(model_state, adapted)
        extra["lora"] = {**adapted, "adapters": adapters}
    with ctrl_c_after():        # the file and saved_step change together (the Ctrl-C message)
        if rank_and_world()[0] == 0:
            save_checkpoint(path, gpt, **extra, model_state_dict=model_state,
                            optimizer_state_dict=optim_state, step=run.step, epoch=run.epoch,
                            batch_in_epoch=run.batch_in_epoch, tokens_seen=run.tokens_seen,
                            history=run.history, rng_state=rng_states, world_size=world_size,
                            batch_size=batch_size, settings=settings)
        run.saved_step = run.step


# Training settings a resumed run must keep: with them the batch order (seed) and the
# learning rate of every step (the rest) are those of the run it continues. The global batch
# (batch_size x grad_accum_steps x processes) is checked too. Free to change on resume:
# num_epochs and max_steps (to extend a run; the cosine then ends at the new last step),
# how often to evaluate and checkpoint, the sample prompt, dtype, device, compile, and the
# number of processes, with a batch_size that keeps the global batch.
RESUME_MUST_MATCH = ("seed", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                     "data", "stride", "windows", "init_from")


def _resume(path, gpt, optimizer, plan, num_epochs, rank, world_size, batch_size, seed, now):
    """Load the run saved at ``path`` into ``gpt`` and ``optimizer``.

    Returns its TrainState; ``plan`` takes the saved warmup when ``now`` gives none.
    ``now``: this run's settings, which must match the saved ones (RESUME_MUST_MATCH, the
    global batch).
    """
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
    _check_resume_settings(ckpt, path, now, batch_size, world_size)
    saved_lora, lora_now = ckpt.get("lora"), lora_config(gpt)
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


def _check_resume_settings(ckpt, path, now, batch_size, world_size):
    """Raise ValueError naming every setting that differs from the saved run's."""
    saved = ckpt.get("settings") or {}
    diffs = _differences(saved, now, [k for k in RESUME_MUST_MATCH if k in saved and k in now])
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
# What a run leaves to look at

def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path="loss_plot.png",
                step_losses=None, tokens_per_step=None):
    """Save a PNG of training and validation loss against tokens seen (epochs on top).

    The losses of the evaluations make the two main curves. ``step_losses`` (the history's
    "step_loss": one per optimizer step, on that step's batch) adds a faint line that shows
    what happens between evaluations, the first steps' fall from ~10.8 included; it needs
    ``tokens_per_step`` (global batch x context length) to place the steps.
    """
    if step_losses is not None and not tokens_per_step:
        raise ValueError("step_losses needs tokens_per_step (batch_size x grad_accum_steps x "
                         "processes x context_length) to place each step on the tokens axis")
    import matplotlib
    matplotlib.use("Agg")   # no window: works headless, in CI and in notebooks alike
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if step_losses is not None:
        step_tokens = [tokens_per_step * (i + 1) for i in range(len(step_losses))]
        ax.plot(step_tokens, step_losses, color="tab:blue", alpha=0.3, linewidth=0.8,
                label="Training loss, each step's batch")
    ax.plot(tokens_seen, train_losses, color="tab:blue", label="Training loss")
    ax.plot(tokens_seen, val_losses, color="tab:orange", linestyle="-.", label="Validation loss")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    if len(epochs_seen) > 1 and epochs_seen[-1] > epochs_seen[0] and tokens_seen[-1] > 0:
        # a second x axis on top, in epochs: each epoch is the same number of tokens
        per_token = epochs_seen[-1] / tokens_seen[-1]
        top = ax.secondary_xaxis("top", functions=(lambda t: t * per_token,
                                                   lambda e: e / per_token))
        top.set_xlabel("Epochs")
    fig.tight_layout()
    try:
        path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), by_path=True)
    finally:
        plt.close(fig)
    return path


def print_model_params(model):
    """Print and return the parameter count (a tied head is counted once) and fp32 size."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())      # parameters() skips shared ones
    head = model.out_head.weight
    tied = head is model.tok_emb.weight
    print(f"Total parameters: {total:,}" + (" (output head tied to token embedding)" if tied
                                            else f"; without the output head: "
                                                 f"{total - head.numel():,}"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable < total:       # some are frozen (LoRA: only the adapters train)
        print(f"Trainable parameters: {trainable:,} ({100 * trainable / total:.2f}%); frozen: "
              f"{total - trainable:,}")
    print(f"Size in fp32: {total * 4 / 1024**2:.1f} MB")
    return total
