"""Turn a trained GPTModel into text: encode a prompt, sample tokens one by one, decode.

    python generate.py --weights model_weights/trained_gpt2.pth --prompt "Every effort moves you"

Sampling, step by step, for each row of the batch (the order transformers' generate uses):
    logits of the last position (B, vocab_size)
      -> repetition penalty; no repeated n-grams    (both look at the prompt and the output)
      -> divide by temperature (0 means: just take the argmax, "greedy")
      -> top-k: keep the k largest; top-p: the smallest set whose probability >= p;
         min-p: those at least min_p times as likely as the most likely one
      -> softmax -> draw one token -> append -> feed only that token back (KV cache)
A row ends at ``eos_id`` or once its text contains one of ``stop_strings``.
"""

import argparse
import codecs
import math
import operator
import sys
from dataclasses import dataclass

import torch

from engine import cpu_kernels, decoder
from model import DTYPES, unwrap_model


def text_to_token_ids(text, tokenizer, device=None):
    """str -> LongTensor (1, T). ``<|endoftext|>`` in the text becomes token 50256."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)   # (1, T)


def batch_to_token_ids(texts, tokenizer, device=None):
    """A list of prompts -> (ids (B, T), attention_mask (B, T)), left-padded.

    Shorter prompts get padding on the left (``<|endoftext|>`` ids, which the mask marks 0),
    so that every row's next token is the last column: generate_text continues them all
    at once, each exactly as it would continue alone.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of prompts (for one, use "
                         "text_to_token_ids)")
    rows = [tokenizer.encode(t, allowed_special={"<|endoftext|>"}) for t in texts]
    if not all(rows):
        raise ValueError(f"prompt {[len(r) for r in rows].index(0)} is empty")
    width = max(len(r) for r in rows)
    pad = tokenizer.eot_token
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask                                                         # (B, T) each


def token_ids_to_text(token_ids, tokenizer):
    """(T,) or (1, T) -> str; (B, T) with B > 1 -> list of B strings."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] > 1:
        return [tokenizer.decode(row.tolist()) for row in ids]
    return tokenizer.decode(ids.reshape(-1).tolist())


def check_sampling_args(temperature=0.0, top_k=None, top_p=None, min_p=None,
                        repetition_penalty=1.0, no_repeat_ngram_size=0):
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
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] or None, got {min_p}")
    if (isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float))
            or not 0 < repetition_penalty < math.inf):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got "
                         f"{repetition_penalty!r}")
    if (isinstance(no_repeat_ngram_size, bool) or not _is_int(no_repeat_ngram_size)
            or no_repeat_ngram_size < 0):
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0 = off), got "
                         f"{no_repeat_ngram_size!r}")


def _is_int(value):
    """True for ints and integer scalars such as numpy.int64 (not for floats)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# The next token: from logits to probabilities to a draw

def greedy_tokens(logits):
    """logits (B, vocab_size) -> each row's most likely token, (B, 1); ties to the lowest id.

    .float() first: argmax over bfloat16 has no vectorized CPU kernel; the conversion is
    exact, so the same token comes out, ties included, sooner (bench/README.md).
    """
    # fast path on CPU: one vector pass in C (cpu_kernels.greedy_ids), the same ids
    ids = cpu_kernels.greedy_ids(logits)
    return ids if ids is not None else logits.float().argmax(dim=-1, keepdim=True)


def filtered_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """logits (B, vocab_size) -> the probabilities the next token is drawn from.

    The filters run in the order Hugging Face uses: temperature, then top-k, top-p, min-p;
    tokens a filter removes get probability exactly 0. ``temperature=0`` (greedy) puts all
    the probability on the argmax. The inference notebooks plot what this returns.
    """
    check_sampling_args(temperature, top_k, top_p, min_p)
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
    if min_p is not None:
        # min-p (Nguyen et al. 2024): the cut follows the model's confidence, tight when
        # one token dominates, loose when many are plausible; the top token always stays
        probs = torch.softmax(logits, dim=-1)                                # (B, vocab)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True),
                                    float("-inf"))
    return torch.softmax(logits, dim=-1)                                     # (B, vocab)


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None,
                      min_p=None):
    """logits (B, vocab_size) -> next token ids (B, 1), drawn from ``filtered_probs``."""
    if temperature == 0.0:
        return greedy_tokens(logits)                                         # (B, 1)
    probs = filtered_probs(logits, temperature, top_k, top_p, min_p)         # (B, vocab)
    return torch.multinomial(probs, num_samples=1, generator=generator)      # (B, 1)


def penalize_repetition(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: the logit
    of every token in ``seen`` (B, vocab) is divided by ``penalty`` when positive and
    multiplied by it when negative, so penalty > 1 makes a repeat less likely either way."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def ngram_repeats(tokens, n):
    """The tokens that would repeat an n-gram of ``tokens`` (a list of ids): those that
    followed each earlier occurrence of its last n - 1 tokens."""
    prefix = tokens[len(tokens) - n + 1:] if n > 1 else []
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1)
            if tokens[i:i + n - 1] == prefix]


@dataclass
class Sampling:
    """How generate_tokens picks each next token (the arguments of the same names)."""
    temperature: float = 0.0
    top_k: int = None
    top_p: float = None
    min_p: float = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    generator: torch.Generator = None

    def looks_back(self):
        """Whether the choice depends on the tokens so far, not only on the logits."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


class _History:
    """Each row's real tokens so far (prompt and output): what the penalty and the n-gram
    rule look at, and where stop strings are searched (in the output's bytes)."""

    def __init__(self, idx, mask, vocab, sampling, stop_strings, tokenizer):
        self.sampling, self.tokenizer = sampling, tokenizer
        self.rows = [row[m.bool()].tolist() for row, m in zip(idx, mask)]
        self.seen = torch.zeros(idx.shape[0], vocab, dtype=torch.bool, device=idx.device)
        for i, row in enumerate(self.rows):
            self.seen[i, row] = True
        self.stops = [s.encode("utf-8") for s in stop_strings or ()]
        self.output = [b""] * idx.shape[0]

    def adjust(self, logits):
        """Logits (B, vocab) with the repetition penalty and the n-gram ban applied."""
        s = self.sampling
        if s.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, self.seen, s.repetition_penalty)
        if s.no_repeat_ngram_size:
            for i, row in enumerate(self.rows):
                banned = ngram_repeats(row, s.no_repeat_ngram_size)
                logits[i, banned] = float("-inf")
        return logits

    def add(self, next_id, done):
        """Append the new tokens of the rows still going; returns (B,), True where a stop
        string now appears in a row's output (None without stop strings)."""
        if not (self.sampling.looks_back() or self.stops):
            return None                 # nothing looks back: keep the loop lean
        hit = torch.zeros_like(done)
        for i, token in enumerate(next_id[:, 0].tolist()):
            if done[i]:
                continue
            self.rows[i].append(token)
            self.seen[i, token] = True
            if self.stops:
                piece = self.tokenizer.decode_single_token_bytes(token)
                self.output[i] += piece
                # a new occurrence must end inside this token's bytes
                tail = self.output[i][-(max(map(len, self.stops)) + len(piece) - 1):]
                hit[i] = any(stop in tail for stop in self.stops)
        return hit if self.stops else None


# ---------------------------------------------------------------------------------------
# The generation loop

@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, context_size=None, temperature=0.0,
                    top_k=None, eos_id=None, top_p=None, use_cache=True, generator=None, *,
                    repetition_penalty=1.0, no_repeat_ngram_size=0, min_p=None,
                    attention_mask=None, stop_strings=None, tokenizer=None):
    """Yield the next tokens, (B, 1) per step, as they are sampled (the streaming form).

    ``attention_mask`` (B, T): 1 for prompt tokens, 0 for left padding (batch_to_token_ids
    makes both). A row is finished once it produced ``eos_id`` or (with ``tokenizer``) its
    output contains one of ``stop_strings``; it then keeps producing ``eos_id`` (or
    ``<|endoftext|>``). The loop stops when every row has finished or after
    ``max_new_tokens`` steps.
    """
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty,
                        no_repeat_ngram_size, generator)
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty,
                        no_repeat_ngram_size)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, tokens) tensor, got shape "
                         f"{tuple(idx.shape)}; encode some text with text_to_token_ids")
    if context_size is not None and (isinstance(context_size, bool) or not _is_int(context_size)
                                     or context_size < 1):
        raise ValueError(f"context_size must be a positive int or None (the model's "
                         f"context_length), got {context_size!r}")
    _check_mask(attention_mask, idx)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None           # no padding: the plain causal path
    if stop_strings and (tokenizer is None or isinstance(stop_strings, str)
                         or not all(isinstance(s, str) and s for s in stop_strings)):
        raise ValueError("stop_strings must be a list of non-empty strings, with tokenizer= "
                         "(to read the text the tokens make)")
    if max_new_tokens <= 0:
        return
    gpt = unwrap_model(model)
    context_size = min(context_size or gpt.cfg["context_length"], gpt.cfg["context_length"])
    fill = eos_id if eos_id is not None else (tokenizer.eot_token if stop_strings else None)
    mask = None if attention_mask is None else attention_mask.to(idx.device)
    history = _History(idx, torch.ones_like(idx) if mask is None else mask,
                       gpt.cfg["vocab_size"], sampling, stop_strings, tokenizer)
    was_training = model.training
    model.eval()
    try:
        # fast path on x86 CPUs: every matmul of the loop reads oneDNN-packed weight copies,
        # faster to stream, and plain greedy decoding reads half of the output head
        # (cpu_kernels.packed_for_cpu), and one token of one row goes through every block
        # in one C call (engine/decoder.py); elsewhere ``head.logits`` is gpt.logits.
        plain_greedy = temperature == 0.0 and not sampling.looks_back()
        with decoder.decoding(gpt, idx.shape[0], greedy=plain_greedy) as head:
            for next_id in _sampling_loop(gpt, head, idx, mask, max_new_tokens, context_size,
                                          sampling, history, eos_id, fill, use_cache):
                # The caller's code runs while we wait at the yield, and may train the
                # model or load other weights: the layers use their own weights meanwhile.
                head.active = False
                yield next_id
                head.active = True
    finally:
        model.train(was_training)


def _check_mask(mask, idx):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.shape != idx.shape:
        raise ValueError(f"attention_mask must be a tensor of the prompt's shape "
                         f"{tuple(idx.shape)}, got {getattr(mask, 'shape', type(mask))}")
    m = mask.long()
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    if (m[:, 1:] < m[:, :-1]).any() or not m[:, -1].all():
        raise ValueError("attention_mask has padding on the right (or in the middle): pad "
                         "prompts on the left, as batch_to_token_ids does, so that every "
                         "row's next token is the last column")


def _sampling_loop(gpt, head, idx, mask, max_new_tokens, context_size, sampling, history,
                   eos_id, fill, use_cache):
    """The loop of generate_tokens. ``head``: what packed_for_cpu yields; ``mask``: the
    attention mask of the tokens so far, or None when there is no padding."""

    def next_tokens(tokens, cache, mask):
        h = gpt.hidden_states(tokens, cache, mask)[:, -1]                     # (B, C)
        if sampling.temperature == 0.0 and not sampling.looks_back():
            if head.greedy is not None:         # fast path: the screened argmax (CPU)
                return head.greedy(h)                                         # (B, 1)
            return greedy_tokens(head.logits(h))                              # (B, 1)
        logits = history.adjust(head.logits(h).float())                       # (B, vocab)
        return sample_next_token(logits, sampling.temperature, sampling.top_k,  # (B, 1)
                                 sampling.top_p, sampling.generator, sampling.min_p)

    B = idx.shape[0]
    seq = idx[:, -context_size:]        # a prompt longer than the context keeps its end
    if mask is not None:
        mask = mask[:, -context_size:]
    # Room for the prompt and the new tokens, at most the context: allocating all 1024
    # positions of GPT-2 for a short answer would cost more than the answer.
    cache_len = min(context_size, seq.shape[1] + max_new_tokens)
    cache = gpt.new_cache(B, max_len=cache_len) if use_cache else None
    next_id = next_tokens(seq, cache, mask)                                       # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if fill is not None:
            next_id = torch.where(done[:, None], fill, next_id)
        stopped = history.add(next_id, done)
        if eos_id is not None:
            done |= next_id[:, 0] == eos_id
        if stopped is not None:
            done |= stopped
        yield next_id
        if step == max_new_tokens - 1 or (fill is not None and bool(done.all())):
            return
        seq = torch.cat([seq, next_id], dim=1)[:, -context_size:]
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(next_id)], dim=1)[:, -context_size:]
        if cache is not None and cache.pos < cache.max_len:
            # Only the new token goes through the model: the keys and values of
            # everything before it are already in the cache.
            next_id = next_tokens(next_id, cache, mask)
        else:
            # The window is full, so it slides by one: every position shifts and the
            # cached keys (computed at the old positions) no longer apply. Recompute.
            if cache is not None:
                cache.reset()
            next_id = next_tokens(seq, cache, mask)


def generate_text(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None,
                  eos_id=None, top_p=None, use_cache=True, generator=None, callback=None, *,
                  repetition_penalty=1.0, no_repeat_ngram_size=0, min_p=None,
                  attention_mask=None, stop_strings=None, tokenizer=None):
    """Continue the prompt ``idx`` (B, T) by up to ``max_new_tokens`` tokens.

    Returns a LongTensor (B, T + n), the prompt included. ``callback(next_ids)`` is called
    with each step's (B, 1) tokens, for printing text while it is produced. The other
    arguments are generate_tokens'. With ``stop_strings`` each row's text ends right after
    its first stop string: the token that completed it may reach past it, so a stopped
    row's output is encoded again from its text up to there (rows padded with ``eos_id``,
    or ``<|endoftext|>``, to one width).
    """
    pieces = [idx]
    for next_id in generate_tokens(model, idx, max_new_tokens, context_size, temperature,
                                   top_k, eos_id, top_p, use_cache, generator,
                                   repetition_penalty=repetition_penalty,
                                   no_repeat_ngram_size=no_repeat_ngram_size, min_p=min_p,
                                   attention_mask=attention_mask, stop_strings=stop_strings,
                                   tokenizer=tokenizer):
        pieces.append(next_id)
        if callback is not None:
            callback(next_id)
    out = torch.cat(pieces, dim=1)
    if stop_strings:
        out = _end_at_stop_strings(out, idx.shape[1], stop_strings, tokenizer,
                                   eos_id if eos_id is not None else tokenizer.eot_token)
    return out


def _end_at_stop_strings(out, prompt_len, stop_strings, tokenizer, fill):
    """Rows of ``out`` whose output holds a stop string, cut right after its first one."""
    rows = []
    for row in out.tolist():
        text = tokenizer.decode_bytes(row[prompt_len:])
        end = _stop_end(text, [s.encode() for s in stop_strings])
        if end is not None:
            kept = text[:end].decode("utf-8", errors="replace")
            row = row[:prompt_len] + tokenizer.encode(kept, allowed_special="all")
        rows.append(row)
    width = max(map(len, rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], device=out.device)


def _stop_end(text, stops):
    """Where ``text`` (str or bytes) ends when cut right after its first stop string, or
    None when it holds none."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


class TextStreamer:
    """A callback for generate_text that prints row 0's text as tokens arrive.

    A token can end in the middle of a multi-byte UTF-8 character (emoji, accents), so
    bytes go through an incremental decoder that waits for the rest of the character.
    Given the generation's ``eos_id`` and ``stop_strings``, it prints what generate_text
    returns: nothing from the end-of-text token on, and the text only up to the end of
    the first stop string (text that could begin one waits until it is known not to).
    """

    def __init__(self, tokenizer, file=None, eos_id=None, stop_strings=None):
        self.tokenizer = tokenizer
        self.file = file or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eos_id, self.stops = eos_id, list(stop_strings or ())
        self.pending, self.done = "", False     # text held back; True once the row ended

    def __call__(self, next_ids):
        token = int(next_ids[0, 0])
        if self.done or token == self.eos_id:
            self.done = True
            return
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        end = _stop_end(self.pending, self.stops)
        if end is not None:                     # the text ends right after the stop string
            self._print(self.pending[:end])
            self.pending, self.done = "", True
            return
        # hold back the longest tail that a stop string starts with
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        self._print(self.pending[:len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold:]

    def finish(self):
        """Print what is left: text held back for a stop string that never came, and bytes
        of a character the last token did not complete (shown as U+FFFD, as
        token_ids_to_text shows them)."""
        if not self.done:
            self._print(self.pending + self.decoder.decode(b"", final=True))
        self.pending = ""

    def _print(self, text):
        print(text, end="", file=self.file, flush=True)


def generate_and_print(model, tokenizer, device, start_context, max_new_tokens=50,
                       temperature=0.0, top_k=None, top_p=None, eos_id=None, stream=False,
                       generator=None):
    """Print (and return) the model's continuation of ``start_context``.

    Used after each training epoch to watch the model learn: each line of the text is
    printed after "| ", so the sample's own newlines print as newlines and its empty lines
    (a young model writes runs of them: the newline is among the commonest tokens of its
    text) stay visibly part of it, apart from the log's lines around it. With ``stream``
    the text is printed as it is, token by token as they are drawn.
    """
    gpt = unwrap_model(model)
    idx = text_to_token_ids(start_context, tokenizer, device)
    streamer = TextStreamer(tokenizer, eos_id=eos_id) if stream else None
    if stream:
        print(start_context, end="", flush=True)
    out = generate_text(model, idx, max_new_tokens, gpt.cfg["context_length"], temperature,
                        top_k, eos_id, top_p, generator=generator, callback=streamer)[0]
    if eos_id is not None and eos_id in out[idx.shape[1]:]:     # the text ends there
        out = out[:idx.shape[1] + out[idx.shape[1]:].tolist().index(eos_id)]
    text = token_ids_to_text(out, tokenizer)
    if stream:
        streamer.finish()
        print()
    else:
        print("\n".join("|" + (" " + line if line else "") for line in text.split("\n")))
    return text


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "no_repeat_ngram_size")


def add_sampling_flags(parser):
    """The sampling flags (generate.py's, and chat.py's), named as SAMPLING_FLAGS."""
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off (all tokens)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--min-p", type=float, default=None,
                        help="keep tokens at least this times as likely as the top one")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 makes tokens already in the text less likely (1 = off)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="never repeat an n-gram of this size (0 = off)")


def main(argv=None):
    from model_sources import SOURCES_HELP

    parser = argparse.ArgumentParser(description="Generate text with a GPT-2: a checkpoint of "
                                                 "ours, Hugging Face weights or OpenAI's.")
    parser.add_argument("--weights", default="model_weights/trained_gpt2.pth", metavar="SOURCE",
                        help=SOURCES_HELP)
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue (default 'Every effort moves you'); give it "
                             "several times for a batch of prompts")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="continuations of each prompt, generated together in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    add_sampling_flags(parser)
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end a continuation right after this text (repeatable)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best there)")
    parser.add_argument("--config", metavar="NAME_OR_JSON", default=None,
                        help="only for a .pth that holds a bare state dict: one of OpenAI's "
                             "sizes (124M, ...) or a JSON file with the model's config")
    parser.add_argument("--dtype", choices=[*DTYPES, "int8"], default="fp32",
                        help="weights' precision: bf16 halves the memory and runs faster on "
                             "CPUs with AVX512-BF16 and on recent GPUs; int8 stores every "
                             "matrix in 8 bits: a quarter of the memory, faster decoding on CPUs")
    args = parser.parse_args(argv)
    if args.top_k == 0:
        args.top_k = None
    prompts = args.prompt or ["Every effort moves you"]
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.min_p,
                            args.repetition_penalty, args.no_repeat_ngram_size)
    except ValueError as e:
        message = str(e)
        for name in ("top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        parser.error(message.replace("temperature", "--temperature", 1)
                     .replace("positive int or None", "positive int, or 0 for all tokens")
                     .replace(" or None", ""))
    if not all(prompts):
        parser.error("--prompt is empty: give some text to continue")
    for flag, value in (("--max-new-tokens", args.max_new_tokens),
                        ("--num-samples", args.num_samples)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.stop and not all(args.stop):
        parser.error("--stop is empty: give the text to stop at")

    from engine.devices import get_device
    from model_sources import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    try:
        device = get_device(args.device)
        model, tokenizer = load_model_and_tokenizer(args.weights, device=device,
                                                    dtype=args.dtype, cfg=args.config)
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")     # a message that says what to do, no traceback
    rows = [p for p in prompts for _ in range(args.num_samples)]
    idx, mask = batch_to_token_ids(rows, tokenizer, device)
    kwargs = dict(eos_id=tokenizer.eot_token, top_p=args.top_p, min_p=args.min_p,
                  repetition_penalty=args.repetition_penalty, attention_mask=mask,
                  no_repeat_ngram_size=args.no_repeat_ngram_size, stop_strings=args.stop,
                  tokenizer=tokenizer)
    if len(rows) == 1:          # one continuation: print it as it is produced
        streamer = TextStreamer(tokenizer, eos_id=tokenizer.eot_token, stop_strings=args.stop)
        print(rows[0], end="", flush=True)
        out = generate_text(model, idx, args.max_new_tokens, None, args.temperature,
                            args.top_k, callback=streamer, **kwargs)
        streamer.finish()
        print()
        return _texts(out, mask, tokenizer)[0]
    out = generate_text(model, idx, args.max_new_tokens, None, args.temperature, args.top_k,
                        **kwargs)
    texts = _texts(out, mask, tokenizer)
    for i, text in enumerate(texts):
        print(f"--- {i + 1} of {len(texts)}")
        print(text)
    return texts


def _texts(out, mask, tokenizer):
    """Each row's text: its prompt without the padding, its output up to <|endoftext|>."""
    width, eot = mask.shape[1], tokenizer.decode([tokenizer.eot_token])
    pad = (mask == 0).sum(dim=1).tolist()
    return [tokenizer.decode(row[p:width]) + tokenizer.decode(row[width:]).split(eot)[0]
            for row, p in zip(out.tolist(), pad)]


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:       # Ctrl-C: what was printed is all there is
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
