"""Many log-likelihoods at once: what evaluate.py's benchmarks spend their time on.

evaluate.loglikelihood computes, in plain PyTorch, one (context, continuation) at a time:

    x = (context + continuation)[-(max_length + 1):][:-1]      one forward pass
    sum of log_softmax(logits)[the continuation's tokens]      over its last positions

and evaluate.loglikelihoods asks ``batched_loglikelihoods`` first. The numbers are the same
(up to the rounding in which two kernels differ; the tests hold them to 1e-4 of transformers'
and of the plain loop), found with less work:

- a context is computed once for all of its continuations (HellaSwag's four endings): its
  keys and values go into a KV cache, each continuation then runs on a copy of it (a
  context with one continuation, as in LAMBADA and WikiText, simply goes with it in one
  forward pass);
- several requests share each forward pass: contexts left-padded under an attention mask
  (positions count from each row's first token), continuations right-padded (causal
  attention keeps real tokens from seeing that padding, and it is never scored);
- the output head, a (vocab x C) product per position, runs only on the positions that
  predict a continuation token, a chunk of rows at a time.

On 2 CPU cores this scores HellaSwag >= 3x faster than a per-continuation loop with
transformers' GPT2LMHeadModel (bench/eval_speed.py). One switch: ``scoring.ENABLED = False``
(or ``GPT2_BATCHED_SCORING=0`` before Python starts), or ``with scoring.disabled():``.
"""

import os
import sys

import torch

from engine import turned_off

ENABLED = os.environ.get("GPT2_BATCHED_SCORING", "1") != "0"   # the one switch
ROWS_PER_CHUNK = 512        # logits held at once: 512 x 50257 fp32 is 100 MB


def disabled():
    """Within this block evaluate.loglikelihoods runs the plain loop, one forward per pair."""
    return turned_off(sys.modules[__name__])


def fit(requests, max_length):
    """Each request as inputs of at most ``max_length`` tokens: [(request, [choice], context,
    [continuation])].

    A request whose longest continuation fits after the whole context stays one input (its
    context goes through the model once, for all of its continuations). Otherwise each
    continuation keeps the last ``max_length + 1 - len(continuation)`` tokens of the context,
    the same tokens as ``(context + continuation)[-(max_length + 1):][:-1]``.
    """
    fitted = []
    for r, (context, continuations) in enumerate(requests):
        if len(context) + max(map(len, continuations)) - 1 <= max_length:
            fitted.append((r, list(range(len(continuations))), context, continuations))
            continue
        for k, cont in enumerate(continuations):
            fitted.append((r, [k], context[-(max_length + 1 - len(cont)):], [cont]))
    return fitted


def _batches(items, batch_size, limit):
    """Consecutive runs of at most ``batch_size`` items whose padded rows fit the model: the
    longest context plus the longest continuation (minus its last token) <= ``limit``."""
    batch, longest_context, longest_continuation = [], 0, 0
    for item in items:
        context, continuations = item[2], item[3]
        lc = max(longest_context, len(context))
        le = max(longest_continuation, *map(len, continuations))
        if batch and (len(batch) == batch_size or lc + le - 1 > limit):
            yield batch
            batch, lc, le = [], len(context), max(map(len, continuations))
        batch.append(item)
        longest_context, longest_continuation = lc, le
    if batch:
        yield batch


def _score_group(model, group, device):
    """[(log-likelihood, greedy)] of every continuation in ``group`` ([(context, [cont])])."""
    if all(len(cs) == 1 for _, cs in group):
        return _score_alone(model, group, device)
    return _score_shared(model, group, device)


def _score_alone(model, group, device):
    """One continuation per context (LAMBADA, WikiText's windows): nothing to share, so one
    forward pass over context + continuation minus its last token, rows right-padded."""
    seqs = [c + cs[0][:-1] for c, cs in group]
    x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)        # (B, L)
    for i, seq in enumerate(seqs):
        x[i, :len(seq)] = torch.tensor(seq)
    h = model.hidden_states(x.to(device))                                   # (B, L, C)
    # position len(context) - 1 + j of row i predicts token j of its continuation
    rows, cols, targets = [], [], []
    for i, (c, (cont,)) in enumerate(group):
        rows += [i] * len(cont)
        cols += range(len(c) - 1, len(c) - 1 + len(cont))
        targets += cont
    rows = torch.tensor(rows, device=device)
    vectors = h[rows, torch.tensor(cols, device=device)]                   # (n, C)
    return _sum_logprobs(model, vectors, torch.tensor(targets, device=device), rows,
                         len(group))


def _score_shared(model, group, device):
    """Several continuations per context (HellaSwag's endings): two forward passes with the
    KV cache between them. First the contexts, left-padded to one length; then every
    continuation minus its last token (the last is only predicted), each row on a copy of
    its context's cache."""
    B, Lc = len(group), max(len(ctx) for ctx, _ in group)
    ctx = torch.zeros(B, Lc, dtype=torch.long)                                 # (B, Lc)
    ctx_mask = torch.zeros(B, Lc, dtype=torch.long)                            # (B, Lc)
    for i, (c, _) in enumerate(group):
        ctx[i, Lc - len(c):] = torch.tensor(c)
        ctx_mask[i, Lc - len(c):] = 1
    padded = bool((ctx_mask == 0).any())
    conts = [cont for _, cs in group for cont in cs]
    rows = torch.tensor([i for i, (_, cs) in enumerate(group) for _ in cs])   # (K,) their contexts
    K, Le = len(conts), max(map(len, conts)) - 1
    ctx, ctx_mask, rows = ctx.to(device), ctx_mask.to(device), rows.to(device)
    cache = model.new_cache(B, max_len=Lc) if Le else None
    h = model.hidden_states(ctx, cache, ctx_mask if padded else None)          # (B, Lc, C)
    vectors = [h[:, -1][rows]]              # (K, C): each predicts its continuation's 1st token
    targets = [torch.tensor([cont[0] for cont in conts])]
    owner = [torch.arange(K)]
    if Le:
        x = torch.zeros(K, Le, dtype=torch.long)                               # (K, Le)
        for k, cont in enumerate(conts):
            x[k, :len(cont) - 1] = torch.tensor(cont[:-1])
        shared = model.new_cache(K, max_len=Lc + Le)
        shared.k[:, :, :, :Lc] = cache.k[:, rows]         # (layers, K, heads, Lc, head_dim)
        shared.v[:, :, :, :Lc] = cache.v[:, rows]
        shared.pos = Lc
        mask = None
        if padded:
            ones = torch.ones(K, Le, dtype=torch.long, device=device)
            mask = torch.cat([ctx_mask[rows], ones], 1)                        # (K, Lc + Le)
        hc = model.hidden_states(x.to(device), shared, mask)                   # (K, Le, C)
        # position j of row k predicts token j + 1 of its continuation
        keep = [(k, j) for k, cont in enumerate(conts) for j in range(len(cont) - 1)]
        if keep:
            kk, jj = torch.tensor(keep).T                                      # 2 x (n,)
            vectors.append(hc[kk.to(device), jj.to(device)])                   # (n, C)
            targets.append(torch.tensor([conts[k][j + 1] for k, j in keep]))
            owner.append(kk)
    return _sum_logprobs(model, torch.cat(vectors), torch.cat(targets).to(device),
                         torch.cat(owner).to(device), K)


def _sum_logprobs(model, vectors, targets, owner, n):
    """Per owner: the summed log-probability of its targets, and whether each was the argmax."""
    total = torch.zeros(n, dtype=torch.float64, device=vectors.device)         # (n,)
    misses = torch.zeros(n, dtype=torch.long, device=vectors.device)           # (n,)
    for i in range(0, len(vectors), ROWS_PER_CHUNK):
        logits = model.logits(vectors[i:i + ROWS_PER_CHUNK]).float()           # (m, vocab)
        t = targets[i:i + ROWS_PER_CHUNK]                                      # (m,)
        logp = logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, 1)  # (m,)
        o = owner[i:i + ROWS_PER_CHUNK]
        total.index_add_(0, o, logp.double())
        misses.index_add_(0, o, (logits.argmax(1) != t).long())
    return [(float(s), not int(m)) for s, m in zip(total.cpu(), misses.cpu())]


def batched_loglikelihoods(model, requests, batch_size, max_length, bar=None):
    """Per request [(context ids, [continuation ids, ...])], [(log-likelihood, greedy)] per
    continuation, or None when the switch is off. ``model`` in eval mode; ``bar``: a tqdm
    bar to advance by the continuations scored."""
    if not ENABLED:
        return None
    device = next(model.parameters()).device
    fitted = fit(requests, max_length)
    # longest first, as the harness does: a batch is of similar lengths, and memory runs
    # out (if it does) at once
    order = sorted(fitted, key=lambda f: -(len(f[2]) + max(map(len, f[3]))))
    results = [[None] * len(conts) for _, conts in requests]
    for batch in _batches(order, batch_size, model.cfg["context_length"]):
        scores = iter(_score_group(model, [(c, cs) for _, _, c, cs in batch], device))
        for r, choices, _, _ in batch:
            for k in choices:
                results[r][k] = next(scores)
        if bar is not None:
            bar.update(sum(len(choices) for _, choices, _, _ in batch))
    return results
