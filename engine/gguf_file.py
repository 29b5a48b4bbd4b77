"""GGUF files of GPT-2, the format llama.cpp and the programs built on it run: write one,
read one back. The ``gguf`` package (gguf-py) is the library llama.cpp's own converter
writes them with.

    {GGUF name: tensor}, hyperparameters, Vocab --write_gguf--> model.gguf   (atomic)
    model.gguf --read_gguf--> Contents(hparams, {GGUF name: float32 tensor}, vocab)

What llama.cpp's ``gpt2`` architecture reads (its loader: src/models/gpt2.cpp):

- ``general.architecture = "gpt2"`` and ``gpt2.context_length``, ``.embedding_length``,
  ``.feed_forward_length``, ``.block_count``, ``.attention.head_count``,
  ``.attention.layer_norm_epsilon`` (HPARAMS);
- the tensors of the table's ``gguf`` column (engine/gpt2_params.py), each matrix stored as
  numpy holds it (out, in): ggml lists dimensions the other way round, {in, out}. An
  ``output.weight`` only for an untied head: without one llama.cpp multiplies by
  ``token_embd.weight``, as GPT-2 does;
- a byte-level BPE vocabulary: ``tokenizer.ggml.model = "gpt2"``, ``.pre = "gpt-2"`` (GPT-2's
  pre-tokenization regex, called by its name), the tokens in GPT-2's printable byte form
  (vocab.json's), their types (control for special tokens), the merges as "a b", the
  special ids, and whether to add BOS/EOS (GPT-2's tokenizer adds neither).

Storage follows llama.cpp's converter: 1-D tensors (norms, biases) and the position
embedding stay f32; every other matrix is f32, f16, bf16 or q8_0 (each row cut into blocks
of 32 weights, each block 32 int8 values and one f16 scale, max |w| / 127), and a matrix
whose rows do not split into blocks of 32 falls back to f16 there.
"""

import dataclasses
import functools
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from engine.bpe_files import gpt2_vocab_and_merges
from engine.fileio import atomic_write

ARCH = "gpt2"
Q = gguf.GGMLQuantizationType
# --gguf-type -> (how the matrices are stored, the file type llama.cpp reports)
TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# gpt2.<key>: what llama.cpp's loader reads, in the file's types
HPARAMS = {
    "context_length": int, "embedding_length": int, "feed_forward_length": int,
    "block_count": int, "attention.head_count": int, "attention.layer_norm_epsilon": float,
}
# Kept f32 whatever the type, besides every 1-D tensor, as llama.cpp's converter and its
# llama-quantize keep them.
_KEEP_F32 = ("position_embd.weight",)
# The text of this project's tokenizer file (tokenizer.py's format), for a vocabulary of our
# own: tokens and merges are what llama.cpp reads; the file gives our loader back exactly
# the tokenizer it came from, name and all (GGUF's tokenizer.huggingface.json does the same
# for Hugging Face's tokenizer.json).
OWN_TOKENIZER_KEY = "tokenizer.gpt2_course_bpe.json"
_K = gguf.Keys.Tokenizer


@dataclasses.dataclass
class Vocab:
    """A byte-level BPE vocabulary as GGUF holds it."""
    tokens: list          # id -> the token in GPT-2's printable byte form (vocab.json's)
    merges: list          # "a b", in the order they were learned
    special: list         # ids of the special tokens (control tokens to llama.cpp)
    eos_id: int
    own: str = None       # the text of our tokenizer file, for a vocabulary of our own


@dataclasses.dataclass
class Contents:
    """What ``read_gguf`` returns."""
    hparams: dict         # HPARAMS' keys -> values
    tensors: dict         # GGUF name -> float32 torch tensor, in the file's layout
    vocab: Vocab


# ---------------------------------------------------------------------------------------
# Writing

def storage_type(name, shape, gguf_type):
    """How ``write_gguf`` stores the tensor ``name`` of ``shape`` for ``gguf_type``."""
    want = TYPES[gguf_type][0]
    if len(shape) == 1 or name in _KEEP_F32:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    return Q.F16 if shape[-1] % block else want


def write_gguf(path, tensors, hparams, vocab, gguf_type="f32", general=None):
    """Write a GGUF file of llama.cpp's gpt2 architecture at ``path``, atomically.

    ``tensors``: {GGUF name: tensor in GGUF's layout (matrices (out, in))}, any float dtype;
    ``hparams``: a value for each key of HPARAMS; ``vocab``: a ``Vocab``; ``gguf_type``: a
    key of TYPES; ``general``: {key: str} written as ``general.<key>`` (name, license, ...).
    Tensors are converted and written one at a time, so the file costs one tensor's memory
    beyond the model. Returns {GGUF name: storage type name} as written.
    """
    if gguf_type not in TYPES:
        raise ValueError(f"gguf_type must be one of {list(TYPES)}, got {gguf_type!r}")
    plan = {name: storage_type(name, tuple(t.shape), gguf_type) for name, t in tensors.items()}

    def write(tmp):
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_type(gguf.GGUFType.MODEL)
        for key, value in (general or {}).items():
            w.add_string(f"general.{key}", value)
        w.add_file_type(TYPES[gguf_type][1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, kind in HPARAMS.items():
            add = w.add_uint32 if kind is int else w.add_float32
            add(f"{ARCH}.{key}", kind(hparams[key]))
        _add_vocab(w, vocab)
        for name, qtype in plan.items():
            shape = tuple(tensors[name].shape)
            nbytes = int(np.prod(_byte_shape(shape, qtype)))
            w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, qtype in tqdm(plan.items(), desc=f"writing {Path(path).name}", unit="tensor"):
            w.write_tensor_data(_encode(tensors[name], qtype))
        w.close()

    size = sum(int(np.prod(_byte_shape(tuple(tensors[n].shape), q))) for n, q in plan.items())
    atomic_write(path, write, by_path=True, size_hint=lambda: size)
    return {name: qtype.name for name, qtype in plan.items()}


def _byte_shape(shape, qtype):
    """The shape of a tensor's stored bytes (its last axis in bytes)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def _encode(tensor, qtype):
    """A tensor as the bytes GGUF stores for ``qtype`` (numpy, C order)."""
    array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
    return np.ascontiguousarray(gguf.quants.quantize(array, qtype))


def _add_vocab(w, vocab):
    special = set(vocab.special)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab.tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(vocab.tokens))])
    w.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        w.add_bos_token_id(vocab.eos_id)     # GPT-2 has one special token for both
        w.add_eos_token_id(vocab.eos_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if vocab.own is not None:
        w.add_string(OWN_TOKENIZER_KEY, vocab.own)


# ---------------------------------------------------------------------------------------
# Reading
#
# The layout (GGUF version 2 and 3, little-endian): "GGUF", version u32, tensor count u64,
# key/value count u64; each key/value: key (u64 length + UTF-8), value type u32, value; each
# tensor: name, n_dims u32, dims u64 (innermost first), storage type u32, offset u64 into the
# data, which starts at the next multiple of general.alignment (32). gguf-py's GGUFReader
# reads it too, but builds numpy views for every element of every array: seconds for GPT-2's
# 50,257 tokens and 50,000 merges, some 20x what the plain cursor below takes.

_V = gguf.GGUFValueType
_SCALARS = {_V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I",
            _V.INT32: "i", _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q",
            _V.FLOAT64: "d"}


class _Cursor:
    """Reads GGUF's little-endian values one after another from a buffer."""

    def __init__(self, buffer):
        self.buffer, self.at = buffer, 0

    def take(self, fmt):
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.buffer):
            raise ValueError(f"it ends at byte {len(self.buffer)}, inside its header")
        values = struct.unpack_from("<" + fmt, self.buffer, self.at)
        self.at += size
        return values

    def string(self):
        (n,) = self.take("Q")
        if self.at + n > len(self.buffer):
            raise ValueError(f"it ends at byte {len(self.buffer)}, inside its header")
        text = bytes(self.buffer[self.at:self.at + n])
        self.at += n
        return text.decode("utf-8")

    def value(self, kind):
        if kind == _V.STRING:
            return self.string()
        if kind == _V.ARRAY:
            item, n = self.take("IQ")
            if item in _SCALARS:
                return list(self.take(f"{n}{_SCALARS[item]}"))
            return [self.value(item) for _ in range(n)]
        return self.take(_SCALARS[_V(kind)])[0]


def _parse(path):
    """({key: value}, [(name, numpy shape, storage type, absolute offset)], the file's bytes)
    of a GGUF file, with one clear error for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"there is no GGUF file {str(path)!r}; check the path")
    data = np.memmap(path, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    try:
        cursor = _Cursor(memoryview(data))     # slices of a memoryview cost no numpy call
        (magic,) = cursor.take("4s")
        if magic != b"GGUF":
            raise ValueError(f"it starts with {magic!r}, not b'GGUF'")
        version, n_tensors, n_kv = cursor.take("IQQ")
        if version not in (2, 3):
            raise ValueError(f"it is GGUF version {version}; versions 2 and 3 are read")
        fields = {}
        for _ in range(n_kv):
            key = cursor.string()
            (kind,) = cursor.take("I")
            fields[key] = cursor.value(kind)
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            (n_dims,) = cursor.take("I")
            dims = cursor.take(f"{n_dims}Q")
            kind, offset = cursor.take("IQ")
            # ggml lists dimensions innermost first; numpy's order is the reverse
            infos.append((name, tuple(reversed(dims)), Q(kind), offset))
        align = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        start = -(-cursor.at // align) * align
        infos = [(name, shape, kind, start + offset) for name, shape, kind, offset in infos]
        for name, shape, kind, offset in infos:
            if offset + int(np.prod(_byte_shape(shape, kind))) > len(data):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
    except (ValueError, UnicodeDecodeError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); it is truncated, damaged "
                         f"or of another format: export or download it again") from None
    return fields, infos, data


def _field(fields, path, key, required=True):
    if key not in fields and required:
        raise ValueError(f"{path} has no {key!r}; it is not a complete GPT-2 GGUF "
                         f"(llama.cpp's gpt2 architecture): export it again")
    return fields.get(key)


def _check_architecture(fields, path):
    arch = _field(fields, path, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path} holds a {arch!r} model (general.architecture); only "
                         f"{ARCH!r}, GPT-2 as llama.cpp names it, loads as a GPTModel")


def read_gguf(path):
    """The hyperparameters, tensors (dequantized to float32, in the file's layout) and
    vocabulary of a GGUF file of llama.cpp's gpt2 architecture (``Contents``).

    Any storage type gguf-py can dequantize loads (f32, f16, bf16, q8_0, q4_0, ...). A file
    of another architecture, or without a key the gpt2 loader needs, raises ValueError
    naming the file and the key.
    """
    fields, infos, data = _parse(path)
    _check_architecture(fields, path)
    hparams = {key: kind(_field(fields, path, f"{ARCH}.{key}")) for key, kind in HPARAMS.items()}
    hparams["attention.head_count_kv"] = fields.get(f"{ARCH}.attention.head_count_kv")
    tensors = {}
    for name, shape, kind, offset in infos:
        byte_shape = _byte_shape(shape, kind)
        raw = data[offset:offset + int(np.prod(byte_shape))]
        try:
            values = gguf.quants.dequantize(raw.reshape(byte_shape), kind)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {name!r} is stored as {kind.name}, which gguf-py "
                             f"cannot dequantize; convert the file to f16 or q8_0 with "
                             f"llama.cpp's llama-quantize") from None
        tensors[name] = torch.tensor(np.asarray(values, np.float32).reshape(shape))
    return Contents(hparams, tensors, _vocab(fields, path))


def read_vocab(path):
    """Only the vocabulary of a GGUF file of llama.cpp's gpt2 architecture (``Vocab``)."""
    fields, _, _ = _parse(path)
    _check_architecture(fields, path)
    return _vocab(fields, path)


def _vocab(fields, path):
    model = _field(fields, path, _K.MODEL)
    if model != "gpt2":
        raise ValueError(f"{path} has a {model!r} tokenizer ({_K.MODEL}); GPT-2's byte-level "
                         f"BPE is 'gpt2'")
    types = fields.get(_K.TOKEN_TYPE) or []
    special = [i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL]
    return Vocab(_field(fields, path, _K.LIST), _field(fields, path, _K.MERGES), special,
                 fields.get(_K.EOS_ID), fields.get(OWN_TOKENIZER_KEY))


def own_tokenizer(path):
    """The text of this project's tokenizer file that a GGUF carries (its vocabulary is a
    run's own), or None when its vocabulary is GPT-2's (ours, or llama.cpp's converter's).

    A file with another vocabulary and no such text raises ValueError: its tokens would be
    read as GPT-2's, which they are not.
    """
    vocab = read_vocab(path)
    if vocab.own is not None:
        return vocab.own
    gpt2 = gpt2_vocab()
    if vocab.tokens == gpt2.tokens and vocab.merges == gpt2.merges:
        return None
    raise ValueError(f"{path} carries a vocabulary of {len(vocab.tokens)} tokens that is not "
                     f"GPT-2's, without this project's tokenizer file; this project reads "
                     f"only those two back: export the model from its checkpoint instead")


@functools.cache
def gpt2_vocab():
    """GPT-2's own vocabulary, from OpenAI's encoder.json and vocab.bpe, as GGUF holds it."""
    ids, merges = gpt2_vocab_and_merges()
    eos = ids["<|endoftext|>"]
    return Vocab(sorted(ids, key=ids.get), merges, [eos], eos)
