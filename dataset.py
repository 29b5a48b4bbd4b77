"""Text -> token ids -> training windows.

    text --get_tokenizer().encode--> token ids                 GPT-2's byte-level BPE
    token ids --GPTDataset--> (input, target) windows          target = input shifted by one
    windows --create_dataloader--> batches (B, T)

The file plumbing train.py and train.ipynb use around them lives in the engine and is
re-exported at the end: ``prepare_splits`` (data/input.txt -> train.txt / valid.txt /
test.txt, the default corpus when there is none), ``read_text`` and ``load_tokens`` (token
ids cached beside big files as uint16).
"""

import functools
import os

import numpy as np
import tiktoken
import tiktoken.load
import torch

# GPT-2's pre-split regex (contractions, words, numbers, punctuation, spaces), as tiktoken has it
from tiktoken_ext.openai_public import r50k_pat_str
from torch.utils.data import DataLoader, Dataset

from engine import text_files, token_cache
from engine.bpe_files import gpt2_bpe_files


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """GPT-2's byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256) via tiktoken, offline."""
    encoder_json, vocab_bpe = gpt2_bpe_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


# ---------------------------------------------------------------------------------------------
# Sliding windows over the ids, and the DataLoader
# ---------------------------------------------------------------------------------------------

def _as_token_array(txt, tokenizer):
    """One compact 1-D array of ids from text, a tensor, an array/memmap or a list of ints."""
    if isinstance(txt, str):
        if tokenizer is None:
            tokenizer = get_tokenizer()
        ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        txt = ids
    elif isinstance(txt, (bytes, os.PathLike)):
        raise TypeError(f"pass the text itself (str) or its token ids, not {type(txt).__name__}; "
                        f"for a file use load_tokens(path) or read_text(path)")
    if isinstance(txt, torch.Tensor):
        txt = txt.detach().cpu().numpy()
    if isinstance(txt, np.ndarray) and txt.dtype == np.uint16:
        tokens = txt                # keep a memmap a memmap: no copy, no RAM
    else:
        arr = np.asarray(txt)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << 16):
            raise ValueError(f"token ids must lie in [0, 65535] (GPT-2 uses 0..50256), got "
                             f"{arr.min()}..{arr.max()}")
        tokens = arr.astype(np.uint16)
    if tokens.ndim != 1:
        raise ValueError(f"token ids must be 1-D (one long sequence), got shape {tokens.shape}")
    return tokens


class GPTDataset(Dataset):
    """Next-token training pairs cut from one long sequence of token ids.

    Window ``i`` is ``tokens[s : s + max_length + 1]`` with ``s = starts[i]``: the input is
    its first ``max_length`` ids, the target the last ``max_length`` (the input shifted by
    one), so every position learns to predict the token after it. Windows start every
    ``stride`` tokens; ``stride < max_length`` makes them overlap (more windows from the same
    text, each token seen in several contexts). If the last full window stops short of the
    end, one more window ending exactly at the last token is added so the tail is trained on.

    Only the ids are stored (2 bytes each, or a memmap of them); windows are sliced out when
    asked for. Keeping an int64 input and target tensor per window instead costs
    ``16 * max_length / stride`` bytes per token: 32 at ``stride = max_length / 2``, so about
    8 GB instead of 0.5 GB for a 1 GB text (~250M tokens).

    ``name`` (say, the file's path) only goes into error messages, so that "valid.txt has
    126 tokens" tells you which of several texts is too short.
    """

    def __init__(self, txt, tokenizer, max_length, stride, *, name=None):
        for arg, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.tokens = _as_token_array(txt, tokenizer)                  # (n_tokens,) uint16
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dataset = GPTDataset(txt, tokenizer, max_length, stride, name=name)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"{name or 'the text'} gives {len(dataset)} windows (max_length={max_length}, "
            f"stride={stride}), fewer windows than batch_size={batch_size}, so "
            f"drop_last=True leaves no batches. Lower batch_size, add text, lower stride, or "
            f"pass drop_last=False.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# ---------------------------------------------------------------------------------------------
# Text files on disk (engine/text_files.py, engine/token_cache.py), as train.py and the
# notebooks call them
# ---------------------------------------------------------------------------------------------

prepare_splits = text_files.prepare_splits
split_train_val_test = text_files.split_train_val_test
read_text = text_files.read_text
default_corpus_text = text_files.default_corpus_text
ensure_input_file = text_files.ensure_input_file
split_paths = text_files.split_paths
split_stamp_path = text_files.split_stamp_path
token_cache_paths = token_cache.token_cache_paths


def load_tokens(path, tokenizer=None, cache=True, **options):
    """Token ids of a UTF-8 text file (``tokenizer`` default: GPT-2's), as a 1-D uint16 array,
    cached beside the file as ``<file>.tokens.u16`` (token_cache.load_tokens says how)."""
    return token_cache.load_tokens(path, tokenizer or get_tokenizer(), cache, **options)
