"""Hugging Face GPT-2 weights <-> GPTModel, and GGUF files for llama.cpp <-> GPTModel.

    Hub id / save_pretrained folder --load_gpt2_hf--> GPTModel        (no TensorFlow needed)
    transformers GPT2Model / GPT2LMHeadModel / state dict --load_weights_into_gpt--> GPTModel
    GPTModel --export_to_hf--> folder that transformers.GPT2LMHeadModel and pipeline() load
    GPTModel --export_to_gguf--> one .gguf file that llama.cpp (llama-completion, ...) runs
    .gguf (ours, or llama.cpp's converter's) --load_gguf--> GPTModel

A classifier (classify.py: config["labels"], its head scoring the classes) is HF's
GPT2ForSequenceClassification both ways: its head is ``score.weight``, its class names
``id2label``, and ``pad_token_id`` marks the padding its last-token rule skips.

    python download_weights_hf.py --load "gpt2-small (124M)" --save model_weights/gpt2.pth
    python download_weights_hf.py --export model_weights/trained_gpt2.pth --out my-gpt2-hf
    python download_weights_hf.py --export model_weights/trained_gpt2.pth --out my-gpt2.gguf
    python download_weights_hf.py --export bare_state_dict.pth --config cfg.json --out my-gpt2-hf

--export takes any model source (load_source: a .pth, a .gguf, a folder, a Hub id, one of
OpenAI's sizes) with the tokenizer it carries. Every direction loops over
``gpt2_params.gpt2_param_names``, the one table of GPT-2 names; HF stores the four linear
layers per block as "Conv1D" with (in, out) weights, the layout of our ``model.Linear`` too
(its docstring says why), so tensors copy across unchanged; GGUF holds those four (out, in),
as ggml multiplies. ``load_gpt2_hf`` reads the safetensors file directly instead of building
a transformers model first, so loading costs about one copy of the weights in memory.
"""

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from engine import gguf_file
from engine.bpe_files import gpt2_bpe_files
from engine.checkpoints import TOKENIZER_FILE, read_checkpoint, saved_tokenizer, tensors_sha256
from engine.fileio import atomic_write, check_output, check_writable
from engine.gpt2_params import (
    GGUF_BLOCK,
    GGUF_HEAD,
    HF_BLOCK,
    HF_HEAD,
    check_block_count,
    gpt2_param_names,
    iter_gpt2_weights,
)
from engine.int8 import is_quantized, quantize_
from lora import merge
from model import (
    MODEL_CONFIGS,
    OPENAI_SIZES,
    GPTModel,
    load_checkpoint,
    resolve_dtype,
    save_checkpoint,
    size_key,
    unwrap_model,
    validate_config,
)
from tokenizer import GPT2_PATTERN, BPETokenizer

# Our config names -> the Hub repositories OpenAI's weights live in.
HF_HUB_IDS = {
    "gpt2-small (124M)": "openai-community/gpt2",
    "gpt2-medium (355M)": "openai-community/gpt2-medium",
    "gpt2-large (774M)": "openai-community/gpt2-large",
    "gpt2-xl (1558M)": "openai-community/gpt2-xl",
}
# Only what load_gpt2_hf reads: skipping pytorch_model.bin, tf/flax/onnx copies saves GBs.
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                 "model.safetensors.index.json"]
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
LAYER_NORM_EPS = 1e-5       # GPT-2's, and model.py's nn.LayerNorm's
# What --export, train.py --init-from, generate.py --weights ... take (load_source and
# model_sources.load_model), for their --help.
SOURCES_HELP = ("a .pth of ours, a .gguf, a folder written by save_pretrained, a Hugging Face "
                "Hub id (openai-community/gpt2) or one of OpenAI's sizes (124M, 355M, 774M, "
                "1558M)")
# safetensors metadata key of our exports: engine.checkpoints.tensors_sha256 of every tensor.
# The format itself checks its header and sizes but not the numbers: a weight overwritten
# on disk would load as it is. Files without the key (transformers' own) are not checked.
CHECKSUM_KEY = "tensors_sha256"


# ---------------------------------------------------------------------------------------
# transformers model or state dict -> GPTModel

def _hf_state_dict(gpt_hf):
    """A flat state dict without the ``transformer.`` prefix GPT2LMHeadModel adds.

    The ``attn.bias``/``attn.masked_bias`` causal-mask buffers that older transformers
    versions saved need no special care: the converter only looks up the names in
    the table, so they are never read.
    """
    if isinstance(gpt_hf, torch.nn.Module):
        state = gpt_hf.state_dict()
    elif isinstance(gpt_hf, Mapping):
        state = gpt_hf
    else:
        raise TypeError(f"gpt_hf must be a transformers GPT2Model/GPT2LMHeadModel or a state "
                        f"dict, got {type(gpt_hf).__name__}")
    return {key.removeprefix("transformer."): value for key, value in state.items()}


def load_weights_into_gpt(gpt, gpt_hf):
    """Copy the weights of a Hugging Face transformers GPT-2 (model or state dict) into ``gpt``.
    (download_weights.load_weights_into_gpt takes OpenAI's TensorFlow arrays.)

    Works for ``GPT2Model``, ``GPT2LMHeadModel``, ``GPT2ForSequenceClassification`` (into a
    classifier, config["labels"]) and their state dicts, with or without the
    ``transformer.`` prefix. Shapes are checked first (the error names the parameter).
    An untied ``lm_head.weight`` different from ``wte`` needs ``gpt`` built with
    tie_embeddings=False. The weights may not hold more blocks than ``gpt`` has.
    Returns ``gpt``.
    """
    state = _hf_state_dict(gpt_hf)
    n_layers = gpt.cfg["n_layers"]
    check_block_count(state, n_layers, HF_BLOCK, "the Hugging Face weights",
                      "the model's config", f"build the model with the weights' n_layer, "
                      f"not n_layers={n_layers}")

    def fetch(row):
        return state[row.hf]                # KeyError names the missing HF key

    targets = dict(gpt.named_parameters())
    with torch.no_grad():
        for name, tensor in iter_gpt2_weights(gpt, fetch, "the Hugging Face weights",
                                              head=state.get(_head_name(gpt.cfg))):
            targets[name].copy_(tensor)
    return gpt


# ---------------------------------------------------------------------------------------
# A folder of config.json + safetensors -> GPTModel, one tensor at a time

def config_from_hf(hf_config, source="config.json"):
    """A transformers GPT-2 config.json (as a dict) -> our cfg.

    Raises ValueError for settings our GPTModel does not implement, rather than
    silently computing something else.
    """
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{source} has model_type={model_type!r}; only 'gpt2' is supported")
    unsupported = {
        # (what HF calls it, value it has, value our model computes)
        "activation_function": (hf_config.get("activation_function", "gelu_new"),
                                ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf_config.get("n_inner"), (None, 4 * hf_config.get("n_embd", 0))),
        "scale_attn_weights": (hf_config.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx":
            (hf_config.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf_config.get("add_cross_attention", False), (False,)),
    }
    for key, (value, ok) in unsupported.items():
        if value not in ok:
            raise ValueError(f"{source} sets {key}={value!r}; GPTModel implements only "
                             f"{' or '.join(map(repr, ok))}")
    eps = hf_config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"{source} sets layer_norm_epsilon={eps}; GPTModel uses "
                         f"{LAYER_NORM_EPS}")
    # a GPT2ForSequenceClassification: its head (score.weight) scores these classes
    classes = "GPT2ForSequenceClassification" in (hf_config.get("architectures") or [])
    labels = [str(hf_config["id2label"][key]) for key in sorted(hf_config.get("id2label", {}),
                                                                key=int)] if classes else None
    try:
        return {"vocab_size": hf_config["vocab_size"],
                "context_length": hf_config.get("n_positions", hf_config.get("n_ctx")),
                "emb_dim": hf_config["n_embd"], "n_heads": hf_config["n_head"],
                "n_layers": hf_config["n_layer"],
                # Dropout is for training; a loaded model is for inference (and fine-tuning
                # sets its own rate). Biases everywhere: GPT-2 has them.
                "drop_rate": 0.0, "qkv_bias": True,
                "tie_embeddings": not classes and bool(hf_config.get("tie_word_embeddings", True)),
                **({"labels": labels} if classes else {})}
    except KeyError as e:
        raise ValueError(f"{source} has no {e.args[0]!r}; is it a GPT-2 config.json?") from None


def _damaged(path, error, name=None):
    """The one error for a safetensors file that cannot be opened or read."""
    what = f"could not read {name!r} from {path}" if name else f"could not open {path}"
    return ValueError(f"{what} ({error}); the file is truncated or damaged: delete it and "
                      f"download or save the model again")


def _open(path):
    """``safe_open(path)``, with a clear error for a missing, truncated or foreign file."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise _damaged(path, e) from None


def _weight_files(folder):
    """{tensor name: safetensors file} for a single or sharded save_pretrained folder.

    A single model.safetensors wins over an index, as in transformers' from_pretrained.
    """
    single = folder / "model.safetensors"
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no model.safetensors (or model.safetensors.index.json); "
            f"save the model with transformers' save_pretrained (safetensors is its default), "
            f"or, if an export into it was interrupted, run the export again")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is damaged ({e!r}); delete {str(folder)!r} and "
                         f"download or save the model again") from None
    files = {name: folder / file for name, file in weight_map.items()}
    missing = sorted({path.name for path in files.values() if not path.is_file()})
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} lacks {len(missing)} of the weight files its {index.name} names: "
            f"{missing}; the download or copy is incomplete: download or save the model again")
    return files


def _read_tensor(path, name, handle=None):
    """One tensor from a safetensors file: a view of a private memory map of the file.

    ``handle``: an open ``safe_open`` of ``path`` to read from (one per file for a whole
    load: opening parses the file's header, ~0.3 ms a time at 774M's 436 tensors). Without
    one the file is opened for this tensor alone. That looks wasteful, but it is what
    ``mmap=False`` needs: the map's pages count towards this process's memory while it is
    alive, and a short-lived map per tensor keeps the peak near one copy of the weights
    while copying (one handle for the whole copy measured ~2x at 774M).
    """
    if handle is None:
        with _open(path) as handle:
            return _read_tensor(path, name, handle)
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise _damaged(path, e, name) from None


def _verify(path):
    """Raise ValueError when a safetensors file we exported no longer holds the numbers its
    checksum (CHECKSUM_KEY) records; reads every tensor once (0.4-0.7 s for 124M's 500 MB)."""
    with _open(path) as handle:
        recorded = (handle.metadata() or {}).get(CHECKSUM_KEY)
        if recorded is None:
            return
        tensors = {name: _read_tensor(path, name, handle) for name in handle.keys()}
        if tensors_sha256(tensors) != recorded:
            raise ValueError(f"{path} is damaged: its tensors no longer match the checksum "
                             f"the export recorded in it, so bytes changed on disk since; "
                             f"export the model again or use another copy")


def _hub_id(name):
    """One of OpenAI's size names -> its Hub id; any other name is taken as a Hub id."""
    try:
        return HF_HUB_IDS[size_key(name)]
    except ValueError:
        return name


def _resolve_folder(name_or_path, cache_dir):
    """A local folder as is; one of OpenAI's size names or a Hub id -> a downloaded snapshot."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    sizes = list(OPENAI_SIZES)
    choices = (f"a folder written by save_pretrained, a Hub id like 'openai-community/gpt2', "
               f"or one of {list(HF_HUB_IDS)} (or just the size: {sizes})")
    if path.exists():
        raise NotADirectoryError(f"{name!r} is a file, not a folder; pass {choices}. "
                                 f"(A .pth checkpoint loads with model.load_checkpoint.)")
    no_folder = f"there is no folder {str(path.absolute())!r}"
    # A Hub id is "owner/name" (or a bare legacy name like "gpt2"); a name that can only
    # be a path is reported as a missing folder instead of being looked up online.
    if (isinstance(name_or_path, os.PathLike) or path.is_absolute() or name.startswith(".")
            or name.count("/") > 1 or "\\" in name):
        raise FileNotFoundError(f"{no_folder}; pass {choices}")
    repo_id = _hub_id(name)
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("downloading from the Hugging Face Hub needs huggingface_hub: "
                          "pip install huggingface_hub") from None
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS))
    except OSError as e:      # every huggingface_hub error (offline, 404, 401) is an OSError
        # "model_weights/hf_export" could be a folder that is not there or a Hub id: say both
        also = f", and {no_folder}" if "/" in name else ""
        raise OSError(f"could not download {repo_id!r} from the Hugging Face Hub "
                      f"({type(e).__name__}: {e}){also}. Check the name and your internet "
                      f"connection; pass {choices}") from e
    except ValueError as e:   # huggingface_hub's HFValidationError: not a valid Hub id
        raise ValueError(f"{name!r} is not a folder, a valid Hub id or one of OpenAI's "
                         f"size names ({e}); pass {choices}") from None


def load_gpt2_hf(name_or_path, cache_dir="model_weights", device=None, mmap=True, dtype=None):
    """A GPTModel holding Hugging Face GPT-2 weights, in eval mode on ``device``.

    ``name_or_path``: a key of MODEL_CONFIGS (mapped through HF_HUB_IDS) or its size alone
    (``"124M"``, as download_weights.py takes it), a Hub id such as
    ``"openai-community/gpt2"``, or a local folder written by ``save_pretrained``. Nothing
    is downloaded for a local folder. The weights must hold exactly config.json's n_layer
    blocks (a ValueError names both numbers otherwise).

    The config comes from config.json, the weights straight from the safetensors file(s),
    one tensor at a time, into a model built without memory of its own (``_assemble``): the
    weights exist once in memory, not twice.

    ``mmap=True`` (the default, as transformers does) keeps the parameters as views of
    the memory-mapped file: loading takes a fraction of a second, pages are read when
    first used, and the mapping is private (copy-on-write), so training never touches
    the file. The file must not be rewritten in place while the model is alive (our
    downloads and export write a new file and rename it; ``save_pretrained`` into the
    same folder does rewrite). ``mmap=False`` copies every tensor into memory once.

    ``dtype`` ("bf16", torch.bfloat16, ...) converts the weights at the end, as
    ``model.load_checkpoint`` does; None keeps float32.
    """
    folder = _resolve_folder(name_or_path, cache_dir)
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; is it a "
                                f"save_pretrained folder?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); delete {str(folder)!r} and "
                         f"download or save the model again") from None
    cfg = config_from_hf(hf_config, source=str(config_path))

    files = _weight_files(folder)
    check_block_count(files, cfg["n_layers"], HF_BLOCK, repr(str(folder)), str(config_path),
                      "correct n_layer there, or save or download the model again")
    for path in dict.fromkeys(files.values()):
        _verify(path)
    prefix = "transformer." if any(k.startswith("transformer.") for k in files) else ""
    mapped = set()        # storages that are views of the files, not memory of our own
    with contextlib.ExitStack() as open_files:
        handles = {}      # path -> open safe_open, for mmap=True (see _read_tensor)

        def read(key):
            if key not in files:
                raise KeyError(key)
            path = files[key]
            if mmap and path not in handles:
                handles[path] = open_files.enter_context(_open(path))
            tensor = _read_tensor(path, key, handles.get(path))
            if not mmap:      # what must be copied below
                mapped.add(tensor.untyped_storage().data_ptr())
            return tensor

        head = None
        if not cfg["tie_embeddings"]:
            name = _head_name(cfg)
            if name not in files:
                why = ("is a GPT2ForSequenceClassification" if "labels" in cfg
                       else "says tie_word_embeddings=false")
                raise ValueError(f"{config_path} {why} but the weights have no {name}; the "
                                 f"output head is missing")
            head = read(name)

        def own(tensor):
            # safetensors hands out views of the mapped file. With mmap=False copy each
            # exactly once, with no temporaries: that keeps malloc from fragmenting (a
            # clone-then-transpose measured ~30% above one copy at 774M).
            if not mmap and tensor.untyped_storage().data_ptr() in mapped:
                return tensor.clone()
            return tensor

        return _assemble(cfg, lambda row: read(prefix + row.hf), str(folder), head, device,
                         dtype, own)


def _assemble(cfg, fetch, source, head=None, device=None, dtype=None, own=lambda t: t):
    """A GPTModel of ``cfg`` from a source's tensors: ``fetch`` and ``head`` as
    gpt2_params.iter_gpt2_weights takes them; ``own(tensor)`` makes a fetched tensor the
    model's own memory where it must be (it may return the tensor itself).

    The model is built on the "meta" device (shapes, no memory) and the loaded tensors
    become its parameters (``assign=True``), so the weights exist once in memory rather
    than twice (random init + loaded copy), and the slow random init of a large model is
    skipped. ``dtype`` as load_gpt2_hf takes it.
    """
    int8 = dtype == "int8"      # every matrix in 8 bits after loading (engine/int8.py)
    dtype = resolve_dtype(None if int8 else dtype)
    with torch.device("meta"):
        gpt = GPTModel(cfg)
    converted = iter_gpt2_weights(gpt, fetch, source, head=head)
    # the table's rows, plus the head when it is a tensor of its own
    rows = len(gpt2_param_names(cfg["n_layers"])) + (not cfg["tie_embeddings"])
    state = {name: own(tensor) for name, tensor in
             tqdm(converted, total=rows, desc="loading weights", unit="tensor")}
    if cfg["tie_embeddings"]:
        state["out_head.weight"] = state["tok_emb.weight"]
    gpt.load_state_dict(state, strict=True, assign=True)
    if cfg["tie_embeddings"]:
        # assign=True wraps each tensor in its own Parameter; re-tie so there is one
        # Parameter again (an optimizer must not see and update the matrix twice).
        gpt.tie_weights()
    still_meta = [n for n, t in gpt.state_dict().items() if t.is_meta]
    assert not still_meta, f"internal error: {still_meta} were not loaded"
    gpt = gpt.to(device=device or "cpu", dtype=dtype).eval()
    return quantize_(gpt) if int8 else gpt


# ---------------------------------------------------------------------------------------
# GPTModel -> a folder transformers loads

def _head_name(cfg):
    """The HF name of the output head: a classifier's ``score``, a language model's
    ``lm_head``."""
    return "score.weight" if "labels" in cfg else HF_HEAD


def _hf_config(cfg, tied, dtype, eos=GPT2_EOS_ID):
    p = cfg["drop_rate"]
    labels = cfg.get("labels")
    # a classifier: transformers' GPT2ForSequenceClassification reads the row of each text's
    # last token that is not pad_token_id (ours pad with <|endoftext|>, and so mark it)
    classifier = labels and {
        "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
        "pad_token_id": eos, "problem_type": "single_label_classification"}
    return {
        "architectures": ["GPT2ForSequenceClassification" if labels else "GPT2LMHeadModel"],
        "model_type": "gpt2", **(classifier or {}),
        "vocab_size": cfg["vocab_size"], "n_positions": cfg["context_length"],
        "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"], "n_inner": None,
        "activation_function": "gelu_new",          # GELU, tanh approximation, like ours
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02,
        "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos,
        "tie_word_embeddings": tied, "dtype": str(dtype).removeprefix("torch."),
    }


def _export_tensors(model, names="hf"):
    """Our state -> an export's tensors, by their names in it (CPU): ``names="hf"`` gives
    transformers' GPT2LMHeadModel (Conv1D weights (in, out), as ours; contiguous), "gguf"
    llama.cpp's gpt2 (the four block matrices transposed to (out, in): views, copied one at
    a time as the file is written)."""
    cfg = model.cfg
    ours = model.state_dict()
    gguf = names == "gguf"
    tensors = {}
    for row in gpt2_param_names(cfg["n_layers"]):
        if row.ours in ours:
            tensor = ours[row.ours].detach().cpu()
        else:
            # qkv_bias=False: GPT-2's formats always have a c_attn bias; zeros compute the same.
            tensor = torch.zeros(3 * cfg["emb_dim"], dtype=ours["tok_emb.weight"].dtype)
        if gguf:
            tensors[row.gguf] = tensor.T if row.is_conv1d else tensor
        else:
            tensors[f"transformer.{row.hf}"] = tensor.contiguous()
    if not cfg["tie_embeddings"]:
        head = ours["out_head.weight"].detach().cpu()
        tensors[GGUF_HEAD if gguf else _head_name(cfg)] = head if gguf else head.contiguous()
    # A tied head is not written: GPT2LMHeadModel ties lm_head to wte from the config (and
    # safetensors refuses to store one tensor under two names anyway); llama.cpp multiplies
    # by token_embd when a file has no output tensor.
    return tensors


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# What an export writes, in this order: the weights come last (see export_to_hf).
EXPORT_FILES = ("config.json", "generation_config.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", "model.safetensors")
# Weights an earlier export or save_pretrained (single or sharded) left in the folder.
_OLD_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")


def export_to_hf(model, out_dir, tokenizer=None):
    """Write ``model`` as a Hugging Face GPT-2 folder; returns its Path.

    The folder has config.json, model.safetensors, generation_config.json and GPT-2's
    tokenizer files (vocab.json, merges.txt, tokenizer_config.json), so
    ``GPT2LMHeadModel.from_pretrained(out_dir)`` and
    ``pipeline("text-generation", model=out_dir)`` need no other argument (a classifier:
    ``GPT2ForSequenceClassification`` and ``pipeline("text-classification")``), and give the
    same logits as ``model`` for a float32 model (a bf16 or fp16 model is written in its
    own dtype, and transformers' arithmetic in it differs slightly from ours).

    A tied head is stored once (tie_word_embeddings=true); an untied one as its own
    lm_head.weight. qkv_bias=False becomes zero c_attn biases. The one thing the format
    cannot hold is a vocabulary other than GPT-2's 50257 tokens: the tokenizer written
    beside the weights would then produce or expect ids the model does not have, so that
    is a ValueError.

    ``out_dir`` may already exist, e.g. a ``git clone`` of your Hub model repository: the
    export replaces only the files named in EXPORT_FILES and removes only earlier
    safetensors weights (model.safetensors, or the shards model-*-of-*.safetensors and
    their model.safetensors.index.json); everything else (.git, README.md, ...) stays. A
    folder that holds some of those file names but no model is refused rather than
    overwritten. The old weights are removed first, each file is written to a temporary
    name and renamed into place, and model.safetensors comes last: a crash at any moment
    leaves a folder without weights, which neither our loader nor transformers accepts,
    until the export is run again; never old weights beside a new config.
    """
    model = _exportable(model, tokenizer, "export_to_hf")
    cfg = model.cfg
    out_dir = Path(out_dir).resolve()          # "." has no name; its absolute path does
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{str(out_dir)!r} is a file; choose another --out")
        clashes = sorted({path.name for pattern in EXPORT_FILES + _OLD_WEIGHTS
                          for path in out_dir.glob(pattern)})
        holds_model = any((out_dir / name).is_file() for name in
                          ("config.json", "model.safetensors", "model.safetensors.index.json"))
        if clashes and not holds_model:
            raise FileExistsError(
                f"{str(out_dir)!r} is not a model folder but has {clashes}, which the export "
                f"would overwrite or remove; choose another --out or move them away")
    tensors = _export_tensors(model)
    dtype = tensors["transformer.wte.weight"].dtype

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for pattern in [f".{name}.*.tmp" for name in EXPORT_FILES] + list(_OLD_WEIGHTS):
            for old in out_dir.glob(pattern):      # incl. temporary files of a killed export
                old.unlink()
    except OSError as e:
        if not (isinstance(e, PermissionError) or e.errno == errno.EROFS):   # read-only
            raise
        raise PermissionError(f"cannot export into {out_dir}: it is not writable "
                              f"({e.strerror}); choose another --out") from None
    eos = tokenizer.eot_token if tokenizer is not None else GPT2_EOS_ID
    _write_json(out_dir / "config.json", _hf_config(cfg, cfg["tie_embeddings"], dtype, eos))
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": eos, "eos_token_id": eos,
        # GPT-2 has no padding token; padding finished rows with EOS is the convention
        # (and stops transformers warning that it picked that for you).
        # No max_length: pipeline(..., max_new_tokens=N) would warn that both are set.
        "pad_token_id": eos})
    _write_tokenizer(out_dir, tokenizer, cfg["context_length"], pad="labels" in cfg)
    # metadata format=pt: transformers refuses safetensors files without it
    metadata = {"format": "pt", CHECKSUM_KEY: tensors_sha256(tensors)}
    atomic_write(out_dir / "model.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata=metadata), by_path=True)
    return out_dir


def _exportable(model, tokenizer, what):
    """``model`` with its LoRA adapters merged, checked for an export that carries
    ``tokenizer`` (None: GPT-2's): the one check both formats need."""
    model = merge(unwrap_model(model))         # LoRA adapters: merged into their weights
    if not isinstance(model, GPTModel):
        raise TypeError(f"{what} needs a GPTModel, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError(f"{what}: the model's matrices are int8 (dtype='int8'); export it "
                         f"from its float weights (load the source without --dtype int8)")
    cfg = model.cfg
    n_tokens = tokenizer.n_vocab if tokenizer is not None else GPT2_VOCAB_SIZE
    if cfg["vocab_size"] != n_tokens:
        raise ValueError(
            f"the model has vocab_size={cfg['vocab_size']}, but the export carries "
            f"{'its' if tokenizer else 'the GPT-2'} tokenizer with {n_tokens} tokens; export it "
            f"with the tokenizer it was trained with (tokenizer=, which a checkpoint of "
            f"train.py --tokenizer carries)")
    if cfg["tie_embeddings"] and model.out_head.weight is not model.tok_emb.weight:
        raise ValueError("the model's config says tie_embeddings=True but out_head and tok_emb "
                         "are different Parameters; re-tie them (model.out_head.weight = "
                         "model.tok_emb.weight) or set tie_embeddings=False")
    return model


# ---------------------------------------------------------------------------------------
# GPTModel <-> one GGUF file, for llama.cpp

GGUF_TYPES = tuple(gguf_file.TYPES)


def check_new_file(path):
    """Raise OSError, before any work, when ``path`` exists or cannot be written."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; delete it or choose another --out (an export "
                              f"never overwrites a file)")
    check_writable(path)


def export_to_gguf(model, path, tokenizer=None, gguf_type="f32", general=None):
    """Write ``model`` as one GGUF file that llama.cpp runs (its "gpt2" architecture, as
    engine/gguf_file.py lays out); returns its Path.

    ``tokenizer``: a tokenizer.BPETokenizer of the model's own (train.py --tokenizer), or
    None for GPT-2's. ``gguf_type``: how the matrices are stored, one of GGUF_TYPES (f32
    keeps every number; q8_0 is about a quarter of the size, with llama.cpp's rounding);
    norms, biases and the position embedding stay f32 in any case. ``general``: {key: str}
    for the file's general.* metadata (name, license, source.url).

    The file holds the tensors llama.cpp reads, the hyperparameters, and the tokenizer as
    tokens and merges; one of our own also as its file, so that load_gguf and
    dataset.get_tokenizer bring it back exactly. What GGUF cannot hold is a ValueError
    naming the field: a vocabulary other than the model's, a tokenizer whose
    pre-tokenization regex is not GPT-2's (GGUF names the regex, "gpt-2", rather than
    storing it), and a classifier's labels. ``path`` must be a new file; it is written
    atomically.
    """
    path = Path(path)
    check_new_file(path)
    model = _exportable(model, tokenizer, "export_to_gguf")
    if "labels" in model.cfg:
        raise ValueError(f"the model is a classifier (its config's labels: "
                         f"{model.cfg['labels']}); llama.cpp's gpt2 holds a language model's "
                         f"head over the vocabulary, not class scores: export it to Hugging "
                         f"Face instead (--out DIR, a GPT2ForSequenceClassification)")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type must be one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    cfg = model.cfg
    if tokenizer is None:
        vocab = gguf_file.gpt2_vocab()
    else:
        if tokenizer.pattern != GPT2_PATTERN:
            raise ValueError(f"the tokenizer's pattern (its pre-tokenization regex) is "
                             f"{tokenizer.pattern!r}; GGUF can name only GPT-2's ('gpt-2'), so "
                             f"llama.cpp would split text differently: train the tokenizer "
                             f"with tokenizer.GPT2_PATTERN")
        ids, merges = tokenizer.to_hf_files()
        vocab = gguf_file.Vocab(sorted(ids, key=ids.get), merges,
                                sorted(tokenizer.special_tokens.values()),
                                tokenizer.eot_token, tokenizer.dumps())
    hparams = {"context_length": cfg["context_length"], "embedding_length": cfg["emb_dim"],
               "feed_forward_length": 4 * cfg["emb_dim"], "block_count": cfg["n_layers"],
               "attention.head_count": cfg["n_heads"],
               "attention.layer_norm_epsilon": LAYER_NORM_EPS}
    general = {"name": path.stem, **(general or {})}
    stored = gguf_file.write_gguf(path, _export_tensors(model, "gguf"), hparams, vocab,
                                  gguf_type, general)
    wanted = gguf_file.TYPES[gguf_type][0].name
    fell_back = [n for n, kind in stored.items() if kind == "F16" and wanted != "F16"]
    if fell_back:
        warnings.warn(f"{path.name}: {len(fell_back)} matrices have rows of a length that "
                      f"{gguf_type} cannot cut into blocks of 32, so they are stored as f16, as "
                      f"llama.cpp's converter does: {fell_back}", stacklevel=2)
    return path


def config_from_gguf(hparams, source):
    """A GGUF file's gpt2.* hyperparameters (gguf_file.read_gguf) -> our cfg (the head's
    tying is the caller's to settle). Settings our GPTModel does not compute are refused."""
    emb = hparams["embedding_length"]
    unsupported = {
        # (the key, its value, what GPTModel computes)
        "feed_forward_length": (hparams["feed_forward_length"], 4 * emb),
        "attention.head_count_kv": (hparams["attention.head_count_kv"] or
                                    hparams["attention.head_count"],
                                    hparams["attention.head_count"]),
    }
    for key, (value, ours) in unsupported.items():
        if value != ours:
            raise ValueError(f"{source} sets gpt2.{key}={value}; GPTModel computes only {ours}")
    eps = hparams["attention.layer_norm_epsilon"]
    if abs(eps - LAYER_NORM_EPS) > 1e-9:    # stored as float32: 1e-5 reads 9.99999975e-06
        raise ValueError(f"{source} sets gpt2.attention.layer_norm_epsilon={eps}; GPTModel "
                         f"uses {LAYER_NORM_EPS}")
    return {"vocab_size": None, "context_length": hparams["context_length"], "emb_dim": emb,
            "n_heads": hparams["attention.head_count"], "n_layers": hparams["block_count"],
            "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True}


def load_gguf(path, device=None, dtype=None):
    """A GPTModel, in eval mode on ``device``, from a GGUF file of llama.cpp's gpt2
    architecture: one export_to_gguf wrote, or llama.cpp's converter made from a GPT-2.

    Quantized matrices (q8_0, ...) are dequantized to float32: the model computes with the
    numbers the file holds. A file without an output tensor, or with one equal to its token
    embedding, gives a tied model. ``dtype`` as load_gpt2_hf takes it. A file of another
    architecture is a ValueError naming it.
    """
    contents = gguf_file.read_gguf(path)
    tensors = contents.tensors
    cfg = config_from_gguf(contents.hparams, path)
    check_block_count(tensors, cfg["n_layers"], GGUF_BLOCK, str(path), "its gpt2.block_count",
                      "export the file again")
    wte = tensors.get("token_embd.weight")
    cfg["vocab_size"] = len(contents.vocab.tokens) if wte is None else wte.shape[0]
    head = tensors.get(GGUF_HEAD)
    if head is not None and wte is not None and head.shape == wte.shape and \
            torch.equal(head, wte):
        head = None          # the converter of older llama.cpp wrote GPT-2's tied head twice
    cfg["tie_embeddings"] = head is None

    def fetch(row):
        # popped: the file's copy goes as ours is made (iter_gpt2_weights makes it contiguous)
        tensor = tensors.pop(row.gguf)          # KeyError names the missing tensor
        return tensor.T if row.is_conv1d else tensor

    return _assemble(validate_config(cfg), fetch, str(path), head, device, dtype)


def load_source(source, device=None, dtype=None, cfg=None, cache_dir="model_weights"):
    """A GPTModel in eval mode on ``device`` from any model source but OpenAI's
    TensorFlow checkpoint: a .pth of ours (model.load_checkpoint), a .gguf (load_gguf), a
    save_pretrained folder, a Hub id or one of OpenAI's sizes (load_gpt2_hf).
    model_sources.load_model, the loader the commands share, adds the TF checkpoint
    (download_weights.py, which this module does not import); --export takes the same
    sources through this. ``cfg`` is only for a .pth that holds a bare state dict.
    """
    path = Path(source)
    if path.is_file() and path.suffix != ".gguf":
        return load_checkpoint(path, device=device, cfg=cfg, dtype=dtype)
    if cfg is not None:
        raise ValueError(f"a config (--config) goes only with a .pth holding a bare state "
                         f"dict; {str(source)!r} brings its own")
    if path.suffix == ".gguf":
        return load_gguf(path, device=device, dtype=dtype)
    if path.suffix == ".pth":
        return load_checkpoint(path)            # not there: its error says what to do
    return load_gpt2_hf(path if path.is_dir() else str(source), cache_dir=cache_dir,
                        device=device, dtype=dtype)


def _gguf_general(source):
    """general.* for a GGUF exported from ``source``: OpenAI's weights by name (a size or
    their Hub id) get their Hub repository and licence (MIT, as their model card says);
    another Hub id its repository; a local file or folder nothing (its path is private)."""
    if Path(str(source)).exists():
        return {}
    repo = _hub_id(str(source))
    general = {"source.url": f"https://huggingface.co/{repo}"}
    if repo in HF_HUB_IDS.values():
        general["license"] = "mit"
    return general


# ---------------------------------------------------------------------------------------

def _write_tokenizer(out_dir, tokenizer, context_length, pad=False):
    """GPT2Tokenizer's files: GPT-2's own (OpenAI's encoder.json and vocab.bpe under HF's
    names), or those of a run's own vocabulary (tokenizer.BPETokenizer, same format) plus its
    file, from which dataset.get_tokenizer(out_dir) rebuilds it. ``pad`` (a classifier): its
    padding token too, <|endoftext|> as in training, so that pipeline() pads batches."""
    own = out_dir / TOKENIZER_FILE
    if tokenizer is None:
        encoder_json, vocab_bpe = gpt2_bpe_files()
        atomic_write(out_dir / "vocab.json", lambda tmp: shutil.copyfile(encoder_json, tmp),
                     by_path=True)
        atomic_write(out_dir / "merges.txt", lambda tmp: shutil.copyfile(vocab_bpe, tmp),
                     by_path=True)
        own.unlink(missing_ok=True)      # an earlier export's, of another model
    else:
        vocab, merges = tokenizer.to_hf_files()
        _write_json(out_dir / "vocab.json", vocab)
        # GPT2Tokenizer skips the first line of merges.txt: the version line of OpenAI's file
        text = "\n".join(["#version: 0.2", *merges, ""])
        atomic_write(out_dir / "merges.txt", lambda f: f.write(text.encode("utf-8")))
        atomic_write(own, lambda f: f.write(tokenizer.dumps().encode("utf-8")))
    special = "<|endoftext|>"
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length,
        "bos_token": special, "eos_token": special, "unk_token": special,
        **({"pad_token": special} if pad else {}), "add_prefix_space": False})


def _load_for_export(parser, source, cfg, cache_dir):
    """--export: any model source -> (GPTModel, its own tokenizer or None for GPT-2's), with
    command-line advice for a .pth that holds a bare state dict."""
    try:
        model = load_source(source, cfg=cfg, cache_dir=cache_dir)
    except ValueError:
        # load_checkpoint's advice for a state dict without config ("pass cfg=...") is for
        # Python; say what to do on the command line instead.
        if cfg is None and Path(source).is_file() and _is_bare_state_dict(source):
            parser.error(
                f"{source} holds only weights, no config, so the model's shape is unknown; add "
                f"--config NAME with one of {list(MODEL_CONFIGS)} (or its size, e.g. 124M) "
                f"for OpenAI's shapes, or --config FILE.json with the config the model was "
                f"trained with (the dict GPTModel was built from, e.g. GPT_CONFIG_124M "
                f"with your changes)")
        raise
    own = saved_tokenizer(source)       # a run with its own vocabulary carries it
    return model, own and BPETokenizer.loads(own, f"the tokenizer in {source}")


def _is_bare_state_dict(path):
    """True for a .pth that holds a state dict alone, not save_checkpoint's dict."""
    try:
        ckpt = read_checkpoint(path)
    except (ValueError, OSError):
        return False           # unreadable: load_checkpoint's own error says so
    return isinstance(ckpt, Mapping) and "model_state_dict" not in ckpt


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert GPT-2 weights: Hugging Face format "
                                                 "or GGUF (llama.cpp) <-> our .pth checkpoints.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--export", metavar="SOURCE",
                      help=f"the model to export: {SOURCES_HELP}")
    what.add_argument("--load", metavar="NAME_OR_PATH",
                      help=f"HF folder, Hub id or one of {list(HF_HUB_IDS)} (or the size "
                           f"alone, e.g. 124M)")
    parser.add_argument("--out", metavar="DIR_OR_GGUF",
                        help="with --export: a folder for Hugging Face (an existing one keeps "
                             "the files the export does not write, e.g. .git and README.md), "
                             "or a new file ending in .gguf for llama.cpp")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES,
                        help="with --out FILE.gguf: how its matrices are stored (default f32, "
                             "every number kept; q8_0: a quarter of the size)")
    parser.add_argument("--config", metavar="NAME_OR_JSON",
                        help="with --export of a .pth that holds only a state dict: one of "
                             f"{list(MODEL_CONFIGS)}, or a JSON file with the model's config")
    parser.add_argument("--save", metavar="PTH", help="checkpoint to write (with --load)")
    parser.add_argument("--cache-dir", default="model_weights",
                        help="where Hub downloads are kept")
    args = parser.parse_args(argv)
    if args.export:
        if not args.out:
            parser.error("--export needs --out DIR (Hugging Face) or --out FILE.gguf (llama.cpp)")
        to_gguf = args.out.lower().endswith(".gguf")
        if args.gguf_type and not to_gguf:
            parser.error(f"--gguf-type goes with an --out ending in .gguf, not {args.out!r}")
        # before any work (a long load or download): a place that can be written, none of
        # whose files is an input
        inputs = [("--export", args.export), ("--config", args.config)]
        if to_gguf:
            check_output(args.out, inputs, "--out")
            check_new_file(args.out)
        else:
            check_output(args.out, inputs, "--out", folder=True,
                         also=[Path(args.out) / name for name in (*EXPORT_FILES, TOKENIZER_FILE)])
        model, tokenizer = _load_for_export(parser, args.export, args.config, args.cache_dir)
        if to_gguf:
            path = export_to_gguf(model, args.out, tokenizer, args.gguf_type or "f32",
                                  _gguf_general(args.export))
            print(f"wrote {path}; run it with llama.cpp: llama-completion -m {path} -no-cnv "
                  f"-p \"Hello\" -n 40 --temp 0")
        else:
            path = export_to_hf(model, args.out, tokenizer)
            kind = ("GPT2ForSequenceClassification" if "labels" in model.cfg
                    else "GPT2LMHeadModel")
            print(f"wrote {path}; load it with transformers.{kind}.from_pretrained"
                  f"({str(path)!r})")
    else:
        if not args.save:
            parser.error("--load needs --save PTH")
        if args.config is not None:
            parser.error("--config goes with --export; --load reads the config from config.json")
        if args.gguf_type is not None:
            parser.error("--gguf-type goes with --export and an --out ending in .gguf")
        check_output(args.save, [("--load", args.load)], "--save")     # before the download
        path = save_checkpoint(args.save, load_gpt2_hf(args.load, cache_dir=args.cache_dir))
        print(f"saved {path}; load it with model.load_checkpoint({str(path)!r})")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")     # the message says what to do; no traceback
