"""Loss, evaluation, plots and the one training loop (train.py and train.ipynb both call it).

One optimizer step, as train_model does it:

    for each of grad_accum_steps micro-batches:        (B, T) token ids -> (B, T, vocab) logits
        loss = cross_entropy(logits, targets)          next-token prediction at every position
        (loss * share_of_the_step's_tokens).backward()  gradients add up across micro-batches
    clip the gradient norm -> set the scheduled learning rate -> AdamW step -> zero grads

Around it: evaluation every ``eval_freq`` steps, a sample after each epoch, and resumable
checkpoints. Another loss runs in the same loop as an Objective: a classifier's
(classify.py), or DPO's on preference pairs (dpo_loss, below). A run's settings are one
TrainConfig; saving, resuming and the checks around them are engine/runs.py's, several
processes (torchrun) engine/devices.py's.
"""

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.cpu_kernels import tune_malloc
from engine.devices import (  # get_device, recompute_activations: as the README shows them
    autocast,
    get_device,  # noqa: F401
    grad_sync,
    is_fsdp,
    mean_across_processes,
    rank_and_world,
    recompute_activations,  # noqa: F401
)
from engine.fused_loss import IGNORE_INDEX
from engine.gpt2_params import param_group as part_of
from engine.runs import (  # StepPlan, plan_steps: train.py and train.ipynb import them here
    RunLog,
    StepPlan,  # noqa: F401
    TrainState,
    check_finite,
    check_model_finite,
    check_train_config,
    clip_gradients,
    epoch_batches,
    in_order,
    metrics_path,
    note_replaced,
    plan_steps,
    recorded_settings,
    resume_run,
    run_lock,
    save_history,  # noqa: F401  (train.py and the notebooks import it here)
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


def scored_tokens(targets):         # the targets the loss counts: all but IGNORE_INDEX's
    return int((targets != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class Objective:
    """What train_model minimises: ``loss(model, batch, device) -> (the batch's mean loss,
    {metric: its sum over the batch})``, the mean taken over the batch's ``count(batch)``
    units: next-token prediction's scored tokens (NEXT_TOKEN, the default), a classifier's
    records (classify.classification_loss), DPO's pairs (dpo_objective). Micro-batches weigh
    by their counts, and an evaluation shows each metric's sum over all units counted."""
    loss: Callable
    count: Callable = lambda batch: scored_tokens(batch[1])     # the targets not skipped


NEXT_TOKEN = Objective(lambda model, batch, device: (calc_loss_batch(*batch, model, device), {}))


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Mean loss per scored target token over the first ``num_batches`` batches (all when
    None).

    Every token counts the same: a short last batch (drop_last=False) weighs by its
    tokens, not as much as a full batch, which averaging the batch means would do; and a
    target the loss skips (IGNORE_INDEX: padding, an instruction's prompt) does not count.
    """
    return loss_and_metrics(data_loader, model, device, num_batches)[0]


def loss_and_metrics(data_loader, model, device, num_batches=None, objective=NEXT_TOKEN):
    """calc_loss_loader for any Objective: (the mean loss per unit counted, {metric: its mean
    per unit}); NaN and no metrics when nothing counts."""
    total, units, sums = 0.0, 0, {}
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for batch in itertools.islice(data_loader, n):
        count = objective.count(batch)
        if count:
            loss, metrics = objective.loss(model, batch, device)
            total, units = total + loss.item() * count, units + count     # summed, not mean
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
    return (total / units, {k: v / units for k, v in sums.items()}) if units else (math.nan, {})


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter, objective=NEXT_TOKEN):
    """(train loss, validation loss) over ``eval_iter`` batches each, in eval mode."""
    scores = evaluate_scores(model, (train_loader, val_loader), device, eval_iter, objective)
    return scores["train_loss"], scores["val_loss"]


@torch.no_grad()
def evaluate_scores(model, loaders, device, eval_iter, objective=NEXT_TOKEN):
    """{"train_loss", "val_loss"} and the objective's metrics ("val_accuracy", ...) over the
    first ``eval_iter`` batches of the (training, validation) ``loaders``, in eval mode."""
    was_training = model.training
    model.eval()
    scores = {}
    for side, loader in zip(("train", "val"), loaders):
        loss, metrics = loss_and_metrics(in_order(loader), model, device, eval_iter, objective)
        scores.update({f"{side}_loss": loss, **{f"{side}_{k}": v for k, v in metrics.items()}})
    model.train(was_training)
    return scores


# ---------------------------------------------------------------------------------------
# Preference tuning: DPO (Rafailov et al. 2023, "Direct Preference Optimization")

def sequence_logprobs(model, inputs, targets):
    """log p(answer | prompt) of each row (rows,): the sum of log p(target) over the scored
    positions (IGNORE_INDEX skips the prompt and the padding), from logits (rows, T, vocab)."""
    logits = model(inputs).float()                                          # (rows, T, vocab)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # 0: skipped
    return -nll.view(targets.shape).sum(dim=-1)                             # (rows,)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """DPO's loss on B pairs, from the answers' log-probabilities under the model being tuned
    (the policy) and under a frozen copy of its starting weights (the reference), (B,) each:

        reward(answer) = beta * (log policy(answer) - log reference(answer))
        loss = mean over the pairs of  -log sigmoid(reward(chosen) - reward(rejected))

    The loss falls as the policy raises the chosen answer's probability relative to the
    reference's more than the rejected one's: no reward model, no sampling. ``beta`` sets how
    far it may move from the reference. Returns (loss, chosen rewards, rejected rewards)."""
    chosen = beta * (policy_chosen - reference_chosen)                      # (B,)
    rejected = beta * (policy_rejected - reference_rejected)                # (B,)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def dpo_batch_loss(model, batch, device, reference, beta=0.1):
    """A DPO Objective's loss: a batch of pairs (inputs, targets) (2B, T), chosen rows then
    rejected rows (dataset.pad_pairs); the reference scores them without gradients. Metrics:
    the reward margin (chosen - rejected), the pairs it ranks right, each side's reward."""
    inputs, targets = (t.to(device) for t in batch)
    policy = sequence_logprobs(model, inputs, targets).chunk(2)            # 2 x (B,)
    with torch.no_grad():
        ref = sequence_logprobs(reference, inputs, targets).chunk(2)
    loss, chosen, rejected = dpo_loss(*policy, *ref, beta)
    margin = chosen - rejected                                              # (B,)
    return loss, {"reward_margin": float(margin.sum()), "reward_accuracy": float(
        (margin > 0).sum()), "chosen_reward": float(chosen.sum()),
        "rejected_reward": float(rejected.sum())}


def dpo_objective(reference, beta=0.1):
    """train_model's objective for DPO: dpo_batch_loss against ``reference`` (eval mode, never
    trained), each pair one unit."""
    return Objective(partial(dpo_batch_loss, reference=reference, beta=beta),
                     count=lambda batch: len(batch[0]) // 2)


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


# ---------------------------------------------------------------------------------------
# One optimizer step's gradients

def accumulate_gradients(model, micro_batches, device, dtype="fp32", objective=NEXT_TOKEN):
    """Forward and backward over several (inputs, targets) micro-batches; one step's worth.

    Each micro-batch's loss is weighted by its share of all scored target tokens of the
    step (every process's), so the summed gradient equals the gradient of one batch holding
    all of them, also when the last group of an epoch is short or batches of instruction
    records score different numbers of tokens. Returns (the step's mean loss, its number of
    scored tokens over all processes). Another ``objective`` counts its own units.
    """
    _, world_size = rank_and_world()
    n_tokens = [objective.count(batch) for batch in micro_batches]
    # several processes: their gradients are averaged, so each weighs its tokens by the
    # count of all of them (for text, every process has the same count)
    step_tokens = round(mean_across_processes(sum(n_tokens), device, world_size) * world_size)
    mean_loss = 0.0
    for k, batch in enumerate(micro_batches):
        share = n_tokens[k] * world_size / max(step_tokens, 1)
        # with several processes, gradients are averaged across them on the last one only
        with grad_sync(model, last=k == len(micro_batches) - 1):
            with autocast(device, dtype):
                loss, _ = objective.loss(model, batch, device)
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

    def __post_init__(self):        # one line naming what is out of range
        check_train_config(self)


# Settings a resumed run must keep: with them the batch order (seed) and the learning rate
# of every step (the rest) are those of the run it continues. The global batch
# (batch_size x grad_accum_steps x processes) is checked too. Free to change on resume:
# num_epochs and max_steps (to extend a run; the cosine then ends at the new last step),
# how often to evaluate and checkpoint, the sample prompt, dtype, device, compile, and the
# number of processes, with a batch_size that keeps the global batch.
RESUME_MUST_MATCH = ("seed", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                     "data", "stride", "windows", "init_from", "format", "valid_fraction",
                     "group_by_length", "task", "trainable", "beta")


# ---------------------------------------------------------------------------------------
# The training loop

def train_model(model, train_loader, val_loader, optimizer=None, device=None, config=None, *,
                tokenizer=None, objective=NEXT_TOKEN, **options):
    """Train ``model`` on ``train_loader``'s dataset; return the history dict.

    ``config``: a TrainConfig; keyword ``options`` (``num_epochs=2``) override its fields. The
    loaders give datasets and batch sizes; the batch order comes from ``epoch_batches``
    (seeded per epoch), so ``resume=True`` continues ``checkpoint_path`` exactly. ``optimizer``
    defaults to ``make_optimizer``, each step's learning rate comes from ``lr_at``; ``tokenizer``
    is for the sample after each epoch; ``objective``, what the loss is. Returns lists with one
    entry per evaluation ("step", "tokens_seen": the objective's units, "epoch", "train_loss",
    "val_loss", its metrics), "step_loss" per step, and ``final_*`` values.
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
    settings = recorded_settings(c, batch_size, stride=getattr(dataset, "stride", None),
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
    eval_loaders = (in_order(train_loader, batch_size * world_size),
                    in_order(val_loader, val_loader.batch_size * world_size))
    task = c.eval_task and task_scorer(c.eval_task, tokenizer, c.eval_data, batch_size,
                                       context_length=gpt.cfg["context_length"])
    log = RunLog(c.progress, plan.total_steps, run, c.checkpoint_path,
                 c.checkpoint_path and metrics_path(c.checkpoint_path), c.tensorboard)

    def evaluate():
        _evaluate(model, eval_loaders, device, c.eval_iter, run, plan, log, task, objective)

    def save():     # never a diverged model: the last good checkpoint stays good
        check_model_finite(gpt, partial(_current_loss, model, eval_loaders[0], device, objective),
                           device, world_size, run, c.checkpoint_path, optimizer)
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
                loss, n_tokens = accumulate_gradients(fwd_model, micro_batches, device, c.dtype,
                                                      objective)
                loss = mean_across_processes(loss, device, world_size)   # the log, the NaN check
                check_finite(loss, run, c.checkpoint_path)
                grad_norm = clip_gradients(model, c.grad_clip)        # the norm before clipping
                lr = lr_at(run.step, c.learning_rate, plan.total_steps, plan.warmup_steps,
                           c.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                before = weights_copy(gpt) if (run.step + 1) % c.eval_freq == 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                run.batch_in_epoch += len(step_batches)
                run.tokens_seen += n_tokens
                run.history["step_loss"].append(loss)
                log.step(loss, lr, n_tokens, time.perf_counter() - started, grad_norm=grad_norm,
                         clipped=bool(c.grad_clip and grad_norm > c.grad_clip),
                         update_to_weight=before and update_ratios(gpt, before, part_of, device))
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

def _current_loss(model, loader, device, objective):
    """The loss of the weights as they are now, on one batch of ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = loss_and_metrics(loader, model, device, 1, objective)[0]
    model.train(was_training)
    return loss


def _saved_state(gpt, tokenizer_json, model_state):
    """(the state a checkpoint holds, its extra entries): a LoRA model saves its merged weights
    (they load anywhere) plus the adapters and the other weights that train (they resume the
    run); a run with its own vocabulary carries the tokenizer's file (generate.py and the
    others read it there)."""
    extra = {"tokenizer": {"json": tokenizer_json}} if tokenizer_json else {}
    adapted = lora_config(gpt)
    if adapted is None:
        return model_state, extra
    model_state, adapters = merged_state(model_state, adapted)
    # what trains beside the adapters (a classifier's head) resumes with them
    adapters.update({n: model_state[n] for n, p in gpt.named_parameters()
                     if p.requires_grad and n in model_state})
    return model_state, {**extra, "lora": {**adapted, "adapters": adapters}}


def _evaluate(model, eval_loaders, device, eval_iter, run, plan, log, task=None,
              objective=NEXT_TOKEN):
    """Evaluate (the loss and the objective's metrics; and score ``task``,
    evaluate.task_scorer), add the result to the history, the metrics log and one line."""
    scores = evaluate_scores(model, eval_loaders, device, eval_iter, objective)
    h = run.history
    h["step"].append(run.step)
    h["tokens_seen"].append(run.tokens_seen)
    h["epoch"].append(run.epoch + run.batch_in_epoch / plan.batches_per_epoch)
    for key, value in scores.items():
        h.setdefault(key, []).append(value)
    metrics = "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in scores.items()
                      if k.startswith("val_") and k != "val_loss")   # "val accuracy 0.875"
    task_scores, shown = {}, ""
    if task:
        task_scores = {task.task: task(unwrap_model(model))}
        h.setdefault("task_scores", []).append({"step": run.step, "tokens_seen": run.tokens_seen,
                                                "task": task.task, **task_scores[task.task]})
        shown = f", {task.task} {task.main} {task_scores[task.task][task.main]:.4f}"
    log.record("eval", **scores, **task_scores)
    shown_epoch = run.epoch + 1 if run.batch_in_epoch else run.epoch    # 1-based, just ended
    log.write(f"Ep {shown_epoch} (Step {run.step:06d}): Train loss {scores['train_loss']:.3f}, "
              f"Val loss {scores['val_loss']:.3f}{metrics}{shown}")


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
