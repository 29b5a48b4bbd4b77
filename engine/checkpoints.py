"""Checkpoint files: one .pth = {"config": cfg, "model_state_dict": ..., **extra}.

    write_checkpoint(path, config, state, **extra)   atomically (fileio.atomic_save)
    read_checkpoint(path)                            torch.load(weights_only=True), with errors
                                                     that say what went wrong and what to do

model.save_checkpoint / model.load_checkpoint build on these; the training loop's run state
(optimizer, RNG, position) is ``extra`` (engine/runs.py).
"""

import pickle
from pathlib import Path

import torch

from engine.fileio import atomic_save


def write_checkpoint(path, config, state, **extra):
    """Write a model's ``state`` dict and its ``config`` (plus ``extra``) to ``path`` atomically."""
    return atomic_save({"config": dict(config), "model_state_dict": state, **extra}, path)


def read_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True and errors that say what went wrong."""
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
    # torch.save writes a zip archive ("PK\x03\x04"); before PyTorch 1.6, a pickle stream
    # (protocol 2: "\x80\x02"). Anything else is some other file: say so plainly.
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint (it starts with bytes "
                         f"{magic!r}, not a torch.save archive); pass the .pth file that "
                         f"train.py, save_checkpoint or download_weights.py wrote")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
        raise ValueError(
            f"{str(path)!r} is truncated or is not a PyTorch checkpoint ({e}); "
            f"delete it and save or download it again") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        raise ValueError(
            f"{str(path)!r} is a nanoGPT checkpoint (it has 'model' and 'model_args'), whose "
            f"layers are laid out differently; this project loads its own .pth files "
            f"(train.py, save_checkpoint, download_weights.py) and Hugging Face folders")
    return ckpt


def state_and_config(ckpt, path, cfg, normalize):
    """(state dict, config) of a loaded .pth; ``cfg`` only for one that carries none.

    ``normalize(cfg)`` (model.validate_config) fills in a config's optional keys, so that a
    given config and the saved one are compared key by key.
    """
    if not (isinstance(ckpt, dict) and "model_state_dict" in ckpt):
        if cfg is None:
            raise ValueError(
                f"{str(path)!r} is a bare state dict with no config; pass cfg=... in Python "
                f"or --config NAME_OR_JSON on the command line (a size such as 124M for "
                f"OpenAI's shapes, or a JSON file with the dict GPTModel was built from)")
        if not isinstance(ckpt, dict):
            raise ValueError(f"{str(path)!r} does not hold a state dict")
        return ckpt, cfg
    saved = ckpt.get("config")
    if cfg is not None and saved is not None:
        # cfg= is for files without a config: one that contradicts the saved config would
        # build another model around these weights (other heads: other logits)
        want, have = normalize(cfg), normalize(saved)
        diffs = [f"{k}: saved {have[k]!r}, given {want[k]!r}" for k in have if want[k] != have[k]]
        if diffs:
            raise ValueError(f"{str(path)!r} carries its own config, and the one given "
                             f"differs ({'; '.join(diffs)}); leave the config out (it is only "
                             f"for bare state dicts)")
    return ckpt["model_state_dict"], saved if saved is not None else cfg
