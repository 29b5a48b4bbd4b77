"""Fine-tuning memory and speed: full fine-tuning vs LoRA, GPT-2 shapes, random weights.

    python bench/finetune_memory.py                  # 124M and 774M, context 256, batch 1
    python bench/finetune_memory.py --quick          # the tiny shape: a smoke run

Each measurement is a fresh process that builds the model (OpenAI's shape: tied head,
biases, dropout 0; random weights, context cropped to ``--context``), then runs
``--steps`` optimizer steps of train_utils.accumulate_gradients + clip_grad_norm_ + AdamW
(train_utils.make_optimizer), the loop's own step. "full" trains every weight; "LoRA r"
(lora.add_lora) only the adapters of the attention and MLP projections. The memory figure
is the process's peak RSS minus its RSS before the model was built, after two steps of a
toy model (Python and torch themselves, their code pages and threads, ~0.3 GB, are not the
model's; library buffers that grow with the model, such as MKL's, are counted), against
the fp32 bytes of the weights: full
fine-tuning keeps weights, gradients and AdamW's two moments (4x) plus the activations of
one step; LoRA keeps the weights (1x) plus the activations, its adapters being tiny.
Targets: full <= 4.5x, LoRA <= 1.5x.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

TARGETS = {"full": 4.5, "lora": 1.5}      # (peak RSS - baseline) / fp32 weight bytes, at most
SIZES = {"tiny": None, "124M": "gpt2-small (124M)", "774M": "gpt2-large (774M)"}


def child(size, mode, rank, context, steps, seed):
    """Runs in the child process: build, train ``steps`` steps, report."""
    import gc
    import time

    import torch

    from engine import cpu_kernels
    from lora import add_lora
    from model import MODEL_CONFIGS, GPTModel
    from train_utils import accumulate_gradients, make_optimizer, recompute_activations

    def build(cfg):
        model = GPTModel(cfg).train()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if mode.startswith("lora"):
            add_lora(model, rank, 16.0)
        if mode.endswith("+recompute"):
            recompute_activations(model)
        return model, weight_bytes

    def train_steps(model, n, vocab, length):
        opt = make_optimizer(model, learning_rate=1e-4, weight_decay=0.1)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (1, length + 1), generator=g)
        batch = (tokens[:, :-1], tokens[:, 1:])
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            accumulate_gradients(model, [batch], torch.device("cpu"))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times

    cpu_kernels.tune_malloc()                 # as train_model does
    # Two steps of a toy model first, so that the baseline holds what any run of this
    # code loads once (torch's code pages for these ops, its worker threads), not the model
    toy = {"vocab_size": 256, "context_length": 16, "emb_dim": 32, "n_heads": 2,
           "n_layers": 1, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True}
    train_steps(build(toy)[0], 2, 256, 16)
    gc.collect()
    baseline = common.rss_bytes()
    if size == "tiny":
        cfg = {"vocab_size": 50257, "context_length": context, "emb_dim": 128, "n_heads": 4,
               "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True}
    else:
        cfg = {**MODEL_CONFIGS[SIZES[size]], "context_length": context}
    torch.manual_seed(seed)
    model, weight_bytes = build(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = train_steps(model, steps, 50257, context)
    common.child_report(baseline=baseline, weight_bytes=weight_bytes, trainable=trainable,
                        step_s=common.median(times[1:] or times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None,
                   help="comma list of tiny, 124M, 774M (default 124M,774M)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 4; 2 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the tiny shape, 2 steps")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        size, mode, rank, context, steps, seed = args.child
        return child(size, mode, int(rank), int(context), int(steps), int(seed))
    sizes = (args.sizes or ("tiny" if args.quick else "124M,774M")).split(",")
    steps = args.steps or (2 if args.quick else 4)
    print(f"finetune_memory: context {args.context}, batch 1, {steps} optimizer steps per "
          f"run (the first one not timed), a fresh process each")
    print(common.machine_line())
    rows, summary = [], common.Summary("finetune_memory")
    for size in sizes:
        for mode in ("full", "full+recompute", "lora", "lora+recompute"):
            result, peak, _ = common.run_child(
                [str(Path(__file__).resolve()), "--child", size, mode, str(args.rank),
                 str(args.context), str(steps), str(args.seed)])
            used = peak - result["baseline"]
            ratio = used / result["weight_bytes"]
            label = mode.replace("lora", f"LoRA r{args.rank}")
            rows.append([size, label, f"{result['trainable']:,}",
                         common.fmt_bytes(result["weight_bytes"]), common.fmt_bytes(peak),
                         common.fmt_bytes(used), f"{ratio:.2f}x", f"{result['step_s']:.2f}"])
            summary.target(f"{size} {label} memory", ratio, TARGETS[mode.split("+")[0]],
                           higher_is_better=False)
    print()
    print(common.table(["shape", "mode", "trainable", "fp32 weights", "peak RSS",
                        "peak - baseline", "/ weights", "s / step"], rows,
                       ["<", "<", ">", ">", ">", ">", ">", ">"]))
    print()
    print(summary.line(note=" [--quick: tiny shape, targets are for 124M and 774M]"
                       if args.quick else ""))
    return rows


if __name__ == "__main__":
    main()
