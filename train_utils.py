"""Loss, evaluation, plots and the one training loop (train.py and train.ipynb both call it).

One optimizer step, as train_model does it:

    for each of grad_accum_steps micro-batches:        (B, T) token ids -> (B, T, vocab) logits
        loss = cross_entropy(logits, targets)          next-token prediction at every position
        (loss * share_of_the_step's_tokens).backward()  gradients add up across micro-batches
    clip the gradient norm -> set the scheduled learning rate -> AdamW step -> zero grads

Around it: evaluation every ``eval_freq`` steps, a sample after each epoch, and resumable
checkpoints. A run's settings are one TrainConfig; saving, resuming and the checks around
them are engine/runs.py's, several processes (torchrun) engine/devices.py's.
"""

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.cpu_kernels import tune_malloc
from engine.devices import (  # get_device, recompute_activations: as the README shows them
    get_device,  # noqa: F401
    grad_sync,
    is_fsdp,
    mean_across_processes,
    rank_and_world,
    recompute_activations,  # noqa: F401
    training_precision,
)
from engine.fileio import atomic_write
from engine.fused_loss import IGNORE_INDEX
from engine.runs import (
    RunLog,
    TrainState,
    check_finite,
    check_model_finite,
    epoch_batches,
    metrics_path,
    note_replaced,
    resume_run,
    run_lock,
    save_run,
    update_ratios,
    weights_copy,
)
from evaluate import task_scorer
from generate import generate_and_print
from look_inside import plot_losses, print_model_params  # noqa: F401  (as the README shows)
from lora import lora_config, merged_state
from model import GPTModel, unwrap_model

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
    """Mean loss per scored target token over the first ``num_batches`` batches (all when
    None).

    Every token counts the same: a short last batch (drop_last=False) weighs by its
    tokens, not as much as a full batch, which averaging the batch means would do; and a
    target the loss skips (IGNORE_INDEX: padding, an instruction's prompt) does not count.
    """
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        return float("nan")
    total, n_tokens = 0.0, 0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= n:
            break
        scored = scored_tokens(target_batch)
        if scored:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total += loss.item() * scored                # the batch's summed loss
            n_tokens += scored
    return total / n_tokens if n_tokens else float("nan")


def scored_tokens(targets):         # the targets the loss counts: all but IGNORE_INDEX's
    return int((targets != IGNORE_INDEX).sum())


def _in_order(loader, batch_size=None):
    """The same batches without shuffling, so evaluations compare like with like. Its own
    generator: every DataLoader iterator draws a seed, from torch's global generator
    otherwise, and how often you evaluate would change training's dropout masks."""
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
    biases and LayerNorm gains it just fights useful values; embeddings are rows looked up
    a token at a time (a rare token's row would shrink between its rare updates), so they
    are left alone too, as in minGPT (nanoGPT decays every 2-D tensor; the GPT-2 paper
    states no policy). An untied output head, a linear layer, is decayed; tied, it is the
    token embedding and is not."""
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
    # dozen whole-tensor operations (bench/README.md has the figures). PyTorch has it for
    # CPU and CUDA; elsewhere (MPS) keep its default.
    params = decay + no_decay
    fused = True if not params or params[0].device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def lr_at(step, peak_lr, total_steps, warmup_steps=0, min_lr_ratio=0.1):
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps``: step 0 takes ``peak_lr / warmup_steps``, and the
    last warmup step ``peak_lr`` (large early updates on random weights are unstable); then a
    cosine down to ``peak_lr * min_lr_ratio``.
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
    """bf16 autocast: matmuls in bfloat16 (half the bytes, faster units), the rest fp32;
    "auto": where bf16 is native (engine.devices.training_precision)."""
    use_bf16 = training_precision(device, dtype)[0] == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def accumulate_gradients(model, micro_batches, device, dtype="fp32"):
    """Forward and backward over several (inputs, targets) micro-batches; one step's worth.

    Each micro-batch's loss is weighted by its share of all scored target tokens of the
    step (every process's), so the summed gradient equals the gradient of one batch holding
    all of them, also when the last group of an epoch is short or batches of instruction
    records score different numbers of tokens. Returns (the step's mean loss, its number of
    scored tokens over all processes).
    """
    _, world_size = rank_and_world()
    n_tokens = [scored_tokens(targets) for _, targets in micro_batches]
    # several processes: their gradients are averaged, so each weighs its tokens by the
    # count of all of them (for text, every process has the same count)
    step_tokens = round(mean_across_processes(sum(n_tokens), device, world_size) * world_size)
    mean_loss = 0.0
    for k, (inputs, targets) in enumerate(micro_batches):
        share = n_tokens[k] * world_size / max(step_tokens, 1)
        # with several processes, gradients are averaged across them on the last one only
        with grad_sync(model, last=k == len(micro_batches) - 1):
            with _autocast(device, dtype):
                loss = calc_loss_batch(inputs, targets, model, device)
            if not n_tokens[k]:         # nothing scored: NaN, which must not reach a gradient
                loss = loss.nan_to_num(0.0)
            (loss * share).backward()
        mean_loss += loss.item() * share
    return mean_loss, step_tokens


# ---------------------------------------------------------------------------------------
# The settings of a run

@dataclass
class TrainConfig:
    """Everything train_model needs besides the model and the data (train.py: one flag each).

    The checkpoint records these (with the data's stride and window count); a resumed run
    must keep those in RESUME_MUST_MATCH. ``settings`` holds extra values to record, such as
    train.py's data file and the source of the weights (``data``, ``init_from``).
    """
    num_epochs: int = 1             # passes over the training windows
    max_steps: int = None           # stop after this many optimizer steps (None: all epochs)
    learning_rate: float = 4e-4     # peak learning rate of the schedule (lr_at)
    warmup_steps: int = 0           # linear warmup; None: 5% of all steps (on resume: saved)
    min_lr_ratio: float = 0.1       # the cosine ends at learning_rate x this
    weight_decay: float = 0.1       # AdamW's, on the matrices (make_optimizer)
    grad_accum_steps: int = 1       # micro-batches per optimizer step
    grad_clip: float = 1.0          # clip the gradient norm to this; 0 or None: no clipping
    dtype: str = "fp32"             # "bf16": autocast; "auto": bf16 where it is a sure win
    compile: bool = False           # torch.compile the model
    seed: int = 123                 # decides the batch order (and the samples)
    eval_freq: int = 50             # evaluate every N optimizer steps
    eval_iter: int = 5              # batches per evaluation (train and validation)
    eval_at_start: bool = False     # evaluate before the first step (fine-tuning)
    eval_task: str = None           # also a benchmark at every evaluation: "hellaswag:200"
    eval_data: str = None           # its file (None: data/eval/, downloaded on first use)
    tensorboard: str = None         # a folder: the metrics as TensorBoard scalars too
    tokenizer_json: str = None      # the run's own vocabulary (tokenizer.py); None: GPT-2's
    start_context: str = "Every effort moves you"     # prompt of the sample after each epoch
    sample_tokens: int = 50         # tokens of that sample
    checkpoint_path: str = None     # where the run is saved (None: nowhere)
    checkpoint_every: int = None    # save every N steps too (0 or None: only at the end)
    resume: bool = False            # continue the run saved at checkpoint_path
    progress: bool = True           # show a progress bar
    settings: dict = field(default_factory=dict)      # extra values the checkpoint records

    def __post_init__(self):
        if self.grad_accum_steps < 1 or self.eval_freq < 1 or self.eval_iter < 1:
            raise ValueError(f"grad_accum_steps, eval_freq and eval_iter must be >= 1, got "
                             f"{self.grad_accum_steps}, {self.eval_freq}, {self.eval_iter}")
        if self.num_epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"num_epochs and max_steps (when given) must be >= 1, got "
                             f"{self.num_epochs}, {self.max_steps}: fewer trains nothing, and "
                             f"would still overwrite checkpoint_path with the untrained weights")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 or None = no clipping), got "
                             f"{self.grad_clip}: clipping to a negative norm flips the gradients")
        if (self.warmup_steps is not None and self.warmup_steps < 0) or (
                self.checkpoint_every is not None and self.checkpoint_every < 0):
            raise ValueError(f"warmup_steps and checkpoint_every must be >= 0, got "
                             f"{self.warmup_steps}, {self.checkpoint_every}")


# Settings a resumed run must keep: with them the batch order (seed) and the learning rate
# of every step (the rest) are those of the run it continues. The global batch
# (batch_size x grad_accum_steps x processes) is checked too. Free to change on resume:
# num_epochs and max_steps (to extend a run; the cosine then ends at the new last step),
# how often to evaluate and checkpoint, the sample prompt, dtype, device, compile, and the
# number of processes, with a batch_size that keeps the global batch.
RESUME_MUST_MATCH = ("seed", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                     "data", "stride", "windows", "init_from", "format", "valid_fraction",
                     "group_by_length")


# ---------------------------------------------------------------------------------------
# The training loop

def train_model(model, train_loader, val_loader, optimizer=None, device=None, config=None, *,
                tokenizer=None, **options):
    """Train ``model`` on ``train_loader``'s dataset; return the history dict.

    ``config``: a TrainConfig; keyword ``options`` set its fields (``num_epochs=2``), over
    ``config`` when both are given. The loaders supply datasets and batch sizes; the batch
    order comes from ``epoch_batches`` (seeded per epoch), so that ``resume=True`` continues
    from ``checkpoint_path`` exactly where the saved run was. ``optimizer`` defaults to
    ``make_optimizer``; the learning rate of every group is set each step from ``lr_at``.
    ``tokenizer`` is for the sample after each epoch. Returns ``{"step", "tokens_seen",
    "epoch", "train_loss", "val_loss"}`` lists (one entry per evaluation), ``"step_loss"``
    (one per optimizer step) and ``final_*`` values.
    """
    c = replace(config or TrainConfig(), **options)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world_size = rank_and_world()
    if device.type == "cpu":
        tune_malloc()        # glibc keeps the activation buffers between steps (cpu_kernels)
    gpt = unwrap_model(model)
    optimizer = optimizer or make_optimizer(gpt, c.learning_rate, c.weight_decay)
    dataset, batch_size = train_loader.dataset, train_loader.batch_size
    shuffle = not isinstance(train_loader.sampler, torch.utils.data.SequentialSampler)
    lengths = getattr(train_loader.sampler, "lengths", None)    # records grouped by length
    plan = plan_steps(len(dataset), batch_size, c.grad_accum_steps, c.num_epochs, c.max_steps,
                      c.warmup_steps, world_size, train_loader.drop_last)
    if plan.batches_per_epoch == 0:
        raise ValueError(f"the training data gives no full batch of {batch_size} windows "
                         f"(it has {len(dataset)}); lower batch_size or add text")
    settings = _recorded(c, batch_size, stride=getattr(dataset, "stride", None),
                         windows=len(dataset))
    run = TrainState()
    if c.resume:    # the saved weights, optimizer, RNG and position (and its warmup)
        run = resume_run(c.checkpoint_path, gpt, optimizer, plan, c.num_epochs, batch_size,
                         c.seed, settings, RESUME_MUST_MATCH, lora_config(gpt))
    elif rank == 0:
        note_replaced(c.checkpoint_path)
    settings.update(warmup_steps=plan.warmup_steps, total_steps=plan.total_steps)
    # Every process evaluates the same windows: those of the first eval_iter global
    # batches, so the figures do not depend on how many processes share the work.
    eval_loaders = (_in_order(train_loader, batch_size * world_size),
                    _in_order(val_loader, val_loader.batch_size * world_size))
    task = c.eval_task and task_scorer(c.eval_task, tokenizer, c.eval_data, batch_size,
                                       context_length=gpt.cfg["context_length"])
    log = RunLog(c.progress, plan.total_steps, run, c.checkpoint_path,
                 c.checkpoint_path and metrics_path(c.checkpoint_path), c.tensorboard)

    def evaluate():
        _evaluate(model, eval_loaders, device, c.eval_iter, run, plan, log, task)

    def save():     # never a diverged model: the last good checkpoint stays good
        check_model_finite(gpt, partial(_current_loss, model, eval_loaders[0], device), device,
                           world_size, run, c.checkpoint_path, optimizer)
        save_run(c.checkpoint_path, gpt, optimizer, run, world_size, batch_size, settings,
                 partial(_saved_state, gpt, c.tokenizer_json))

    collate = train_loader.collate_fn     # windows stacked; instruction records padded
    fwd_model = torch.compile(model) if c.compile else model
    model.train()
    start_time = time.time()
    with run_lock(c.checkpoint_path), log:  # one writer per checkpoint; Ctrl-C says what is saved
        if c.eval_at_start and run.step == 0:
            evaluate()
        while run.step < plan.total_steps and run.epoch < c.num_epochs:
            batches = epoch_batches(len(dataset), batch_size, shuffle, train_loader.drop_last,
                                    c.seed, run.epoch, rank, world_size, lengths)
            while run.batch_in_epoch < len(batches) and run.step < plan.total_steps:
                # one optimizer step: the next grad_accum_steps micro-batches of windows
                step_batches = batches[run.batch_in_epoch:run.batch_in_epoch + c.grad_accum_steps]
                micro_batches = [collate([dataset[i] for i in b]) for b in step_batches]
                started = time.perf_counter()
                loss, n_tokens = accumulate_gradients(fwd_model, micro_batches, device, c.dtype)
                loss = mean_across_processes(loss, device, world_size)   # the log, the NaN check
                check_finite(loss, run, c.checkpoint_path)
                grad_norm = clip_gradients(model, c.grad_clip)        # the norm before clipping
                lr = lr_at(run.step, c.learning_rate, plan.total_steps, plan.warmup_steps,
                           c.min_lr_ratio)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                before = weights_copy(gpt) if (run.step + 1) % c.eval_freq == 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                run.batch_in_epoch += len(step_batches)
                run.tokens_seen += n_tokens
                run.history["step_loss"].append(loss)
                log.step(loss, lr, n_tokens, time.perf_counter() - started, grad_norm=grad_norm,
                         clipped=bool(c.grad_clip and grad_norm > c.grad_clip),
                         update_to_weight=before and update_ratios(gpt, before, _group, device))
                if run.step % c.eval_freq == 0:
                    evaluate()
                if c.checkpoint_every and run.step % c.checkpoint_every == 0:
                    save()
            if run.batch_in_epoch >= len(batches):
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
                _sample(model, gpt, tokenizer, device, c.start_context, c.sample_tokens, rank,
                        c.seed + run.epoch)
        if not run.history["step"] or run.history["step"][-1] != run.step:
            evaluate()
        save()
    return run.finish(time.time() - start_time)


# ---------------------------------------------------------------------------------------
# The loop's helpers: what a checkpoint records, evaluation, samples

def _recorded(c, batch_size, **data):
    """The settings a checkpoint records: the config's (less where the run is saved), the
    extra ``settings``, and what the data gives (stride, window count)."""
    skip = ("checkpoint_path", "resume", "progress", "settings", "tokenizer_json")
    return {**{k: v for k, v in asdict(c).items() if k not in skip}, **c.settings,
            "batch_size": batch_size, **data}


def _current_loss(model, loader, device):
    """The loss of the weights as they are now, on one batch of ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = calc_loss_loader(loader, model, device, num_batches=1)
    model.train(was_training)
    return loss


def _saved_state(gpt, tokenizer_json, model_state):
    """(the state a checkpoint holds, its extra entries): a LoRA model saves its merged weights
    (they load anywhere) plus the adapters alone (they resume the run); a run with its own
    vocabulary carries the tokenizer's file (generate.py and the others read it there)."""
    extra = {"tokenizer": {"json": tokenizer_json}} if tokenizer_json else {}
    adapted = lora_config(gpt)
    if adapted is None:
        return model_state, extra
    model_state, adapters = merged_state(model_state, adapted)
    return model_state, {**extra, "lora": {**adapted, "adapters": adapters}}


def _evaluate(model, eval_loaders, device, eval_iter, run, plan, log, task=None):
    """Evaluate (and score ``task``, evaluate.task_scorer), add the result to the history,
    the metrics log and one printed line."""
    train_loss, val_loss = evaluate_model(model, *eval_loaders, device, eval_iter)
    h = run.history
    h["step"].append(run.step)
    h["tokens_seen"].append(run.tokens_seen)
    h["epoch"].append(run.epoch + run.batch_in_epoch / plan.batches_per_epoch)
    h["train_loss"].append(train_loss)
    h["val_loss"].append(val_loss)
    scores, shown = {}, ""
    if task:
        scores = {task.task: task(unwrap_model(model))}
        h.setdefault("task_scores", []).append({"step": run.step, "tokens_seen": run.tokens_seen,
                                                "task": task.task, **scores[task.task]})
        shown = f", {task.task} {task.main} {scores[task.task][task.main]:.4f}"
    log.record("eval", train_loss=train_loss, val_loss=val_loss, **scores)
    shown_epoch = run.epoch + 1 if run.batch_in_epoch else run.epoch    # 1-based, just ended
    log.write(f"Ep {shown_epoch} (Step {run.step:06d}): "
              f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}{shown}")


def clip_gradients(model, max_norm):
    """Scale the gradients down to a total norm of ``max_norm`` when above it (0 or None: no
    clipping); return their total norm before: a rising norm warns of divergence early."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


def _group(name):
    """The part of GPT-2 a parameter belongs to, for the update-to-weight ratios (each step's
    update over the weights' norm: around 1e-3 is healthy for Adam; much higher and the
    learning rate is too high for that part, which shows there before the loss shows it)."""
    if "norm" in name:
        return "norms"
    if name.startswith(("tok_emb", "pos_emb", "out_head")):
        return "embeddings"
    return "attention" if ".att." in name else "mlp"


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
                     temperature=0.8, top_k=50, eos_id=tokenizer.eot_token, generator=generator)
    if rank == 0:
        sample()
    elif is_fsdp(model):
        # FSDP needs every rank in each forward pass (they gather the shards).
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            sample()


def save_history(history, path):
    """Write the loss history as JSON, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(history, indent=1).encode()))


