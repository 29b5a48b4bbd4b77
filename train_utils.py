"""Loss, evaluation, plots and the one training loop (train.py and train.ipynb both call it).

One optimizer step, as train_model does it:

    for each of grad_accum_steps micro-batches:        (B, T) token ids -> (B, T, vocab) logits
        loss = cross_entropy(logits, targets)          next-token prediction at every position
        (loss * share_of_the_step's_tokens).backward()  gradients add up across micro-batches
    clip the gradient norm -> set the scheduled learning rate -> AdamW step -> zero grads
"""

import contextlib
import ctypes
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm  # the plain text bar: needs no widgets in notebooks

from generate import generate_and_print
from model import atomic_write, read_checkpoint, save_checkpoint, unwrap_model


def get_device(preferred=None):
    """torch.device to run on: CUDA, then Apple's MPS, then CPU; or the one asked for."""
    if preferred is None or str(preferred) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {str(preferred)!r}; choose cuda, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(preferred)!r} was asked for, but this PyTorch sees no CUDA "
                         f"GPU; use --device cpu or install a CUDA build of torch")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(preferred)!r} was asked for, but MPS (Apple GPU) is not "
                         f"available here; use --device cpu")
    return device


def tune_malloc():
    """Ask glibc's malloc to keep freed memory for reuse; returns True if it took effect.

    Every training step allocates and frees the same large activation buffers. By default
    glibc serves big requests with fresh mmap()s and hands freed memory back to the OS, so
    each step page-faults all of it in again: about a quarter of a small CPU run's time
    went there (steps got 1.2-1.4x faster with this). Keeping the memory costs nothing
    new: the process's footprint stays at its peak, which it reaches every step anyway.
    Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...
    set before Python starts. Does nothing off Linux/glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):   # glibc only: musl has no such tunables
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # from glibc's <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of predicting each next token in one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
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
    print(f"Size in fp32: {total * 4 / 1024**2:.1f} MB")
    return total


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
        last = k == len(micro_batches) - 1
        sync = _grad_sync(model, last)
        with sync:
            with _autocast(device, dtype):
                loss = calc_loss_batch(inputs, targets, model, device)
            (loss * (n_tokens[k] / group_tokens)).backward()
        mean_loss += loss.item() * n_tokens[k] / group_tokens
    return mean_loss, group_tokens


# ---------------------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel or FSDP2.
#
# torchrun starts one process per device and tells each its RANK and WORLD_SIZE. Every
# process holds the model (DDP: whole; FSDP: a shard of each weight), trains on its own
# slice of each batch, and the gradients are averaged across processes before the step,
# so all of them take the same step.

def setup_distributed(device_preference=None, backend=None):
    """Join the process group if launched by torchrun; return (device, rank, world_size).

    Without torchrun this returns (get_device(device_preference), 0, 1) and changes nothing.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return get_device(device_preference), 0, 1
    device = get_device(device_preference)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA GPUs but the device is {device.type}; "
                         f"use --backend gloo (the default on CPU)")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             f"GPUs here; set --nproc_per_node to at most the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return device, dist.get_rank(), dist.get_world_size()


def wrap_model(model, parallel, device):
    """Wrap ``model`` for several processes: "ddp" (a full copy per process, gradients
    all-reduced) or "fsdp" (FSDP2 ``fully_shard``: each block's weights, gradients and
    optimizer state split across processes, gathered one block at a time when needed,
    which is what lets 774M/1558M models train on cards too small for a whole copy)."""
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.trf_blocks:
            fully_shard(block)          # one all-gather per block, freed after use
        fully_shard(model)              # the embeddings, final norm and head
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def barrier():
    """Wait until every process gets here (no-op without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _grad_sync(model, last):
    """Context for one micro-batch's backward: average gradients across processes only
    on the last micro-batch of a step (the earlier ones just add up locally)."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    if _is_fsdp(model):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _gather(obj, world_size):
    """Every rank's ``obj`` as a list on rank 0 (a list of one without torchrun)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _check_finite(loss, step, checkpoint_path):
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint is {checkpoint_path}" if checkpoint_path
                and Path(checkpoint_path).exists() else "no checkpoint was written yet")
        raise FloatingPointError(
            f"loss became {loss} at optimizer step {step}; training stopped and {kept}. "
            f"Lower learning_rate, raise warmup_steps or keep gradient clipping on.")


# Training settings a resumed run must keep: with them the batch order (seed) and the
# learning rate of every step (the rest) are those of the run it continues. The global batch
# (batch_size x grad_accum_steps x processes) is checked too. Free to change on resume:
# num_epochs and max_steps (to extend a run; the cosine then ends at the new last step),
# how often to evaluate and checkpoint, the sample prompt, dtype, device, compile, and the
# number of processes, with a batch_size that keeps the global batch.
RESUME_MUST_MATCH = ("seed", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay")


def _differences(saved, now, keys):
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys
            if saved.get(k) != now.get(k)]


def _check_resume_settings(ckpt, path, now, batch_size, world_size):
    """Raise ValueError naming every setting that differs from the saved run's."""
    saved = ckpt.get("settings") or {}
    diffs = _differences(saved, now, [k for k in RESUME_MUST_MATCH if k in saved])
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


def train_model(model, train_loader, val_loader, optimizer=None, device=None, num_epochs=1,
                eval_freq=50, eval_iter=5, start_context="Every effort moves you",
                tokenizer=None, *, learning_rate=4e-4, weight_decay=0.1, grad_accum_steps=1,
                warmup_steps=0, min_lr_ratio=0.1, max_steps=None, grad_clip=1.0, dtype="fp32",
                compile=False, seed=123, checkpoint_path=None, checkpoint_every=None,
                resume=False, settings=None, sample_tokens=50, progress=True):
    """Train ``model`` on ``train_loader``'s dataset; return the history dict.

    The loaders supply datasets and batch sizes; the batch order comes from
    ``epoch_batches`` (seeded per epoch) so that ``resume=True`` continues from
    ``checkpoint_path`` exactly where the saved run was. ``optimizer`` defaults to
    ``make_optimizer(model, learning_rate, weight_decay)``; the learning rate of every
    group is set each step from ``lr_at``; ``warmup_steps=None`` means 5% of all steps
    (on resume: the saved run's). ``grad_clip`` 0 or None turns clipping off;
    ``checkpoint_every`` 0 or None saves only at the end. Returns ``{"step",
    "tokens_seen", "epoch", "train_loss", "val_loss"}`` lists (one entry per evaluation),
    ``"step_loss"`` (one per optimizer step) and ``final_*`` values.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
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
    rank, world_size = _rank_and_world()
    main_process = rank == 0
    fsdp = _is_fsdp(model)
    if device.type == "cpu":
        tune_malloc()
    core = unwrap_model(model)
    optimizer = optimizer or make_optimizer(core, learning_rate, weight_decay)
    dataset, batch_size = train_loader.dataset, train_loader.batch_size
    shuffle = not isinstance(train_loader.sampler, torch.utils.data.SequentialSampler)

    n_batches = len(epoch_batches(len(dataset), batch_size, False, train_loader.drop_last,
                                  seed, 0, rank, world_size))
    if n_batches == 0:
        raise ValueError(f"the training data gives no full batch of {batch_size} windows "
                         f"(it has {len(dataset)}); lower batch_size or add text")
    steps_per_epoch = math.ceil(n_batches / grad_accum_steps)
    total_steps = num_epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    step, epoch, batch_in_epoch, tokens_seen = 0, 0, 0, 0
    history = {"step": [], "tokens_seen": [], "epoch": [], "train_loss": [], "val_loss": [],
               "step_loss": []}      # step_loss: the training loss of every optimizer step
    if resume:
        ckpt = read_checkpoint(checkpoint_path)
        saved_cfg = ckpt.get("config") or {}
        if saved_cfg != core.cfg:
            diffs = _differences(saved_cfg, core.cfg, sorted(set(saved_cfg) | set(core.cfg)))
            raise ValueError(f"checkpoint {checkpoint_path} was trained with another model "
                             f"config: {'; '.join(diffs)}. Resume with the saved values, or "
                             f"train into a new --out without --resume.")
        if "optimizer_state_dict" not in ckpt:
            raise ValueError(f"{checkpoint_path} holds weights only, not a training state; "
                             f"it cannot be resumed")
        if warmup_steps is None:
            warmup_steps = (ckpt.get("settings") or {}).get("warmup_steps")
        _check_resume_settings(
            ckpt, checkpoint_path, {"seed": seed, "learning_rate": learning_rate,
                                    "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                    "weight_decay": weight_decay,
                                    "grad_accum_steps": grad_accum_steps},
            batch_size, world_size)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(core, ckpt["model_state_dict"], options=full)
        set_optimizer_state_dict(core, optimizer, ckpt["optimizer_state_dict"], options=full)
        step, epoch = ckpt["step"], ckpt["epoch"]
        batch_in_epoch, tokens_seen = ckpt["batch_in_epoch"], ckpt["tokens_seen"]
        history = ckpt["history"]
        if ckpt.get("world_size", 1) == world_size:
            _set_rng_state(ckpt["rng_state"][rank])
        else:
            # Another number of processes sees the data in other slices anyway; fresh
            # random streams (for dropout) are as good as the saved ones then.
            torch.manual_seed(seed * 1_000 + step * 10 + rank)
        # The saved position counts micro-batches of the old shape (batch_size x processes
        # windows each); count it in windows, then in this run's micro-batches. With the
        # global batch unchanged (checked above) that is the same place in the epoch.
        saved_shape = ckpt.get("batch_size", batch_size) * ckpt.get("world_size", 1)
        batch_in_epoch = batch_in_epoch * saved_shape // (batch_size * world_size)
        if main_process and (step >= total_steps or epoch >= num_epochs):
            print(f"{checkpoint_path} is a finished run (step {step} of {total_steps}): "
                  f"nothing left to train; raise --num-epochs or --max-steps to go on.")
        elif main_process:
            print(f"Resumed from {checkpoint_path} at step {step} (epoch {epoch + 1}, "
                  f"batch {batch_in_epoch}).")

    if warmup_steps is None:
        warmup_steps = max(1, total_steps // 20)
    train_settings = dict(settings or {}, learning_rate=learning_rate, grad_accum_steps=
                          grad_accum_steps, warmup_steps=warmup_steps, seed=seed,
                          total_steps=total_steps, min_lr_ratio=min_lr_ratio,
                          weight_decay=weight_decay)

    def save(path):
        if not path:
            return
        # Gathering the full state is a collective: every rank takes part, rank 0 writes.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(core, options=full)
        optim_state = get_optimizer_state_dict(core, optimizer, options=full)
        rng_states = _gather(_rng_state(), world_size)
        if main_process:
            save_checkpoint(path, core, model_state_dict=model_state,
                            optimizer_state_dict=optim_state, step=step, epoch=epoch,
                            batch_in_epoch=batch_in_epoch, tokens_seen=tokens_seen,
                            history=history, rng_state=rng_states, world_size=world_size,
                            batch_size=batch_size, settings=train_settings)

    # Every process evaluates the same windows: those of the first eval_iter global
    # batches, so the figures do not depend on how many processes share the work.
    eval_train = _in_order(train_loader, batch_size * world_size)
    eval_val = _in_order(val_loader, val_loader.batch_size * world_size)

    def evaluate():
        train_loss, val_loss = evaluate_model(model, eval_train, eval_val, device, eval_iter)
        history["step"].append(step)
        history["tokens_seen"].append(tokens_seen)
        history["epoch"].append(epoch + batch_in_epoch / n_batches)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        if main_process:
            shown_epoch = epoch + 1 if batch_in_epoch else epoch    # 1-based, just ended
            _write(f"Ep {shown_epoch} (Step {step:06d}): "
                   f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        return train_loss, val_loss

    bar = None
    if progress and main_process:
        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step")

    def _write(msg):
        (bar.write if bar is not None else print)(msg)

    fwd_model = torch.compile(model) if compile else model
    model.train()
    start_time = time.time()
    while step < total_steps and epoch < num_epochs:
        batches = epoch_batches(len(dataset), batch_size, shuffle, train_loader.drop_last, seed,
                                epoch, rank, world_size)
        while batch_in_epoch < len(batches) and step < total_steps:
            group = batches[batch_in_epoch:batch_in_epoch + grad_accum_steps]
            micro_batches = [collate([dataset[i] for i in idxs]) for idxs in group]
            step_loss, group_tokens = accumulate_gradients(fwd_model, micro_batches, device,
                                                           dtype)
            if world_size > 1:     # the mean over all processes, for the log and NaN check
                t = torch.tensor([step_loss], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                step_loss = t.item() / world_size
            _check_finite(step_loss, step, checkpoint_path)
            history["step_loss"].append(step_loss)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            for group_ in optimizer.param_groups:
                group_["lr"] = lr_at(step, learning_rate, total_steps, warmup_steps,
                                     min_lr_ratio)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch += len(group)
            tokens_seen += group_tokens * world_size
            if bar is not None:
                bar.update(1)
                lr_now = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr_now:.2e}")
            if step % eval_freq == 0:
                evaluate()
            if checkpoint_every and step % checkpoint_every == 0:
                save(checkpoint_path)
        if batch_in_epoch >= len(batches):
            epoch += 1
            batch_in_epoch = 0
            if tokenizer is not None and start_context and main_process:
                generate_and_print(core, tokenizer, device, start_context, sample_tokens)
            elif tokenizer is not None and start_context and fsdp:
                # FSDP needs every rank in each forward pass (they gather the shards).
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                    generate_and_print(core, tokenizer, device, start_context, sample_tokens)
    if bar is not None:
        bar.close()
    if not history["step"] or history["step"][-1] != step:
        evaluate()
    save(checkpoint_path)
    history["final_step"] = step
    history["final_train_loss"] = history["train_loss"][-1]
    history["final_val_loss"] = history["val_loss"][-1]
    history["elapsed_s"] = time.time() - start_time
    return history


def save_history(history, path):
    """Write the loss history as JSON, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(history, indent=1).encode()))
