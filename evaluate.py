"""How well a model predicts a text: its loss and perplexity, over windows that slide.

    python evaluate.py --weights model_weights/trained_gpt2.pth --data data/test.txt
    python evaluate.py --weights 124M --data my.txt --stride 512 --context-length 1024

A model sees at most ``context_length`` tokens at once, so a long text is scored in windows
(the strided evaluation of transformers' guide "Perplexity of fixed-length models"). Windows
of ``context_length`` tokens start every ``stride`` tokens, and each scores only the targets
the window before it did not: with ``stride < context_length`` every token after the first
is predicted exactly once, each with at least ``context_length - stride`` tokens before it.
A smaller stride gives every prediction more context (a lower, fairer perplexity) and costs
more forward passes. The last line:

    loss=X perplexity=Y bits_per_byte=Z tokens=N

loss is the mean negative log-likelihood per scored token (nats), perplexity exp(loss),
bits_per_byte the same total in bits over the UTF-8 bytes of the scored tokens (comparable
across tokenizers), N the number of tokens scored.
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import get_tokenizer, load_tokens
from engine.devices import get_device
from model import DTYPES
from model_sources import SOURCES_HELP, load_model


def strided_windows(n_tokens, context_length, stride):
    """[(begin, end, n_scored)]: window tokens[begin:end] scores its last n_scored targets.

    The first window scores every target it has (end - 1: the first token has nothing
    before it); each later one the targets after the previous window's end. The last
    window ends at the end of the text and may be shorter than context_length.
    """
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows, scored_until = [], 1          # tokens[:scored_until] need no (more) score
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        first = max(scored_until, begin + 1)           # a window's first token has no target
        if end > first:
            windows.append((begin, end, end - first))
        scored_until = max(scored_until, end)
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def evaluate_perplexity(model, tokens, context_length=None, stride=None, batch_size=4,
                        tokenizer=None, progress=True):
    """Strided sliding-window loss of ``model`` on ``tokens`` (a 1-D sequence of ids).

    ``context_length`` defaults to the model's, ``stride`` to half of it. Returns
    ``{"loss", "perplexity", "bits_per_byte", "tokens"}`` (bits_per_byte needs the
    ``tokenizer``, default GPT-2's).
    """
    cfg = model.cfg
    context_length = context_length or cfg["context_length"]
    if not 1 < context_length <= cfg["context_length"]:
        raise ValueError(f"context_length must be in 2..{cfg['context_length']} (the model's), "
                         f"got {context_length}")
    stride = stride or max(1, context_length // 2)
    if not 1 <= stride:
        raise ValueError(f"stride must be >= 1, got {stride}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))               # (N,)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    windows = strided_windows(len(tokens), context_length, stride)
    total_nll, scored = 0.0, []
    bar = tqdm(total=len(windows), desc="evaluating", unit="window", disable=not progress)
    # windows of the same length go through the model together
    for length in dict.fromkeys(end - begin for begin, end, _ in windows):
        same = [w for w in windows if w[1] - w[0] == length]
        for i in range(0, len(same), batch_size):
            group = same[i:i + batch_size]
            x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)     # (B, L)
            h = model.hidden_states(x)                                         # (B, L, C)
            for row, (_, end, n) in enumerate(group):
                # the logits at positions L-1-n .. L-2 predict the last n tokens
                logits = model.logits(h[row, length - 1 - n:length - 1])       # (n, vocab)
                targets = tokens[end - n:end]
                total_nll += F.cross_entropy(logits.float(), targets.to(device),
                                             reduction="sum").item()
                scored.append(targets)
            bar.update(len(group))
    bar.close()
    model.train(was_training)
    scored = torch.cat(scored)
    loss = total_nll / len(scored)
    tokenizer = tokenizer or get_tokenizer()
    token_bytes = torch.tensor([len(tokenizer.decode_single_token_bytes(i))    # (vocab,)
                                for i in range(tokenizer.n_vocab)])
    n_bytes = int(token_bytes[scored].sum())
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_nll / math.log(2) / n_bytes, "tokens": len(scored)}


def main(argv=None):

    p = argparse.ArgumentParser(description="Loss and perplexity of a model on a text file, "
                                            "with sliding windows.")
    p.add_argument("--weights", required=True, metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--data", required=True, help="UTF-8 text file to score")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: half the context)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per window (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="weights' precision (bf16: half the memory; a slightly different loss)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best there)")
    p.add_argument("--config", metavar="NAME_OR_JSON", default=None,
                   help="only for a .pth holding a bare state dict")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("stride", "context_length", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "context_length" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= "
                    f"{2 if name == 'context_length' else 1}, got {value}")
    try:
        device = get_device(args.device)
        model = load_model(args.weights, device=device, dtype=args.dtype, cfg=args.config)
        tokens = load_tokens(args.data)
        result = evaluate_perplexity(model, tokens, args.context_length, args.stride,
                                     args.batch_size, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"loss={result['loss']:.6f} perplexity={result['perplexity']:.4f} "
          f"bits_per_byte={result['bits_per_byte']:.6f} tokens={result['tokens']}")
    return result


if __name__ == "__main__":
    main()
