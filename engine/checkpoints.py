"""Checkpoint files: one .pth = {"config": cfg, "model_state_dict": ..., **extra}.

    write_checkpoint(path, config, state, **extra)   atomically (fileio.atomic_save)
    read_checkpoint(path)                            the zip's checksums verified, then
                                                     torch.load(weights_only=True), with errors
                                                     that say what went wrong and what to do
    state_and_config(ckpt, path, cfg, normalize)     the weights and their config, or why not
    tensors_sha256(tensors)                          a fingerprint of named tensors (exports,
                                                     LoRA's frozen base)

model.save_checkpoint / model.load_checkpoint build on these; the training loop's run state
(optimizer, RNG, position) is ``extra`` (engine/runs.py).

Why the checksums: torch.save writes a zip archive whose every member carries a CRC-32 of its
bytes, but torch.load never looks at them, so a file with some weights overwritten by other
finite numbers (a bad disk, a copy cut and patched, a sync tool) loads without a word and
computes something else. ``zipfile.testzip`` checks every CRC: 0.3-0.4 s for a 475 MB
checkpoint (GPT-2 124M's weights; torch.load itself: 0.3-0.5 s) and 0.7-1.1 s for a 1.86 GB
one of a --preset 124M run with its AdamW state (torch.load: 1.9-2.8 s), on 2 shared EPYC
cores; every read pays it. A sha256 recorded at save time would cost as much (0.46 s per
475 MB) and need a second file beside the checkpoint (a checkpoint cannot hold its own
hash), to be kept in step with it; the CRCs are already in the file.
"""

import hashlib
import json
import math
import pickle
import zipfile
from pathlib import Path

import torch

from engine.fileio import atomic_save


class DamagedFileError(ValueError):
    """A file whose bytes no longer match the checksums recorded when it was written.

    ``why`` is the middle of the message ("is damaged: ..."), for callers that give other
    advice (engine/runs.py names the last checkpoint of a run that still verifies).
    """

    def __init__(self, path, why, advice):
        super().__init__(f"{str(path)!r} {why}; {advice}")
        self.path, self.why = Path(path), why


def write_checkpoint(path, config, state, previous=None, **extra):
    """Write a model's ``state`` dict and its ``config`` (plus ``extra``) to ``path`` atomically.

    ``previous``: where the file being replaced is kept (fileio.atomic_write), or None.
    """
    return atomic_save({"config": dict(config), "model_state_dict": state, **extra}, path,
                       previous=previous)


def verify_zip(path):
    """Raise DamagedFileError unless every member of the zip at ``path`` matches its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise DamagedFileError(path, f"is truncated or is not a PyTorch checkpoint ({e})",
                               "delete it and save or download it again") from None
    if bad is not None:
        raise DamagedFileError(
            path, f"is damaged: its part {bad!r} no longer matches the checksum (CRC-32) "
                  f"written with it, so bytes changed on disk after it was saved (a bad disk, a "
                  f"cut or patched copy, a sync tool)",
            "use another copy or an earlier checkpoint, or save or train it again")


def read_checkpoint(path, map_location="cpu", verify=True, mmap=False):
    """torch.load with weights_only=True and errors that say what went wrong.

    ``verify``: check the zip's CRCs first (see the module docstring); ``mmap``: map the
    tensors from the file instead of reading them (to look at a checkpoint's small entries
    cheaply; nothing is verified then).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a folder, not a .pth checkpoint; for a Hugging Face model "
            f"folder use download_weights_hf.load_gpt2_hf(folder), or convert it with "
            f"`python download_weights_hf.py --load FOLDER --save model.pth`")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found; train one with `python train.py` or "
            f"download one with download_weights.py")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:       # a save or copy cut before its first byte: damaged, not foreign
        raise DamagedFileError(path, "is empty (0 bytes): a save or a copy of it was cut "
                                     "short", "delete it and save or download it again")
    # torch.save writes a zip archive ("PK\x03\x04"); before PyTorch 1.6, a pickle stream
    # (protocol 2: "\x80\x02"). Anything else is some other file: say so plainly.
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint (it starts with bytes "
                         f"{magic!r}, not a torch.save archive); pass the .pth file that "
                         f"train.py, save_checkpoint or download_weights.py wrote")
    if verify and magic == b"PK\x03\x04":       # the old pickle format has no checksums
        verify_zip(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message goes on to suggest weights_only=False: exactly what not to do
        # with a file one does not trust. Keep only what it found.
        detail = " ".join(part.strip() for part in str(e).split("\n\n")
                          if part.strip() and "weights_only" not in part)
        raise ValueError(
            f"{str(path)!r} holds Python objects other than tensors and plain data, so it "
            f"was not loaded (loading it could run arbitrary code). Only load .pth files "
            f"you trust; re-save them as plain state dicts. Found: {detail}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DamagedFileError(path, f"is truncated or is not a PyTorch checkpoint ({e})",
                               "delete it and save or download it again") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        raise ValueError(
            f"{str(path)!r} is a nanoGPT checkpoint (it has 'model' and 'model_args'), whose "
            f"layers are laid out differently; this project loads its own .pth files "
            f"(train.py, save_checkpoint, download_weights.py) and Hugging Face folders")
    return ckpt


def config_file(value, sizes):
    """``value`` as it is when a dict or None, else the config dict of the JSON file it names
    (model.config_from has looked it up among the ``sizes`` names first)."""
    if isinstance(value, dict) or value is None:
        return value
    try:
        cfg = json.loads(Path(value).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"config {str(value)!r} is neither one of {sizes} nor a readable "
                         f"JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {str(value)!r} holds no JSON object (a config dict)")
    return cfg


# GPTModel's first weight: a state dict without it is some other model's
_OUR_FIRST_KEY = "tok_emb.weight"


def state_and_config(ckpt, path, cfg, normalize):
    """(state dict, config) of a loaded .pth; ``cfg`` only for one that carries none.

    ``normalize(cfg)`` (model.validate_config) fills in a config's optional keys, so that a
    given config and the saved one are compared key by key. Weights that are not all finite
    are refused: such a model computes nothing useful, and a check further on (a tied head
    compared with its embedding, say) would blame something else.
    """
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    state = ckpt.get("model_state_dict") if isinstance(ckpt, dict) else None
    if state is None:
        state = ckpt            # a bare state dict (torch.save(model.state_dict()))
    _check_is_our_state(state, path)
    if saved is None and cfg is None:
        what = ("has weights but no config" if isinstance(ckpt, dict) and "model_state_dict"
                in ckpt else "is a bare state dict with no config")
        raise ValueError(
            f"{str(path)!r} {what}; pass cfg=... in Python or --config NAME_OR_JSON on the "
            f"command line (a size such as 124M for OpenAI's shapes, or a JSON file with the "
            f"dict GPTModel was built from)")
    if cfg is not None and saved is not None:
        # cfg= is for files without a config: one that contradicts the saved config would
        # build another model around these weights (other heads: other logits)
        want, have = normalize(cfg), normalize(saved)
        diffs = [f"{k}: saved {have[k]!r}, given {want[k]!r}" for k in have if want[k] != have[k]]
        if diffs:
            raise ValueError(f"{str(path)!r} carries its own config, and the one given "
                             f"differs ({'; '.join(diffs)}); leave the config out (it is only "
                             f"for bare state dicts)")
    if (bad := first_non_finite(state)) is not None:
        raise ValueError(
            f"{str(path)!r} holds NaN or infinite numbers in {bad}: the file is damaged or was "
            f"saved from a run that diverged; use an earlier checkpoint or another copy")
    return state, saved if saved is not None else cfg


def _check_is_our_state(state, path):
    """Raise ValueError unless ``state`` looks like a GPTModel's state dict."""
    if isinstance(state, torch.Tensor):
        raise ValueError(f"{str(path)!r} holds a single tensor of shape {tuple(state.shape)}, "
                         f"not a model's weights; pass a .pth written by train.py or "
                         f"save_checkpoint (or torch.save(model.state_dict()) of a GPTModel)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a model's "
                         f"weights; pass a .pth written by train.py or save_checkpoint")
    if _OUR_FIRST_KEY not in state:
        keys = list(state)
        shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise ValueError(
            f"{str(path)!r} holds the weights of another kind of model ({len(keys)} tensors: "
            f"{shown or 'none'}), not a GPTModel's ({_OUR_FIRST_KEY!r}, ...); for Hugging "
            f"Face GPT-2 weights pass their folder, for OpenAI's a size such as 124M")


def misfit(state, expected):
    """One line saying how the tensors of ``state`` differ from those ``expected`` (a state
    dict of the model they were meant for: names and shapes, e.g. on the meta device)."""
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{k} is {tuple(state[k].shape)} in the file and {tuple(expected[k].shape)}"
                     f" for the config" + (f" ({len(shapes) - 1} more tensors differ in shape)"
                                           if len(shapes) > 1 else ""))
    for names, what in ((missing, "missing from the file"), (unexpected, "not in the model")):
        if names:
            parts.append(f"{len(names)} tensors {what} (first: {names[0]!r})")
    return "; ".join(parts)


def _float_tensors(obj, prefix=""):
    """(name, tensor) of every floating tensor in nested dicts / lists (an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _float_tensors(value, f"{prefix}[{i}]")


def first_non_finite(obj):
    """The name of the first floating tensor in ``obj`` holding a NaN or inf, else None."""
    for name, tensor in _float_tensors(obj):
        # A NaN or inf anywhere makes the sum NaN or inf: a screen 3-20x faster than
        # isfinite, which writes a bool per number (measured on 124M's weights, 2 loaded
        # cores); only a sum that overflowed needs the element-wise look.
        if not math.isfinite(tensor.sum().item()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def tensors_sha256(tensors):
    """sha256 (hex) of named tensors: names in sorted order, each with its dtype, shape and
    raw bytes. Equal for the same numbers on any device; used to recognise an export
    (download_weights_hf) and a LoRA run's frozen base (engine/runs.py)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# A run trained with its own vocabulary (tokenizer.py) carries the tokenizer's file: in its
# checkpoint as the entry "tokenizer" ({"json": the file's text, "sha256": its fingerprint}),
# in a Hugging Face export as this file beside the weights.
TOKENIZER_FILE = "bpe_tokenizer.json"


def saved_tokenizer(source):
    """The text of the tokenizer file that ``source`` carries, or None (it uses GPT-2's):
    a tokenizer file itself (.json), a checkpoint (its "tokenizer" entry), an export folder
    (its bpe_tokenizer.json) or a GGUF file (engine/gguf_file.py). Hub ids and OpenAI's
    sizes are GPT-2's."""
    path = Path(str(source)) if source is not None else None
    if path is None or not path.exists():
        return None
    if path.is_dir():
        file = path / TOKENIZER_FILE
        return file.read_text(encoding="utf-8") if file.is_file() else None
    if path.suffix == ".json":
        return path.read_text(encoding="utf-8")
    if path.suffix == ".gguf":
        from engine.gguf_file import own_tokenizer  # gguf only where a .gguf is read
        return own_tokenizer(path)
    ckpt = read_checkpoint(path, verify=False, mmap=True)     # its small entries, cheaply
    entry = ckpt.get("tokenizer") if isinstance(ckpt, dict) else None
    return entry["json"] if isinstance(entry, dict) else None
