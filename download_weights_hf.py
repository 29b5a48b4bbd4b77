"""Hugging Face GPT-2 weights <-> GPTModel.

    Hub id / save_pretrained folder --load_gpt2_hf--> GPTModel        (no TensorFlow needed)
    transformers GPT2Model / GPT2LMHeadModel / state dict --load_weights_into_gpt--> GPTModel
    GPTModel --export_to_hf--> folder that transformers.GPT2LMHeadModel and pipeline() load

A classifier (classify.py: config["labels"], its head scoring the classes) is HF's
GPT2ForSequenceClassification both ways: its head is ``score.weight``, its class names
``id2label``, and ``pad_token_id`` marks the padding its last-token rule skips.

    python download_weights_hf.py --load "gpt2-small (124M)" --save model_weights/gpt2.pth
    python download_weights_hf.py --export model_weights/trained_gpt2.pth --out my-gpt2-hf
    python download_weights_hf.py --export bare_state_dict.pth --config cfg.json --out my-gpt2-hf

Both directions loop over ``gpt2_params.gpt2_param_names``, the one table of GPT-2 names; HF
stores the four linear layers per block as "Conv1D" with (in, out) weights, the layout of
our ``model.Linear`` too (its docstring says why), so tensors copy across unchanged.
``load_gpt2_hf`` reads the safetensors file directly instead of building a transformers
model first, so loading costs about one copy of the weights in memory.
"""

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from engine.bpe_files import gpt2_bpe_files
from engine.checkpoints import TOKENIZER_FILE, read_checkpoint, saved_tokenizer, tensors_sha256
from engine.fileio import atomic_write, check_output
from engine.gpt2_params import HF_BLOCK, check_block_count, gpt2_param_names, iter_gpt2_weights
from engine.int8 import quantize_
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
)
from tokenizer import BPETokenizer

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
        return state[row[1]]                # KeyError names the missing HF key

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
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"{source} sets layer_norm_epsilon={eps}; GPTModel uses 1e-5")
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
    one tensor at a time. The model is built on the "meta" device (shapes, no memory) and
    the loaded tensors become its parameters (``assign=True``), so the weights exist once
    in memory rather than twice (random init + loaded copy), and the slow random init of
    a large model is skipped.

    ``mmap=True`` (the default, as transformers does) keeps the parameters as views of
    the memory-mapped file: loading takes a fraction of a second, pages are read when
    first used, and the mapping is private (copy-on-write), so training never touches
    the file. The file must not be rewritten in place while the model is alive (our
    downloads and export write a new file and rename it; ``save_pretrained`` into the
    same folder does rewrite). ``mmap=False`` copies every tensor into memory once.

    ``dtype`` ("bf16", torch.bfloat16, ...) converts the weights at the end, as
    ``model.load_checkpoint`` does; None keeps float32.
    """
    int8 = dtype == "int8"      # every matrix in 8 bits after loading (engine/int8.py)
    dtype = resolve_dtype(None if int8 else dtype)
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

        with torch.device("meta"):
            gpt = GPTModel(cfg)
        state = {}
        converted = iter_gpt2_weights(gpt, lambda row: read(prefix + row[1]), str(folder),
                                      head=head)
        # the table's rows, plus the head when it is a tensor of its own
        rows = len(gpt2_param_names(cfg["n_layers"])) + (not cfg["tie_embeddings"])
        for name, tensor in tqdm(converted, total=rows, desc="loading weights", unit="tensor"):
            # safetensors hands out views of the mapped file. With mmap=False copy each
            # exactly once, with no temporaries: that keeps malloc from fragmenting (a
            # clone-then-transpose measured ~30% above one copy at 774M).
            if not mmap and tensor.untyped_storage().data_ptr() in mapped:
                tensor = tensor.clone()
            state[name] = tensor
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
    return "score.weight" if "labels" in cfg else "lm_head.weight"


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
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos,
        "tie_word_embeddings": tied, "dtype": str(dtype).removeprefix("torch."),
    }


def _export_tensors(model):
    """Our state -> HF GPT2LMHeadModel names and Conv1D layouts (CPU, contiguous)."""
    cfg = model.cfg
    ours = model.state_dict()
    tensors = {}
    for name, hf, _, _ in gpt2_param_names(cfg["n_layers"]):
        if name in ours:
            tensor = ours[name].detach()
        else:
            # qkv_bias=False: GPT-2's format always has a c_attn bias; zeros compute the same.
            tensor = torch.zeros(3 * cfg["emb_dim"], dtype=ours["tok_emb.weight"].dtype)
        tensors[f"transformer.{hf}"] = tensor.cpu().contiguous()
    if not cfg["tie_embeddings"]:
        tensors[_head_name(cfg)] = ours["out_head.weight"].detach().cpu().contiguous()
    # A tied head is not written: GPT2LMHeadModel ties lm_head to wte from the config, and
    # safetensors refuses to store one tensor under two names anyway.
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
    model = merge(unwrap_model(model))         # LoRA adapters: merged into their weights
    if not isinstance(model, GPTModel):
        raise TypeError(f"export_to_hf needs a GPTModel, got {type(model).__name__}")
    cfg = model.cfg
    n_tokens = tokenizer.n_vocab if tokenizer is not None else GPT2_VOCAB_SIZE
    if cfg["vocab_size"] != n_tokens:
        raise ValueError(
            f"the model has vocab_size={cfg['vocab_size']}, but the exported folder carries "
            f"{'its' if tokenizer else 'the GPT-2'} tokenizer with {n_tokens} tokens; export it "
            f"with the tokenizer it was trained with (tokenizer=, which a checkpoint of "
            f"train.py --tokenizer carries)")
    if cfg["tie_embeddings"] and model.out_head.weight is not model.tok_emb.weight:
        raise ValueError("the model's config says tie_embeddings=True but out_head and tok_emb "
                         "are different Parameters; re-tie them (model.out_head.weight = "
                         "model.tok_emb.weight) or set tie_embeddings=False")
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


def _export_checkpoint(parser, path, cfg, out):
    """--export: our .pth -> an HF folder, with command-line advice for a bare state dict."""
    try:
        model = load_checkpoint(path, cfg=cfg)
    except ValueError:
        # load_checkpoint's advice for a state dict without config ("pass cfg=...") is for
        # Python; say what to do on the command line instead.
        if cfg is None and _is_bare_state_dict(path):
            parser.error(
                f"{path} holds only weights, no config, so the model's shape is unknown; add "
                f"--config NAME with one of {list(MODEL_CONFIGS)} (or its size, e.g. 124M) "
                f"for OpenAI's shapes, or --config FILE.json with the config the model was "
                f"trained with (the dict GPTModel was built from, e.g. GPT_CONFIG_124M "
                f"with your changes)")
        raise
    own = saved_tokenizer(path)         # a run with its own vocabulary carries it
    return export_to_hf(model, out, own and BPETokenizer.loads(own, f"the tokenizer in {path}"))


def _is_bare_state_dict(path):
    """True for a .pth that holds a state dict alone, not save_checkpoint's dict."""
    try:
        ckpt = read_checkpoint(path)
    except (ValueError, OSError):
        return False           # unreadable: load_checkpoint's own error says so
    return isinstance(ckpt, Mapping) and "model_state_dict" not in ckpt


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert GPT-2 weights between Hugging Face "
                                                 "format and our .pth checkpoints.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--export", metavar="PTH", help="our checkpoint to write as an HF folder")
    what.add_argument("--load", metavar="NAME_OR_PATH",
                      help=f"HF folder, Hub id or one of {list(HF_HUB_IDS)} (or the size "
                           f"alone, e.g. 124M)")
    parser.add_argument("--out", metavar="DIR",
                        help="folder to write (with --export); an existing one keeps the "
                             "files the export does not write, e.g. .git and README.md")
    parser.add_argument("--config", metavar="NAME_OR_JSON",
                        help="with --export of a .pth that holds only a state dict: one of "
                             f"{list(MODEL_CONFIGS)}, or a JSON file with the model's config")
    parser.add_argument("--save", metavar="PTH", help="checkpoint to write (with --load)")
    parser.add_argument("--cache-dir", default="model_weights",
                        help="where Hub downloads are kept (with --load)")
    args = parser.parse_args(argv)
    if args.export:
        if not args.out:
            parser.error("--export needs --out DIR")
        # before any work: a folder that can be written, none of whose files is an input
        check_output(args.out, [("--export", args.export), ("--config", args.config)], "--out",
                     folder=True, also=[Path(args.out) / name for name in
                                        (*EXPORT_FILES, TOKENIZER_FILE)])
        path = _export_checkpoint(parser, args.export, args.config, args.out)
        kind = ("GPT2ForSequenceClassification" if "labels" in read_checkpoint(
            args.export, verify=False, mmap=True).get("config", {}) else "GPT2LMHeadModel")
        print(f"wrote {path}; load it with transformers.{kind}.from_pretrained({str(path)!r})")
    else:
        if not args.save:
            parser.error("--load needs --save PTH")
        if args.config is not None:
            parser.error("--config goes with --export; --load reads the config from config.json")
        check_output(args.save, [("--load", args.load)], "--save")     # before the download
        path = save_checkpoint(args.save, load_gpt2_hf(args.load, cache_dir=args.cache_dir))
        print(f"saved {path}; load it with model.load_checkpoint({str(path)!r})")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")     # the message says what to do; no traceback
