"""Train GPT-2 on your own text from the command line.

    python train.py                                   # data/input.txt, or the built-in corpus
    python train.py --data my.txt --num-epochs 5 --emb-dim 768 --n-layers 12 --n-heads 12
    python train.py --resume                          # continue the run saved at --out
    python train.py --task classify --data data/sms_demo.tsv      # a classifier (classify.py)
    python train.py --task dpo --data data/preferences.jsonl --init-from model_weights/instruct.pth

Every key of GPT_CONFIG_124M and of SETTINGS is a flag (dashes for underscores). The
work happens in train_utils.train_model; this file only turns flags into arguments.
"""

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch

from classify import (
    classification_loss,
    create_classification_dataloader,
    label_names,
    make_classifier,
    read_labelled,
    set_trainable,
    split_labelled,
)
from dataset import (
    GPTDataset,
    as_conversation,
    create_dataloader,
    create_instruction_dataloader,
    fetch_records,
    get_tokenizer,
    is_records,
    load_tokens,
    preference_conversations,
    prepare_splits,
    read_preferences,
    read_records,
    read_text,
    render_conversation,
    split_paths,
    split_records,
)
from engine.checkpoints import saved_tokenizer
from engine.devices import (
    barrier,
    cleanup_distributed,
    setup_distributed,
    training_precision,
    wrap_model,
)
from engine.download import DownloadError
from engine.eval_data import task_file
from engine.fileio import check_output
from engine.records import copies_across, is_url
from engine.runs import previous_path, run_lock, same_source, saved_run, source_id
from evaluate import parse_task
from lora import DEFAULT_TARGETS, TARGETS, add_lora
from model import GPT_CONFIG_124M, GPTModel, unwrap_model, validate_config
from model_sources import SOURCES_HELP, crop_context, load_model, set_dropout
from tokenizer import BPETokenizer
from train_utils import (
    NEXT_TOKEN,
    Objective,
    TrainConfig,
    calc_loss_loader,
    dpo_objective,
    plan_steps,
    plot_losses,
    print_model_params,
    recompute_activations,
    save_history,
    train_model,
)

# The training settings of the original example code, kept under this name for code that
# imports them; DEFAULT_SETTINGS below are what `python train.py` uses.
SETTINGS = {
    "learning_rate": 5e-4,
    "num_epochs": 10,
    "batch_size": 2,
    "weight_decay": 0.1,
    "eval_freq": 5,
    "eval_iter": 5,
    "start_context": "Every effort moves you",
}

# What `python train.py` uses when no flag says otherwise: a model small enough to learn
# the built-in corpus (~0.5 MB of Python documentation) in a few minutes on two CPU
# cores. GPT_CONFIG_124M is the same architecture, 768 wide and 12 deep.
DEFAULT_CONFIG = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 256, "n_heads": 4,
                  "n_layers": 4, "tie_embeddings": False}
DEFAULT_SETTINGS = {**SETTINGS, "learning_rate": 1e-3, "num_epochs": 3, "batch_size": 16,
                    "eval_freq": 25, "eval_iter": 5, "start_context": "The for statement"}
DEFAULT_DATA = "data/input.txt"

# --help text for the flags made from DEFAULT_CONFIG and DEFAULT_SETTINGS
FLAG_HELP = {
    "vocab_size": "token ids (GPT-2's BPE has 50257)",
    "context_length": "tokens a window holds (the longest text the model sees at once)",
    "emb_dim": "width of every token vector",
    "n_heads": "attention heads per block (emb_dim must divide by it)",
    "n_layers": "transformer blocks",
    "drop_rate": "dropout probability while training",
    "qkv_bias": "bias in the query/key/value projection (OpenAI's GPT-2 has one)",
    "tie_embeddings": "the output head reuses the token embedding (GPT-2 does)",
    "learning_rate": "peak learning rate (linear warmup, then cosine decay)",
    "num_epochs": "passes over the training windows",
    "batch_size": "windows per micro-batch (per process)",
    "weight_decay": "AdamW weight decay (not applied to biases, norms, embeddings)",
    "eval_freq": "evaluate every N optimizer steps",
    "eval_iter": "batches per evaluation (train and validation)",
    "start_context": "prompt of the sample printed after each epoch",
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Train GPT-2 on a text file (default: data/input.txt, created from "
                    "Python's bundled documentation when missing).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (the keys of GPT_CONFIG_124M)")
    for key, value in DEFAULT_CONFIG.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                           help=FLAG_HELP.get(key, key))
        else:
            g.add_argument(flag, type=type(value), default=value, help=FLAG_HELP.get(key, key))
    g.add_argument("--preset", choices=["small", "124M"], default="small",
                   help="'small' = the quick default above; '124M' = GPT_CONFIG_124M "
                        "(flags you give still win)")
    g = p.add_argument_group("training (the keys of SETTINGS)")
    for key, value in DEFAULT_SETTINGS.items():
        g.add_argument("--" + key.replace("_", "-"), type=type(value), default=value,
                       help=FLAG_HELP.get(key, key))
    g = p.add_argument_group("run")
    g.add_argument("--data", default=DEFAULT_DATA,
                   help="a text file (train.txt/valid.txt/test.txt are made beside it), or "
                        "instruction records: a .json / .jsonl file or its http(s) URL")
    g.add_argument("--out", default=None,
                   help="checkpoint path; the loss history (.json) and plot (.png) go beside "
                        "it (default: model_weights/trained_gpt2.pth, or model_weights/"
                        "instruct.pth for instruction records)")
    g.add_argument("--stride", type=int, default=None,
                   help="tokens between training windows; None = context_length (no overlap)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps at most (the run also ends after "
                        "--num-epochs; the first lines say how many steps it runs)")
    g.add_argument("--grad-accum-steps", type=int, default=1,
                   help="micro-batches per optimizer step (effective batch = batch_size x N)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps; None = 5%% of all steps (on --resume: the "
                        "saved run's)")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm to this; 0 = no clipping")
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="save a resumable checkpoint every N optimizer steps; 0 = only at "
                        "the end")
    g.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    g.add_argument("--resplit", action="store_true",
                   help="split --data again into train/valid/test.txt, replacing split files "
                        "beside it that this program did not write")
    g.add_argument("--device", default=None, help="cuda, mps or cpu; None = the best available")
    g.add_argument("--seed", type=int, default=123)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="auto",
                   help="bf16 autocast; 'auto' uses it where bf16 is native: CPUs with AMX or "
                        "AVX512-BF16, CUDA GPUs that support it (losses then differ from "
                        "fp32's in the third digit)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--eval-task", metavar="TASK[:N]", default=None,
                   help="also score a benchmark at every evaluation: hellaswag, lambada or "
                        "wikitext, on its first N examples (hellaswag:200); printed on the "
                        "eval line, kept in the history, drawn in the loss plot")
    g.add_argument("--eval-data", metavar="FILE", default=None,
                   help="the --eval-task's file (default: data/eval/, downloaded once)")
    g.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write the metrics (every step's and every evaluation's, as in "
                        "<out>_metrics.jsonl) as TensorBoard scalars into DIR")
    g.add_argument("--tokenizer", default="gpt2", metavar="gpt2|FILE|train:N",
                   help="gpt2: GPT-2's BPE; FILE: a vocabulary of tokenizer.py; train:N: train "
                        "an N-token one on the training split, saved beside --out; the "
                        "checkpoint carries it and --vocab-size follows it")
    g = p.add_argument_group("instruction tuning (--data FILE.json / FILE.jsonl)")
    g.add_argument("--format", choices=["alpaca", "messages"], default=None,
                   help="the records' format; None = detected from each record")
    g.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of the records held out for validation (chosen by --seed; "
                        "with --task classify, that share of each class)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch records of similar length together: less padding")
    g = p.add_argument_group("classification and preference tuning")
    g.add_argument("--task", choices=["lm", "classify", "dpo"], default="lm",
                   help="lm: next-token prediction on a text or instruction records; classify: "
                        "a classifier (classify.py) on labelled texts, --data a .csv / .tsv with "
                        "text and label columns or a .jsonl of {text, label}; dpo: preference "
                        "tuning on {prompt, chosen, rejected} records (.json / .jsonl) of the "
                        "model given as --init-from (dropout off unless --drop-rate is given)")
    g.add_argument("--trainable", default="last:1", metavar="head|last:N|all",
                   help="classify: what trains: the new head alone, the last N blocks with the "
                        "final LayerNorm and the head (the book's last:1), or every weight; "
                        "with --lora-rank: the adapters and the head")
    g.add_argument("--beta", type=float, default=0.1,
                   help="dpo: the reward scale of DPO's loss (how far the model may move from "
                        "its starting weights: smaller, further)")
    g = p.add_argument_group("fine-tuning (start from pretrained weights)")
    g.add_argument("--init-from", metavar="SOURCE", default=None,
                   help=f"start from these weights instead of a random init: {SOURCES_HELP}; "
                        f"the model's shape comes from it (--context-length may crop it)")
    g.add_argument("--init-from-tf", action="store_true",
                   help="with a size name: OpenAI's TensorFlow checkpoint (download_weights.py) "
                        "instead of the Hugging Face Hub's copy")
    g.add_argument("--config", metavar="NAME_OR_JSON", default=None,
                   help="only with --init-from of a .pth holding a bare state dict (weights "
                        "without their config): one of OpenAI's sizes (124M, ...) or a JSON "
                        "file with the model's config")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="0 = fine-tune every weight; R > 0 = train only LoRA adapters of rank R, "
                        "the pretrained weights frozen")
    g.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA scale: the adapters add (alpha / rank) * x A B")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma list of the layers LoRA adapts in every block, of {list(TARGETS)}")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute its activations in "
                        "backward: less memory, about a third more compute")
    g = p.add_argument_group("several processes (launch with torchrun)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                   help="ddp: a model copy per process; fsdp: weights, gradients and optimizer "
                        "state sharded across processes; None = ddp under torchrun")
    g.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                   help="process-group backend; None = nccl on CUDA, gloo on CPU")
    return p


# Flags that count things: the smallest value each may take. None (not given) is
# always allowed for those whose default is None.
MINIMUMS = {"num_epochs": 1, "max_steps": 1, "stride": 1, "grad_accum_steps": 1,
            "batch_size": 1, "eval_freq": 1, "eval_iter": 1, "warmup_steps": 0,
            "checkpoint_every": 0, "grad_clip": 0, "weight_decay": 0, "lora_rank": 0}


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset == "124M":
        # The preset becomes the defaults and the command line is read again, so every
        # model flag given, in any spelling argparse accepts (--context 64, --no-qkv-bias,
        # --emb-dim=768), still wins over it.
        parser.set_defaults(**GPT_CONFIG_124M)
        args = parser.parse_args(argv)
    args.given = _given_flags(argv)
    args.instruct = args.task == "lm" and is_records(args.data)
    if args.out is None:
        name = {"classify": "classifier", "dpo": "dpo"}.get(args.task, "trained_gpt2")
        args.out = f"model_weights/{'instruct' if args.instruct else name}.pth"
    records = args.instruct or args.task != "lm"
    if (not records and args.given & {"format", "valid_fraction", "group_by_length"}
            or args.task == "classify" and args.given & {"format", "group_by_length"}):
        parser.error("--format, --valid-fraction and --group-by-length go with instruction "
                     "records: --data FILE.json or FILE.jsonl (--valid-fraction also with "
                     "--task classify, and --group-by-length with --task dpo)")
    if args.task == "dpo" and "learning_rate" not in args.given:
        args.learning_rate = 5e-5   # DPO moves a tuned model: a step of 1e-3 would wreck it
    if records and not 0 < args.valid_fraction < 1:
        parser.error(f"--valid-fraction must be between 0 and 1, got {args.valid_fraction}")
    _check_task_flags(parser, args)
    if args.init_from is None and (args.lora_rank or args.init_from_tf or args.config):
        parser.error("--lora-rank, --init-from-tf and --config go with --init-from SOURCE: "
                     "LoRA adapts pretrained weights (from a random init, train every weight)")
    if args.eval_data is not None and args.eval_task is None:
        parser.error(f"--eval-data {args.eval_data} is the file of an --eval-task; add "
                     f"--eval-task TASK[:N] to score it at every evaluation, or leave it out")
    if args.init_from is not None and "preset" in args.given:
        parser.error("--preset and --init-from both choose the model; give one of them")
    if not args.lora_rank and args.given & {"lora_targets", "lora_alpha"}:
        parser.error("--lora-targets and --lora-alpha go with --lora-rank R: without a rank "
                     "there are no adapters, and every weight trains")
    targets = args.lora_targets.split(",")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        parser.error(f"--lora-targets: unknown {bad}; choose from {list(TARGETS)}")
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        parser.error(f"--lora-targets names {', '.join(twice)} more than once; name each "
                     f"layer once (e.g. {','.join(dict.fromkeys(targets))})")
    for key in ("learning_rate", "weight_decay", "grad_clip", "drop_rate", "lora_alpha"):
        value = getattr(args, key)
        if not math.isfinite(value):
            parser.error(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    for key in ("learning_rate", "lora_alpha"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    for key, low in MINIMUMS.items():
        value = getattr(args, key)
        if value is not None and value < low:
            flag = "--" + key.replace("_", "-")
            why = {"grad_clip": " (0 = no clipping; a negative norm would flip the gradients)",
                   "checkpoint_every": " (0 = save only at the end)"}.get(key, "")
            parser.error(f"{flag} must be >= {low}, got {value}{why}")
    return args


def _check_task_flags(parser, args):
    """--task classify / dpo: their data and their own flags."""
    if args.task != "lm" and "data" not in args.given:
        parser.error(f"--task {args.task} needs --data FILE: "
                     + ("labelled texts, e.g. data/sms_demo.tsv" if args.task == "classify"
                        else "preference pairs, e.g. data/preferences.jsonl"))
    if args.task == "dpo" and args.init_from is None:
        parser.error("--task dpo tunes the model given as --init-from SOURCE (an "
                     "instruction-tuned one); its starting weights are DPO's frozen reference")
    for flag, task in (("trainable", "classify"), ("beta", "dpo")):
        if flag in args.given and args.task != task:
            parser.error(f"--{flag} goes with --task {task}")
    kind, _, n = args.trainable.partition(":")
    if args.trainable not in ("head", "all") and not (kind == "last" and n.isdigit() and int(n)):
        parser.error(f"--trainable must be head, last:N (N >= 1) or all, got {args.trainable}")
    if "trainable" in args.given and args.lora_rank:
        parser.error("--trainable and --lora-rank both choose what trains; with LoRA the "
                     "adapters and the head train")
    if not (math.isfinite(args.beta) and args.beta > 0):
        parser.error(f"--beta must be a finite number > 0, got {args.beta}")


def _given_flags(argv):
    """The flags given on the command line (as argparse dests), not left at their defaults."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def main(argv=None):
    """Run the whole job; return the history dict (also written as JSON beside --out).

    Under torchrun (RANK and WORLD_SIZE set) every process runs this; rank 0 alone prints
    and writes files.
    """
    args = parse_args(argv)
    cfg = validate_config({k: getattr(args, k) for k in DEFAULT_CONFIG})
    if args.eval_task is not None:
        parse_task(args.eval_task)      # a ValueError naming --eval-task, before any work
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.parallel and not launched:
        raise ValueError(f"--parallel {args.parallel} needs one process per device, started "
                         f"by torchrun: torchrun --standalone --nproc_per_node=2 train.py "
                         f"--parallel {args.parallel} ...")
    parallel = args.parallel or "ddp"
    if launched and parallel == "fsdp" and args.compile:
        raise ValueError("--compile is not supported with --parallel fsdp here (FSDP2 wants "
                         "each block compiled before it is sharded); use --parallel ddp "
                         "with --compile, or drop --compile")
    device, rank, world_size = setup_distributed(args.device, args.backend)
    try:
        with open(os.devnull, "w") as null, \
                contextlib.redirect_stdout(null) if rank else contextlib.nullcontext():
            return _run(args, cfg, device, rank, world_size, parallel if launched else None)
    finally:
        cleanup_distributed()


def _run(args, cfg, device, rank, world_size, parallel):
    _check_outputs(args, rank)          # before any long work, not after it
    with run_lock(args.out):            # one run per --out at a time (rank 0 holds it)
        return _train(args, cfg, device, rank, world_size, parallel)


def _train(args, cfg, device, rank, world_size, parallel):
    # what a resumed run must keep besides the flags: the data (it decides the batch
    # order) and the weights it started from (as a resolved path: ./hf and hf are one)
    resumed = _resumed_source(args) if args.resume else None
    own, vocab_to_train = _tokenizer_choice(args)      # checked before anything is written
    if args.eval_task and args.eval_data is None:      # its file now, not after training
        if rank == 0:
            task_file(parse_task(args.eval_task)[0], file_flag="--eval-data", mirror_flag=None)
        barrier()
    settings = {"data": args.data if is_url(args.data) else str(Path(args.data).resolve()),
                "init_from": resumed[0] if resumed else source_id(args.init_from),
                "task": args.task}
    if args.task != "lm":   # labelled texts or preference pairs: read and split up front
        data, test_path = _read_task_records(args), None
        settings.update(valid_fraction=args.valid_fraction, group_by_length=args.group_by_length,
                        **({"trainable": args.trainable} if args.task == "classify" else
                           {"beta": args.beta}))
        texts = ["\n\n".join(v for r in part for k, v in r.items() if k != "label")
                 for part in data]          # what a tokenizer would train on: the words
    elif args.instruct:     # whole records: read and split them before any long work
        data, test_path = _read_instructions(args, rank, world_size), None
        settings.update(format=args.format, valid_fraction=args.valid_fraction,
                        group_by_length=args.group_by_length)
        texts = ["\n\n".join(m["content"] for r in part for m in as_conversation(r))
                 for part in data]          # what a tokenizer would train on: the words
    else:
        train_path, valid_path, test_path = _prepare_splits(args, rank, world_size)
        texts = [read_text(train_path), read_text(valid_path)]
    tokenizer, own = _run_tokenizer(args, texts, rank, own, vocab_to_train)
    settings["tokenizer"] = own.fingerprint() if own else "gpt2"
    if own:                 # the model's vocabulary is the tokenizer's
        cfg = validate_config({**cfg, "vocab_size": own.n_vocab})
    if args.task == "lm" and not args.instruct:
        data = tuple((load_tokens(path, tokenizer, progress=not args.no_progress), path)
                     for path in (train_path, valid_path))
    model = _build_model(args, cfg, device, resumed)
    if args.task == "classify":
        model = _as_classifier(args, model, data)
    if args.task == "dpo" and "drop_rate" not in args.given:
        set_dropout(model, 0.0)     # DPO compares the policy's log-probabilities with the
        # reference's (eval mode): dropout would only add noise to every reward (TRL does so too)
    cfg = model.cfg
    if cfg["vocab_size"] < tokenizer.n_vocab:
        raise ValueError(f"--vocab-size {cfg['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer.n_vocab} token ids, so some ids would have no embedding; "
                         f"use --vocab-size {tokenizer.n_vocab} (GPT-2's) or more")
    loaders = {"classify": partial(_classify_loaders, labels=cfg.get("labels")),
               "dpo": partial(_instruction_loaders, preferences=True)}.get(
        args.task, _instruction_loaders if args.instruct else _text_loaders)
    train_loader, val_loader, start_context, tokens_per_step = loaders(
        args, data, cfg["context_length"], tokenizer, world_size)
    reference = _reference_model(args, resumed, device) if args.task == "dpo" else None
    plan = plan_steps(len(train_loader.dataset), args.batch_size, args.grad_accum_steps,
                      args.num_epochs, args.max_steps, world_size=world_size,
                      drop_last=train_loader.drop_last)
    steps = plan.total_steps
    if args.max_steps is not None and args.max_steps > steps:
        print(f"note: --max-steps {args.max_steps} is more than the {steps} steps of "
              f"--num-epochs {args.num_epochs} ({plan.steps_per_epoch} steps each): the run ends "
              f"after its last epoch; for {args.max_steps} steps, add --num-epochs "
              f"{math.ceil(args.max_steps / plan.steps_per_epoch)}")
    global_batch = args.batch_size * args.grad_accum_steps * world_size
    print(f"Global batch: {args.batch_size} (batch_size) x {args.grad_accum_steps} "
          f"(grad_accum_steps) x {world_size} (processes) = {global_batch} sequences, "
          f"{tokens_per_step}; {steps} steps on "
          f"{device}{f' with {parallel.upper()}' if parallel else ''}.")
    precision, why = training_precision(device, args.dtype)
    print(f"dtype: {'bf16 autocast' if precision == 'bf16' else 'fp32'} ({why}; "
          f"{'--dtype fp32 for fp32' if precision == 'bf16' else '--dtype bf16 to try bf16'})")
    print_model_params(model)
    if args.activation_checkpointing:
        recompute_activations(model)
    # Same init on every rank (seeded); from here each rank gets its own dropout masks.
    torch.manual_seed(args.seed * 1_000 + rank)
    if parallel:
        model = wrap_model(model, parallel, device)
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(**{**flags, "start_context": start_context}, checkpoint_path=args.out,
                         progress=not args.no_progress, settings=settings,
                         eval_at_start=args.init_from is not None or args.task != "lm",
                         tokenizer_json=own and own.dumps())
    history = train_model(model, train_loader, val_loader, device=device, config=config,
                          tokenizer=tokenizer, objective=_objective(args, tokenizer, reference))
    _report(args, history, model, test_path, device, rank, tokenizer)
    return history


def _tokenizer_choice(args):
    """--tokenizer, checked against --init-from and --resume before anything is written:
    (the run's own BPETokenizer, or None for GPT-2's; the vocabulary size to train, or None).

    Pretrained weights bring their tokenizer (GPT-2's, or the one their checkpoint or export
    carries: their embeddings are rows of its tokens), and a resumed run keeps its own; a
    --tokenizer that is another one is refused, naming both."""
    choice, given = args.tokenizer, "tokenizer" in args.given
    own, size = None, None
    if choice.startswith("train:"):
        size = choice.partition(":")[2]
        if not size.isdigit() or not 256 < int(size) <= 65536:
            raise ValueError(f"--tokenizer {choice}: give a vocabulary size in 257..65536 "
                             f"(token ids are stored as uint16), e.g. train:4096")
        size = int(size)
    elif choice != "gpt2":
        own = _tokenizer_file(choice)
    if args.init_from is not None:
        theirs = _carried_tokenizer(args.init_from)
        if given and (size or _fingerprint(own) != _fingerprint(theirs)):
            raise ValueError(f"--tokenizer {choice} with --init-from {args.init_from}: the "
                             f"weights come with {_which(theirs)} (their embeddings are rows "
                             f"of its tokens); leave --tokenizer out, and it comes along")
        own, size = theirs, None
    if args.resume:
        saved = _carried_tokenizer(args.out)
        if (size and saved and saved.n_vocab == size) or not (given or args.init_from):
            own, size = saved, None
        if size or _fingerprint(own) != _fingerprint(saved):
            now = (f"--tokenizer {choice}" if given else
                   f"the tokenizer of --init-from {args.init_from}")
            raise ValueError(f"--resume: the run at {args.out} was trained with "
                             f"{_which(saved)}, not with {now}; resume with the same "
                             f"tokenizer (leave --tokenizer out), or train into a new --out")
    if own and own.n_vocab > 65536:
        raise ValueError(f"{choice} has {own.n_vocab} tokens; token ids are stored as uint16 "
                         f"(at most 65536): train a smaller vocabulary")
    return own, size


def _tokenizer_file(path):
    """--tokenizer FILE, read and checked (tokenizer.BPETokenizer.load), or one line why not."""
    try:
        return BPETokenizer.load(path)
    except OSError as e:
        raise ValueError(f"--tokenizer {path}: {e.strerror or e}; give gpt2, train:N or a file "
                         f"written by `python tokenizer.py train`") from None
    except ValueError as e:
        raise ValueError(f"--tokenizer {e}") from None


def _carried_tokenizer(source):
    """The tokenizer a checkpoint or export carries (checked whole), or None: GPT-2's."""
    text = saved_tokenizer(source)
    return text and BPETokenizer.loads(text, f"the tokenizer of {source}")


def _fingerprint(own):
    return own.fingerprint() if own else "gpt2"


def _which(own):
    return (f"its own tokenizer ({own.name}, {own.n_vocab} tokens)" if own else
            "GPT-2's tokenizer")


def _run_tokenizer(args, texts, rank, own, size):
    """(the tiktoken Encoding the run encodes with, its BPETokenizer or None for GPT-2's).

    ``size`` (--tokenizer train:N): train one on ``texts[0]`` (the training split: nothing of
    the validation text leaks into the vocabulary) and save it beside --out."""
    if size:
        path = Path(args.out).with_name(Path(args.out).stem + "_tokenizer.json")
        if rank == 0:
            started = time.perf_counter()
            own = BPETokenizer.train(texts[0], size, name=f"{Path(args.data).stem}-{size}")
            own.save(path)
            seconds = time.perf_counter() - started
            ours, gpt2 = (_bytes_per_token(enc, texts[-1]) for enc in (own.to_tiktoken(),
                                                                     get_tokenizer()))
            print(f"Tokenizer: {own.n_vocab} tokens trained on the training split in "
                  f"{seconds:.1f} s, saved to {path}; bytes per token on the validation "
                  f"text: {ours:.2f} (GPT-2's: {gpt2:.2f})")
        barrier()
        own = BPETokenizer.load(path)
    return (own.to_tiktoken() if own else get_tokenizer()), own


def _bytes_per_token(encoding, text):
    return len(text.encode()) / max(1, len(encoding.encode_ordinary(text)))


def _text_loaders(args, data, ctx, tokenizer, world_size):
    """Windows of --context-length tokens every --stride from the text's split files."""
    (train_tokens, train_path), (val_tokens, valid_path) = data
    stride = args.stride if args.stride is not None else ctx
    n_windows = len(GPTDataset(train_tokens, None, ctx, stride, name=train_path))
    if n_windows < world_size * args.batch_size:
        who = (f"{world_size} processes x --batch-size {args.batch_size} need"
               if world_size > 1 else f"--batch-size {args.batch_size} needs")
        raise ValueError(f"{who} at least {world_size * args.batch_size} training windows, but "
                         f"{train_path} gives {n_windows} (--context-length {ctx}, --stride "
                         f"{stride}); lower --batch-size or --stride, use fewer processes, "
                         f"or add text")
    train_loader = create_dataloader(train_tokens, args.batch_size, ctx, stride, shuffle=True,
                                     drop_last=True, name=train_path)
    val_loader = create_dataloader(val_tokens, args.batch_size, ctx, ctx, shuffle=False,
                                   drop_last=False, name=valid_path)
    print(f"Data: {len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens, "
          f"{n_windows} windows of {ctx}.")
    tokens = args.batch_size * args.grad_accum_steps * world_size * ctx
    return train_loader, val_loader, args.start_context, f"{tokens:,} tokens per optimizer step"


def _read_instructions(args, rank, world_size):
    """(training records, validation records) of --data: a file, or a URL fetched once
    into data/ (by rank 0; the others wait and read it)."""
    path = args.data
    if is_url(path):
        if rank == 0:
            path = fetch_records(path, "data")
        barrier()
        path = fetch_records(args.data, "data")         # downloaded: found at once
    records = read_records(path, args.format)
    return split_records(records, args.valid_fraction, args.seed)


def _instruction_loaders(args, data, ctx, tokenizer, world_size, preferences=False):
    """One record a row, padded to the longest of its batch; the loss on the answers only.
    ``preferences`` (--task dpo): a pair of rows a record, its chosen and rejected answers."""
    train_records, valid_records = data
    _check_enough_records(args, train_records, valid_records, world_size)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = create_instruction_dataloader(
        train_records, args.batch_size, ctx, tokenizer=tokenizer, generator=g,
        group_by_length=args.group_by_length, name=args.data, preferences=preferences)
    val_loader = create_instruction_dataloader(valid_records, args.batch_size, ctx,
                                               shuffle=False, tokenizer=tokenizer,
                                               name=args.data, preferences=preferences)
    cut = train_loader.dataset.truncated + val_loader.dataset.truncated
    scored = ("DPO scores each answer's tokens, given its prompt" if preferences else
              "the loss counts the answers only")
    print(f"Data: {args.data}: {len(train_records)} training records, {len(valid_records)} held "
          f"out for validation, {cut} {'answers ' if preferences else ''}shortened to fit the "
          f"{ctx}-token context; {scored}.")
    if copies := copies_across(train_records, valid_records):
        print(f"note: {copies} of the {len(valid_records)} validation records are copies of a "
              f"training record ({args.data} repeats it), so the validation loss partly "
              f"measures memory; remove the repeats for a fair one")
    # the sample after each epoch: the model answering the first held-out instruction
    first = valid_records[0]
    messages = (preference_conversations(first)[0] if preferences else as_conversation(first))
    prompt = tokenizer.decode(render_conversation(messages[:-1], tokenizer, reply_open=True)[0])
    return train_loader, val_loader, prompt, "one record a row, padded to the longest"


def _check_enough_records(args, train_records, valid_records, world_size):
    if len(train_records) < world_size * args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} x {world_size} process(es) needs at "
                         f"least {world_size * args.batch_size} training records, but {args.data} "
                         f"leaves {len(train_records)} after holding out {len(valid_records)} "
                         f"for validation; lower --batch-size or add records")


def _read_task_records(args):
    """(training, validation) records of --data: labelled texts split class by class
    (--task classify), or preference pairs split by record (--task dpo)."""
    if args.task == "classify":
        records = read_labelled(args.data)
        label_names(records, args.data)         # two classes at least, said before any work
        return split_labelled(records, args.valid_fraction, args.seed, args.data)
    return split_records(read_preferences(args.data), args.valid_fraction, args.seed)


def _as_classifier(args, model, data):
    """--task classify: the model with a new head for the data's classes (classify.py),
    unless it is a classifier already (--init-from one, or a resumed run), and what trains."""
    labels = label_names(data[0] + data[1], args.data)
    have = model.cfg.get("labels")
    if have is None:
        make_classifier(model, labels)
    elif set(labels) - set(have):
        raise ValueError(f"--data {args.data} has classes {sorted(set(labels) - set(have))} "
                         f"that the classifier {args.init_from or args.out} does not know (its "
                         f"classes: {have}); start from a language model to make a new head")
    try:
        n = set_trainable(model, "lora" if args.lora_rank else args.trainable)
    except ValueError as e:
        raise ValueError(str(e).replace("what trains", "--trainable")) from None
    what = "LoRA adapters and the head" if args.lora_rank else args.trainable
    print(f"Classifier: classes {model.cfg['labels']}; what trains: {what}, {n:,} weights.")
    return model


def _classify_loaders(args, data, ctx, tokenizer, world_size, labels):
    """Labelled texts, one a row, padded on the right to the longest of their batch."""
    train_records, valid_records = data
    _check_enough_records(args, train_records, valid_records, world_size)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = create_classification_dataloader(train_records, labels, args.batch_size, ctx,
                                                    tokenizer=tokenizer, generator=g,
                                                    name=args.data)
    val_loader = create_classification_dataloader(valid_records, labels, args.batch_size, ctx,
                                                  shuffle=False, tokenizer=tokenizer,
                                                  name=args.data)
    counts = "; ".join(f"{name}: {sum(r['label'] == name for r in train_records)} + "
                       f"{sum(r['label'] == name for r in valid_records)}" for name in labels)
    cut = train_loader.dataset.truncated + val_loader.dataset.truncated
    print(f"Data: {args.data}: {len(train_records)} training texts, {len(valid_records)} held out "
          f"for validation ({counts}); {cut} cut to the {ctx}-token context.")
    return train_loader, val_loader, "", "one text a row, padded to the longest"


def _reference_model(args, resumed, device):
    """--task dpo: DPO's frozen reference, the weights the run started from, loaded again
    (eval mode, no gradients: never trained)."""
    source = resumed[0] if resumed else args.init_from
    reference = load_model(source, device=device, openai_tf=args.init_from_tf, cfg=args.config)
    if "context_length" in args.given:
        crop_context(reference, args.context_length)
    return reference.requires_grad_(False).eval()


def _objective(args, tokenizer, reference):
    """What the run minimises: next-token prediction, a classifier's loss, or DPO's."""
    if args.task == "classify":
        return Objective(partial(classification_loss, pad_id=tokenizer.eot_token),
                         count=lambda batch: len(batch[1]))                # texts, not tokens
    return dpo_objective(reference, args.beta) if args.task == "dpo" else NEXT_TOKEN


def _prepare_splits(args, rank, world_size):
    """train/valid/test paths. Rank 0 splits the text and writes the token caches; the
    others wait, then only read. (One process alone does all of it in the second call.)"""
    if rank == 0 and world_size > 1:
        paths = prepare_splits(args.data, auto_split=True, resplit=args.resplit,
                               use_default_corpus=args.data == DEFAULT_DATA)
        for path in paths:
            if path.exists():       # test.txt is optional when you bring your own splits
                load_tokens(path, progress=not args.no_progress)
    barrier()
    return prepare_splits(args.data, auto_split=True, resplit=args.resplit and world_size == 1,
                          use_default_corpus=args.data == DEFAULT_DATA)


# --init-from: the source fixes these; --context-length (cropped) and --drop-rate may change
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings")


def _check_outputs(args, rank):
    """--out, the files written beside it, and --tensorboard: each writable (rank 0 writes
    them all), and none a file the run reads (the --init-from weights: the first checkpoint
    would overwrite the source, and a LoRA resume would add the adapters onto weights that
    hold them already; the --data text and its split files; the --tokenizer and --eval-data
    files)."""
    out = Path(args.out)
    beside = [out.with_name(out.stem + end) for end in
              ("_history.json", "_loss.png", "_metrics.jsonl")] + [previous_path(out)]
    if args.tokenizer.startswith("train:"):
        beside.append(out.with_name(out.stem + "_tokenizer.json"))
    reads = [("--data", args.data), *(("--data's split", p) for p in split_paths(args.data)),
             ("--init-from", args.init_from), ("--eval-data", args.eval_data)]
    if args.tokenizer != "gpt2" and not args.tokenizer.startswith("train:"):
        reads.append(("--tokenizer", args.tokenizer))
    check_output(args.out, reads, "--out", also=beside,
                 example=out.with_name(out.stem + "_tuned.pth"), writable=rank == 0)
    if args.tensorboard is not None:
        check_output(args.tensorboard, reads, "--tensorboard", folder=True, writable=rank == 0)


def _resumed_source(args):
    """--resume of a fine-tuning run: (its recorded source, its config, whether it is a LoRA
    run), after checking --init-from against the source; None for a run from a random init."""
    ckpt = saved_run(args.out)
    saved = (ckpt.get("settings") or {}).get("init_from")
    lora = ckpt.get("lora")
    if saved is None:
        if args.init_from is not None:
            raise ValueError(f"--resume: the run at {args.out} trained from a random init, "
                             f"not from --init-from {args.init_from}; leave --init-from out")
        return None
    if args.init_from is not None and not same_source(saved, source_id(args.init_from)):
        raise ValueError(f"--resume: the run at {args.out} started from {saved}, not from "
                         f"--init-from {args.init_from}; resume with --init-from {saved}, or "
                         f"train into a new --out without --resume")
    if lora is not None and args.init_from is None:
        raise ValueError(f"--resume: {args.out} is a LoRA run on {saved}; resume it with "
                         f"--init-from {saved} (its frozen weights) and --lora-rank "
                         f"{lora['rank']} --lora-targets {','.join(lora['targets'])}")
    return saved, ckpt["config"], lora is not None


def _resumed_full_finetune(args, saved, have, device):
    """The model of a resumed full fine-tune, shaped by its checkpoint's config ``have`` (the
    checkpoint holds every weight, so the source need not exist any more); resume_run loads
    the weights."""
    wrong = [f"--{k.replace('_', '-')} {getattr(args, k)} (it has {have[k]})"
             for k in (*SHAPE_KEYS, "context_length", "drop_rate")
             if k in args.given and getattr(args, k) != have[k]]
    if wrong:
        raise ValueError(f"--resume: the run at {args.out} has its own shape, and these flags "
                         f"would change it: {', '.join(wrong)}; leave them out")
    with torch.device("meta"):          # shapes only: resume_run fills in every weight
        model = GPTModel(have)
    model = model.to_empty(device=device)
    if have["tie_embeddings"]:
        model.tie_weights()
    print(f"Model: fine-tuned from {saved} (all weights train), resumed from {args.out}")
    return model


def _build_model(args, cfg, device, resumed=None):
    """A random GPTModel(cfg), or with --init-from the source's weights (plus LoRA).

    ``resumed``: what _resumed_source found; a full fine-tune is rebuilt from its checkpoint.
    """
    torch.manual_seed(args.seed)        # the init (LoRA's A too) is the same in every run
    if resumed is not None and not resumed[2]:
        return _resumed_full_finetune(args, *resumed[:2], device)
    if args.init_from is None:
        if args.preset == "small":
            print(f"Model: emb_dim={cfg['emb_dim']}, n_layers={cfg['n_layers']}, "
                  f"n_heads={cfg['n_heads']}, context_length={cfg['context_length']} "
                  f"(train.py's small preset, sized for minutes on a CPU; --preset 124M "
                  f"trains GPT_CONFIG_124M).")
        return GPTModel(cfg).to(device)
    model = load_model(args.init_from, device=device, openai_tf=args.init_from_tf,
                       cfg=args.config)
    have = model.cfg
    if "labels" in have and args.task != "classify":
        raise ValueError(f"--init-from {args.init_from} is a classifier (classes "
                         f"{have['labels']}): train it further with --task classify, or start "
                         f"from a language model")
    wrong = [f"--{k.replace('_', '-')} {getattr(args, k)} (it has {have[k]})"
             for k in SHAPE_KEYS if k in args.given and getattr(args, k) != have[k]]
    if "context_length" in args.given and args.context_length > have["context_length"]:
        wrong.append(f"--context-length {args.context_length} (it has "
                     f"{have['context_length']} positions)")
    if wrong:
        raise ValueError(f"--init-from {args.init_from} brings its own shape, and these flags "
                         f"would change it: {', '.join(wrong)}. Leave them out; only "
                         f"--context-length (up to the source's) and --drop-rate may differ")
    if "context_length" in args.given:
        crop_context(model, args.context_length)
    if "drop_rate" in args.given:
        set_dropout(model, args.drop_rate)
    if args.lora_rank:
        try:
            add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
        except ValueError as e:         # its message names rank=..., say it as the flag
            raise ValueError(str(e).replace("LoRA rank", "--lora-rank")) from None
    print(f"Model: {args.init_from}: emb_dim={have['emb_dim']}, n_layers={have['n_layers']}, "
          f"n_heads={have['n_heads']}, context_length={have['context_length']}, tied head: "
          f"{have['tie_embeddings']}" + (f"; LoRA rank {args.lora_rank}, alpha "
                                         f"{args.lora_alpha:g} on {args.lora_targets}"
                                         if args.lora_rank else "; all weights train"))
    return model


def _report(args, history, model, test_path, device, rank, tokenizer):
    """Test loss (text runs), the loss plot and history files, and the final lines."""
    ctx = unwrap_model(model).cfg["context_length"]
    out = Path(args.out)
    test_tokens = (load_tokens(test_path, tokenizer, progress=not args.no_progress)
                   if test_path and test_path.exists() else [])
    history["test_loss"] = float("nan")
    if len(test_tokens) > ctx:
        test_loader = create_dataloader(test_tokens, args.batch_size, ctx, ctx, shuffle=False,
                                        drop_last=False, name=test_path)
        with torch.no_grad():
            history["test_loss"] = calc_loss_loader(test_loader, model.eval(), device)
    if rank == 0:
        # the faint per-step line needs each step's tokens: the mean step's (records vary)
        per_step = history["tokens_seen"][-1] / max(1, history["final_step"])
        plot = plot_losses(history["epoch"], history["tokens_seen"], history["train_loss"],
                           history["val_loss"], out.with_name(out.stem + "_loss.png"),
                           step_losses=history["step_loss"], tokens_per_step=per_step,
                           task_scores=history.get("task_scores"),
                           seen={"classify": "texts", "dpo": "pairs"}.get(args.task, "tokens"))
        hist = save_history(history, out.with_name(out.stem + "_history.json"))
        print(f"Saved {out}, {hist.name} and {plot.name} in {out.parent}/")
    if test_path is not None:
        print(f"test: loss={history['test_loss']:.3f} "
              f"perplexity={math.exp(history['test_loss']):.1f}")
    metrics = "".join(f" {k}={v[-1]:.4f}" for k, v in history.items()
                      if k.startswith("val_") and k != "val_loss")      # val_accuracy, ...
    print(f"final: step={history['final_step']} train_loss={history['final_train_loss']:.4f} "
          f"val_loss={history['final_val_loss']:.4f}{metrics}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError, DownloadError) as e:
        # a flag, the data or a checkpoint that does not fit: the message says what to do
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:          # Ctrl-C: what is saved, and how to go on
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
