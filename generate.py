"""Turn a trained GPTModel into text: encode a prompt, sample tokens one by one, decode.

    python generate.py --weights model_weights/trained_gpt2.pth --prompt "Every effort moves you"

Sampling, step by step, for each row of the batch:
    logits of the last position (B, vocab_size)
      -> divide by temperature (0 means: just take the argmax, "greedy")
      -> top-k: keep the k largest, top-p: keep the smallest set whose probability >= p
      -> softmax -> draw one token -> append -> feed only that token back (KV cache)
"""

import argparse
import codecs
import math
import operator
import sys

import torch

import cpu_kernels
from cpu_kernels import greedy_tokens
from model import DTYPES, unwrap_model


def text_to_token_ids(text, tokenizer, device=None):
    """str -> LongTensor (1, T). ``<|endoftext|>`` in the text becomes token 50256."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)   # (1, T)


def token_ids_to_text(token_ids, tokenizer):
    """(T,) or (1, T) -> str; (B, T) with B > 1 -> list of B strings."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] > 1:
        return [tokenizer.decode(row.tolist()) for row in ids]
    return tokenizer.decode(ids.reshape(-1).tolist())


def check_sampling_args(temperature=0.0, top_k=None, top_p=None):
    """Raise ValueError for settings that have no meaning, before any work is done."""
    # "not >= 0" also catches NaN. Dividing logits by a positive temperature below ~1e-30
    # overflows to inf, and softmax of inf is NaN: 0 is the way to ask for greedy.
    if (temperature is None or isinstance(temperature, bool) or not temperature >= 0
            or math.isinf(temperature) or 0 < temperature < 1e-30):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= 1e-30, "
                         f"got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not _is_int(top_k) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _is_int(value):
    """True for ints and integer scalars such as numpy.int64 (not for floats)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def filtered_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab_size) -> the probabilities the next token is drawn from.

    The filters run in the order Hugging Face uses: temperature, then top-k, then top-p;
    tokens a filter removes get probability exactly 0. ``temperature=0`` (greedy) puts all
    the probability on the argmax. The inference notebooks plot what this returns.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0.0:
        greedy = greedy_tokens(logits)                                       # (B, 1)
        return torch.zeros_like(logits, dtype=torch.float).scatter(-1, greedy, 1.0)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # Keep exactly k entries: scatter the top-k values into a -inf canvas. Comparing
        # against the k-th value instead would keep more than k when values tie.
        values, indices = torch.topk(logits, top_k, dim=-1)                 # (B, k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most
        # likely token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p                      # (B, vocab)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)                                     # (B, vocab)


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab_size) -> next token ids (B, 1), drawn from ``filtered_probs``."""
    if temperature == 0.0:
        return greedy_tokens(logits)                                         # (B, 1)
    probs = filtered_probs(logits, temperature, top_k, top_p)                # (B, vocab)
    return torch.multinomial(probs, num_samples=1, generator=generator)      # (B, 1)


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, context_size=None, temperature=0.0,
                    top_k=None, eos_id=None, top_p=None, use_cache=True, generator=None):
    """Yield the next tokens, (B, 1) per step, as they are sampled (the streaming form).

    Rows that have produced ``eos_id`` keep producing ``eos_id``; the loop stops when
    every row has finished or after ``max_new_tokens`` steps.
    """
    check_sampling_args(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, tokens) tensor, got shape "
                         f"{tuple(idx.shape)}; encode some text with text_to_token_ids")
    if context_size is not None and (isinstance(context_size, bool) or not _is_int(context_size)
                                     or context_size < 1):
        raise ValueError(f"context_size must be a positive int or None (the model's "
                         f"context_length), got {context_size!r}")
    if max_new_tokens <= 0:
        return
    gpt = unwrap_model(model)
    context_size = min(context_size or gpt.cfg["context_length"], gpt.cfg["context_length"])
    was_training = model.training
    model.eval()
    try:
        # fast path on x86 CPUs: every matmul of the loop reads oneDNN-packed weight copies,
        # 1.4x faster to stream, and greedy decoding reads half of the output head
        # (cpu_kernels.packed_for_cpu); elsewhere ``head.logits`` is gpt.logits.
        with cpu_kernels.packed_for_cpu(gpt, idx.shape[0], greedy=temperature == 0.0) as head:
            for next_id in _sampling_loop(gpt, head, idx, max_new_tokens, context_size,
                                          temperature, top_k, eos_id, top_p, use_cache,
                                          generator):
                # The caller's code runs while we wait at the yield, and may train the
                # model or load other weights: the layers use their own weights meanwhile.
                head.active = False
                yield next_id
                head.active = True
    finally:
        model.train(was_training)


def _sampling_loop(gpt, head, idx, max_new_tokens, context_size, temperature, top_k, eos_id,
                   top_p, use_cache, generator):
    """The loop of generate_tokens (same arguments; ``head``: what packed_for_cpu yields)."""

    def next_tokens(tokens, cache):
        h = gpt.hidden_states(tokens, cache)[:, -1]                           # (B, C)
        if temperature == 0.0:
            return head.greedy(h)             # = greedy_tokens(gpt.logits(h))  (B, 1)
        return sample_next_token(head.logits(h), temperature, top_k, top_p,   # (B, 1)
                                 generator)

    B = idx.shape[0]
    seq = idx[:, -context_size:]        # a prompt longer than the context keeps its end
    # Room for the prompt and the new tokens, at most the context: allocating all 1024
    # positions of GPT-2 for a short answer cost 0.16 s at batch 8.
    cache_len = min(context_size, seq.shape[1] + max_new_tokens)
    cache = gpt.new_cache(B, max_len=cache_len) if use_cache else None
    next_id = next_tokens(seq, cache)                                            # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if eos_id is not None:
            next_id = torch.where(done[:, None], eos_id, next_id)
            done |= next_id[:, 0] == eos_id
        yield next_id
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            return
        seq = torch.cat([seq, next_id], dim=1)[:, -context_size:]
        if cache is not None and cache.pos < cache.max_len:
            # Only the new token goes through the model: the keys and values of
            # everything before it are already in the cache.
            next_id = next_tokens(next_id, cache)
        else:
            # The window is full, so it slides by one: every position shifts and the
            # cached keys (computed at the old positions) no longer apply. Recompute.
            if cache is not None:
                cache.reset()
            next_id = next_tokens(seq, cache)


def generate_text(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None,
                  eos_id=None, top_p=None, use_cache=True, generator=None, callback=None):
    """Continue the prompt ``idx`` (B, T) by up to ``max_new_tokens`` tokens.

    Returns a LongTensor (B, T + n), the prompt included. ``callback(next_ids)`` is called
    with each step's (B, 1) tokens, for printing text while it is produced.
    """
    pieces = [idx]
    for next_id in generate_tokens(model, idx, max_new_tokens, context_size, temperature,
                                   top_k, eos_id, top_p, use_cache, generator):
        pieces.append(next_id)
        if callback is not None:
            callback(next_id)
    return torch.cat(pieces, dim=1)


class TextStreamer:
    """A callback for generate_text that prints row 0's text as tokens arrive.

    A token can end in the middle of a multi-byte UTF-8 character (emoji, accents), so
    bytes go through an incremental decoder that waits for the rest of the character.
    """

    def __init__(self, tokenizer, file=None):
        self.tokenizer = tokenizer
        self.file = file or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, next_ids):
        piece = self.decoder.decode(self.tokenizer.decode_bytes([int(next_ids[0, 0])]))
        print(piece, end="", file=self.file, flush=True)

    def finish(self):
        """Print what is left: bytes of a character the last token did not complete
        (shown as U+FFFD, as token_ids_to_text shows them)."""
        print(self.decoder.decode(b"", final=True), end="", file=self.file, flush=True)


def generate_and_print(model, tokenizer, device, start_context, max_new_tokens=50,
                       temperature=0.0, top_k=None, top_p=None, eos_id=None, stream=False):
    """Print (and return) the model's continuation of ``start_context`` on one line.

    Used after each training epoch to watch the model learn.
    """
    gpt = unwrap_model(model)
    idx = text_to_token_ids(start_context, tokenizer, device)
    streamer = TextStreamer(tokenizer) if stream else None
    if stream:
        print(start_context, end="", flush=True)
    out = generate_text(model, idx, max_new_tokens, gpt.cfg["context_length"], temperature,
                        top_k, eos_id, top_p, callback=streamer)
    text = token_ids_to_text(out, tokenizer)
    if stream:
        streamer.finish()
        print()
    else:
        print(text.replace("\n", "\\n"))      # one line; newlines shown as \n
    return text


def main(argv=None):
    from download_weights_hf import config_arg

    parser = argparse.ArgumentParser(description="Generate text with a trained GPT-2 checkpoint.")
    parser.add_argument("--weights", default="model_weights/trained_gpt2.pth",
                        help=".pth written by train.py, save_checkpoint or download_weights.py")
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off (all tokens)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best there)")
    parser.add_argument("--config", metavar="NAME_OR_JSON", default=None, type=config_arg,
                        help="only for a .pth that holds a bare state dict: one of OpenAI's "
                             "sizes (124M, ...) or a JSON file with the model's config")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="weights' precision: bf16 halves the memory and runs faster on "
                             "CPUs with AVX512-BF16 and on recent GPUs (default fp32)")
    args = parser.parse_args(argv)
    if args.top_k == 0:
        args.top_k = None
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e).replace("top_k", "--top-k").replace("top_p", "--top-p")
                     .replace("temperature", "--temperature", 1)
                     .replace("positive int or None", "positive int, or 0 for all tokens")
                     .replace(" or None", ""))
    if not args.prompt:
        parser.error("--prompt is empty: give some text to continue")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    from dataset import get_tokenizer
    from devices import get_device
    from model import load_checkpoint

    torch.manual_seed(args.seed)
    device = get_device(args.device)
    try:
        model = load_checkpoint(args.weights, device=device, dtype=args.dtype, cfg=args.config)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")     # a message that says what to do, no traceback
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer, device)
    streamer = TextStreamer(tokenizer)
    print(args.prompt, end="", flush=True)
    out = generate_text(model, idx, args.max_new_tokens, None, args.temperature, args.top_k,
                        eos_id=tokenizer.eot_token, top_p=args.top_p, callback=streamer)
    streamer.finish()
    print()
    return token_ids_to_text(out, tokenizer)


if __name__ == "__main__":
    main()
