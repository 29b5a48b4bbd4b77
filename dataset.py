"""Text -> token ids -> training windows; instruction records -> padded batches.

    text --get_tokenizer().encode--> token ids                 GPT-2's byte-level BPE
    token ids --GPTDataset--> (input, target) windows          target = input shifted by one
    windows --create_dataloader--> batches (B, T)
    record --render_conversation--> ids + which are scored     one template (second half)
    records --create_instruction_dataloader--> batches (B, the longest record)
    preference pairs --(the same, preferences=True)--> (2B, longest): chosen, then rejected

File plumbing lives in the engine, re-exported at the end (prepare_splits, load_tokens,
read_records, split_records, ...).
"""

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine import records as record_files
from engine import text_files, token_cache
from engine.bpe_files import gpt2_bpe_files, gpt2_encoding  # noqa: F401  (the files: public)
from engine.checkpoints import saved_tokenizer
from tokenizer import BPETokenizer


def get_tokenizer(source=None):
    """GPT-2's byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256) via tiktoken, offline;
    or a run's own vocabulary: ``source`` is a tokenizer file (tokenizer.py), or a checkpoint
    or export folder trained with one (it carries the file; any other source is GPT-2's)."""
    own = saved_tokenizer(source)
    return BPETokenizer.loads(own, str(source)).to_tiktoken() if own else gpt2_encoding()


# ---------------------------------------------------------------------------------------
# Sliding windows over the ids, and the DataLoader

class GPTDataset(Dataset):
    """Next-token training pairs cut from one long sequence of token ids.

    Window ``i`` is ``tokens[s : s + max_length + 1]`` with ``s = starts[i]``: the input is
    its first ``max_length`` ids, the target the last ``max_length`` (the input shifted by
    one), so every position learns to predict the token after it. Windows start every
    ``stride`` tokens; ``stride < max_length`` makes them overlap (more windows from the same
    text, each token seen in several contexts). If the last full window stops short of the
    end, one more window ending exactly at the last token is added so the tail is trained on.

    Only the ids are stored (2 bytes each), windows sliced out when asked for: an int64 input
    and target per window would take 8 GB, not 0.5, for 1 GB of text (context 256, stride 128).

    ``name`` (say, the file's path) only goes into error messages, so that "valid.txt has
    126 tokens" tells you which of several texts is too short.
    """

    def __init__(self, txt, tokenizer, max_length, stride, *, name=None):
        for arg, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if isinstance(txt, str):    # else ids: a tensor, an array or memmap, a list of ints
            txt = (tokenizer or get_tokenizer()).encode(txt, allowed_special={"<|endoftext|>"})
        self.tokens = token_cache.as_token_array(txt)     # (n_tokens,) uint16; a memmap stays one
        self.max_length, self.stride = int(max_length), int(stride)
        n = len(self.tokens)
        if n < self.max_length + 1:
            raise ValueError(
                f"{name or 'text'} has {n} tokens; need at least max_length+1="
                f"{self.max_length + 1}. Add text or lower context_length (max_length; "
                f"--context-length in train.py).")
        # start + max_length < n: the target (shifted by one) must still fit in the tokens
        starts = np.arange(0, n - self.max_length, self.stride, dtype=np.int64)
        last = n - 1 - self.max_length              # the window whose target ends at the end
        if starts[-1] != last:
            starts = np.append(starts, last)
        self.starts = starts                                           # (n_windows,)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        chunk = torch.from_numpy(
            self.tokens[s:s + self.max_length + 1].astype(np.int64))   # (max_length + 1,)
        return chunk[:-1], chunk[1:]                # input, target: (max_length,) each


def create_dataloader(txt, batch_size=4, max_length=256, stride=128, shuffle=True,
                      drop_last=True, num_workers=0, tokenizer=None, generator=None, *,
                      name=None):
    """A DataLoader of ``(input_ids, target_ids)`` batches, each ``(batch_size, max_length)``.

    ``txt`` is the text (tokenized with ``tokenizer``, default GPT-2's) or its token ids (from
    ``load_tokens``, a tensor or a list). ``drop_last=True`` skips a smaller final batch so
    every step sees the same batch shape. Pass a seeded ``torch.Generator`` as ``generator``
    to make the shuffle order repeatable. ``name`` (what the text is, e.g. its path) is used
    only in error messages.
    """
    record_files.check_batch_size(batch_size)
    dataset = GPTDataset(txt, tokenizer, max_length, stride, name=name)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"{name or 'the text'} gives {len(dataset)} windows (max_length={max_length}, "
            f"stride={stride}), fewer windows than batch_size={batch_size}, so "
            f"drop_last=True leaves no batches. Lower batch_size, add text, lower stride, or "
            f"pass drop_last=False.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# ---------------------------------------------------------------------------------------
# Instruction data: one template turns a conversation into token ids and a loss mask
IGNORE_INDEX = -100     # a target the loss skips: F.cross_entropy's default, as in HF's labels


def as_conversation(record):
    """A record (Alpaca or messages, engine/records.py) as a list of messages. An Alpaca
    record is one exchange: the instruction and, after a blank line, its input; so a model
    tuned on Alpaca-style records is asked in the very format chat.py uses."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    instruction, extra, output = record_files.alpaca_fields(record)
    user = instruction + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def render_conversation(messages, tokenizer=None, reply_open=False):
    """The template: messages -> ``(ids, scored)``, two lists of the same length, where
    ``scored[i]`` says whether the loss counts token i: only the assistant's words and the
    ``<|endoftext|>`` ending each of its turns, never the system text, the user's or a header.

        ### System:                            <- only with a system message
        Answer in one word.

        ### User:
        Name a primary colour.

        ### Assistant:
        Red.<|endoftext|>### User:             <- scored: "Red." and <|endoftext|>
        And another?

        ### Assistant:
        Blue.<|endoftext|>                     <- scored: "Blue." and <|endoftext|>

    ``<|endoftext|>`` (id 50256) ends a turn: GPT-2 has it already ("the document ends
    here"), so pretrained checkpoints and the Hugging Face export need no new token, and
    generation stops at it (``eos_id``). Pieces are encoded with ``encode_ordinary``: an
    "<|endoftext|>" typed in a message stays text. ``reply_open=True`` (chat.py) renders a
    conversation ending with a user message, up to "### Assistant:\\n": the reply comes next.
    """
    tokenizer = tokenizer or get_tokenizer()
    if messages[-1]["role"] != (last := "user" if reply_open else "assistant"):
        raise ValueError(f"with reply_open={reply_open} the conversation must end with a {last}")
    ids, scored = [], []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            piece = tokenizer.encode_ordinary(content) + [tokenizer.eot_token]
        else:
            text = (f"### System:\n{content}\n\n" if role == "system" else
                    f"### User:\n{content}\n\n### Assistant:\n")
            piece = tokenizer.encode_ordinary(text)
        ids += piece
        scored += [role == "assistant"] * len(piece)
    return ids, scored


def fit_conversation(messages, max_tokens, tokenizer=None, reply_open=False):
    """render_conversation within ``max_tokens`` -> ``(ids, scored, dropped, cut)``.

    Too long, it loses 1. its oldest exchanges (a user message and its answer; the system
    message stays), down to the last one (``dropped`` counts them); then 2. the middle of
    the prompt, down to a quarter of ``max_tokens`` (the task's opening and the
    "### Assistant:" cue stay); then 3. the end of the answer (and <|endoftext|>).
    ``cut``: whether 2 or 3 happened (engine/records.py's fit). chat.py fits with it too.
    """
    render = functools.partial(render_conversation, tokenizer=tokenizer, reply_open=reply_open)
    return record_files.fit(render, messages, max_tokens)


class InstructionDataset(Dataset):
    """One ``(input, target)`` pair per record (a list, or a .json / .jsonl path): the ids
    less the last / the first one, the target -100 where the next token is not scored. So
    ids may be ``max_length + 1`` long (the model's context + 1); longer records are fitted
    (fit_conversation) and counted in ``truncated``."""

    def __init__(self, records, tokenizer=None, max_length=1024, *, format=None, name=None):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
            raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
        records = record_files.load_records(records, format, name)     # a list, checked
        self.examples, self.truncated = [], 0
        for record in records:
            ids, scored, *shortened = fit_conversation(as_conversation(record), max_length + 1,
                                                       tokenizer)      # (dropped, cut)
            self.truncated += any(shortened)
            self.examples.append((np.asarray(ids, dtype=np.int64), np.asarray(scored)))
        self.lengths = [len(ids) - 1 for ids, _ in self.examples]        # input lengths

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ids, scored = (torch.from_numpy(a) for a in self.examples[i])     # (n,) each
        return ids[:-1], torch.where(scored[1:], ids[1:], IGNORE_INDEX)   # (n - 1,) each


def pad_batch(samples, pad_id=50256):
    """[(input, target), ...] of different lengths -> (inputs, targets), each (B, longest).

    Padding goes on the right: ``pad_id`` in the inputs, -100 in the targets. No attention
    mask is needed: attention is causal, so no real token sees the padding after it, and
    padding's predictions are never scored: each record's loss is what it is alone.
    (Generation pads on the left, with a mask, so that each row's next token is the last.)"""
    width = max(len(x) for x, _ in samples)
    inputs = torch.full((len(samples), width), pad_id, dtype=torch.long)          # (B, L)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for row, (x, y) in enumerate(samples):
        inputs[row, :len(x)], targets[row, :len(y)] = x, y
    return inputs, targets


# Preference pairs (DPO, train_utils.dpo_objective): one prompt, two answers, each rendered
# in the template above; the targets score the answers only

def preference_conversations(record):
    """(chosen, rejected) conversations of a preference record (a prompt or an instruction)."""
    asked = {"instruction": record["prompt"]} if "prompt" in record else record
    return tuple(as_conversation({**asked, "output": record[side]})
                 for side in ("chosen", "rejected"))


class PreferenceDataset(Dataset):
    """One (chosen, rejected) pair of InstructionDataset examples per preference record."""

    def __init__(self, records, tokenizer=None, max_length=1024, *, name=None):
        pairs = [preference_conversations(r)
                 for r in record_files.load_preferences(records, name)]
        self.chosen, self.rejected = (InstructionDataset([{"messages": p[k]} for p in pairs],
                                                         tokenizer, max_length) for k in (0, 1))
        self.truncated = self.chosen.truncated + self.rejected.truncated
        self.lengths = [max(a, b) for a, b in zip(self.chosen.lengths, self.rejected.lengths)]

    def __len__(self):
        return len(self.chosen)

    def __getitem__(self, i):
        return self.chosen[i], self.rejected[i]


def pad_pairs(pairs, pad_id=50256):
    """[(chosen, rejected), ...] -> (inputs, targets) (2B, longest): chosen rows, then rejected."""
    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def create_instruction_dataloader(records, batch_size=8, max_length=1024, shuffle=True,
                                  drop_last=False, num_workers=0, tokenizer=None,
                                  generator=None, *, group_by_length=False, format=None,
                                  name=None, preferences=False):
    """create_dataloader's twin for instruction records (a list, or a .json / .jsonl path):
    ``(input_ids, target_ids)`` batches, one record a row, as wide as the longest (pad_batch).

    ``max_length``: the model's context_length; ``format``: "alpaca" or "messages" to insist
    on one; ``group_by_length``: a shuffled order where records of similar length meet;
    ``drop_last`` off: a small set loses no record. ``.dataset.truncated``: records cut.
    ``preferences``: the records are preference pairs (PreferenceDataset, pad_pairs)."""
    record_files.check_batch_size(batch_size)
    dataset = (PreferenceDataset(records, tokenizer, max_length, name=name) if preferences else
               InstructionDataset(records, tokenizer, max_length, format=format, name=name))
    sampler = (record_files.LengthGroupedSampler(dataset.lengths, batch_size, generator)
               if group_by_length else None)
    pad = functools.partial(pad_pairs if preferences else pad_batch,
                            pad_id=(tokenizer or get_tokenizer()).eot_token)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      generator=generator, collate_fn=pad)


# ---------------------------------------------------------------------------------------
# Files on disk (engine/: text_files, token_cache, records), as train.py and the notebooks use

prepare_splits = text_files.prepare_splits
split_train_val_test = text_files.split_train_val_test
read_text = text_files.read_text
default_corpus_text = text_files.default_corpus_text
ensure_input_file = text_files.ensure_input_file
split_paths = text_files.split_paths
split_stamp_path = text_files.split_stamp_path
token_cache_paths = token_cache.token_cache_paths
read_records = record_files.read_records        # .json / .jsonl instruction records, checked
split_records = record_files.split_records      # (train, valid) by whole records, seeded
fetch_records = record_files.fetch_records      # a public set by URL, downloaded once
is_records = record_files.is_records            # a .json / .jsonl path or URL
read_preferences = record_files.read_preferences    # DPO's prompt / chosen / rejected pairs


def load_tokens(path, tokenizer=None, cache=True, **options):
    """Token ids of a UTF-8 text file (``tokenizer`` default: GPT-2's), as a 1-D uint16 array,
    cached beside the file as ``<file>.tokens.u16`` (token_cache.load_tokens says how)."""
    return token_cache.load_tokens(path, tokenizer or get_tokenizer(), cache, **options)
