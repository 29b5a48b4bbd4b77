"""OpenAI's original GPT-2 TensorFlow checkpoints -> a GPTModel checkpoint (.pth).

    {base_url}/{size}/{7 files} --download_file--> {target_dir}/{size}/   (resumable, atomic)
    model.ckpt.* --load_gpt2_params_from_tf_ckpt--> {"h0/attn/c_attn/w": array, ...}
    arrays --load_weights_into_gpt--> GPTModel --save_checkpoint--> {target_dir}/gpt2-{size}.pth

    python download_weights.py --model "gpt2-small (124M)" [--out-dir DIR] [--base-url URL]

The converted .pth carries its config, so ``model.load_checkpoint(path)`` is all a
notebook needs afterwards. TensorFlow is needed only for the conversion step and is
imported there, so importing this module (for ``download_file``) stays cheap.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from engine.download import DownloadError, download_file  # noqa: F401  (re-exported)
from engine.gpt2_params import TF_BLOCK, check_block_count, gpt2_param_names, iter_gpt2_weights
from model import MODEL_CONFIGS, OPENAI_SIZES, GPTModel, load_checkpoint, save_checkpoint, size_key

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"

# What OpenAI published for every size. The four checkpoint files hold the weights;
# hparams.json the shape; encoder.json and vocab.bpe the tokenizer (dataset.py has its own
# offline copy, but they are tiny and belong with the model).
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
TF_CHECKPOINT_FILES = ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                       "model.ckpt.meta")


# ---------------------------------------------------------------------------------------
# Reading OpenAI's TensorFlow checkpoint

def _import_tensorflow():
    # TensorFlow takes seconds to import and is only needed here, so it is not a
    # module-level import. Its C++ logging is loud; quiet it unless the user chose a level.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError("reading OpenAI's GPT-2 checkpoint needs TensorFlow: "
                          "pip install tensorflow (or use download_weights_hf.py, which "
                          "needs no TensorFlow)") from None
    return tf


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Read the GPT-2 weights from a TF checkpoint into a flat dict of numpy arrays.

    ``ckpt_path`` is the checkpoint prefix (``.../model.ckpt``) or the folder holding it;
    ``settings`` is hparams.json as a dict (only ``n_layer`` is used, to know which
    variables to expect).

    The dict is keyed by OpenAI's variable names without the ``model/`` scope, exactly the
    ``openai_tf`` column of ``gpt2_params.gpt2_param_names`` (``"wte"``, ``"h0/attn/c_attn/w"``,
    ...), so the loader is a loop over that table. OpenAI's Conv1D weights are stored as
    (1, in, out); the leading 1 is squeezed away here, leaving (in, out).
    """
    tf = _import_tensorflow()
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "model.ckpt"
    rows = gpt2_param_names(settings["n_layer"])
    retry_hint = (f"The files are damaged or incomplete: delete the folder "
                  f"{str(ckpt_path.parent)!r} and run again to download them afresh.")
    try:
        reader = tf.train.load_checkpoint(str(ckpt_path))
        shapes = reader.get_variable_to_shape_map()
    except Exception as e:
        # TensorFlow signals a bad file with a zoo of types (OpError subclasses, and
        # IndexError for a short read), so we catch broadly and re-raise one clear error.
        raise ValueError(f"could not open the TensorFlow checkpoint {str(ckpt_path)!r} "
                         f"({type(e).__name__}: {e}). {retry_hint}") from e
    check_block_count(shapes, settings["n_layer"], TF_BLOCK, repr(str(ckpt_path)), "hparams.json",
                      "the files do not belong together: delete the folder "
                      f"{str(ckpt_path.parent)!r} and run again to download them afresh.")
    missing = [f"model/{row.openai_tf}" for row in rows if f"model/{row.openai_tf}" not in shapes]
    if missing:
        raise ValueError(f"{str(ckpt_path)!r} lacks {len(missing)} GPT-2 variables "
                         f"(first: {missing[0]!r}) although hparams.json says "
                         f"n_layer={settings['n_layer']}. {retry_hint}")
    params = {}
    for row in tqdm(rows, desc="reading TF checkpoint", unit="tensor"):
        tf_name, is_conv1d = row.openai_tf, row.is_conv1d
        try:
            array = reader.get_tensor(f"model/{tf_name}")
        except Exception as e:
            raise ValueError(f"could not read variable 'model/{tf_name}' from "
                             f"{str(ckpt_path)!r} ({type(e).__name__}: {e}). {retry_hint}") from e
        if is_conv1d and array.ndim == 3 and array.shape[0] == 1:
            array = array[0]                                  # (1, in, out) -> (in, out)
        params[tf_name] = array
    return params


# ---------------------------------------------------------------------------------------
# Copying named weights into a GPTModel

def load_weights_into_gpt(gpt, params):
    """Copy OpenAI's TensorFlow weights (arrays from ``load_gpt2_params_from_tf_ckpt``) into
    ``gpt`` in place. (download_weights_hf.load_weights_into_gpt takes Hugging Face's.)

    ``params`` is keyed by OpenAI names with or without the ``model/`` scope. Shapes are
    checked first, with an error naming the parameter, and ``params`` may not hold more
    blocks than ``gpt`` has. Returns ``gpt``.
    """
    n_layers = gpt.cfg["n_layers"]
    check_block_count(params, n_layers, TF_BLOCK, "the TensorFlow checkpoint",
                      "the model's config", f"build the model with the checkpoint's n_layer "
                      f"(hparams.json), not n_layers={n_layers}")

    def fetch(row):
        name = row.openai_tf
        if name in params:
            return params[name]
        if f"model/{name}" in params:
            return params[f"model/{name}"]
        raise KeyError(name)

    targets = dict(gpt.named_parameters())
    with torch.no_grad():
        for name, tensor in iter_gpt2_weights(gpt, fetch, "the TensorFlow checkpoint"):
            targets[name].copy_(tensor)
    return gpt


# ---------------------------------------------------------------------------------------
# The whole pipeline

def hparams_to_config(settings, source="hparams.json"):
    """OpenAI's hparams.json -> our cfg. The shape comes from the file, not the size name."""
    try:
        return {"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"],
                "emb_dim": settings["n_embd"], "n_heads": settings["n_head"],
                "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": True,
                "tie_embeddings": True}
    except KeyError as e:
        raise ValueError(f"{source} has no {e.args[0]!r}; expected n_vocab, n_ctx, n_embd, "
                         f"n_head and n_layer") from None


def _load_error(path):
    """None if ``path`` is a checkpoint load_checkpoint accepts, else the error."""
    try:
        load_checkpoint(path)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return e
    return None


def download_and_save_gpt2(model_size, target_dir="model_weights", model_class=GPTModel,
                           base_url=BASE_URL, delete_tf_files=False):
    """Download OpenAI's GPT-2 ``model_size`` and convert it; returns the .pth path.

    The seven files land in ``{target_dir}/{size}/`` and the converted checkpoint (config
    included) at ``{target_dir}/gpt2-{size}.pth``; ``model.load_checkpoint`` on it gives a
    ready model. A second call reuses both and downloads nothing; a .pth that does not
    load is converted again. ``delete_tf_files`` removes the four TF checkpoint files
    once the .pth is there and loads (1558M's are 6 GB), also when an earlier call
    converted it; hparams.json and the tokenizer files stay.
    """
    key = size_key(model_size)
    size = next(short for short, k in OPENAI_SIZES.items() if k == key)    # "124M"
    target_dir = Path(target_dir)
    model_dir = target_dir / size
    pth = target_dir / f"gpt2-{size}.pth"
    if pth.is_file():
        error = _load_error(pth)
        if error is None:
            print(f"{pth} is already converted; nothing to download")
            if delete_tf_files:
                _delete_tf_files(model_dir)
            return pth
        print(f"{pth} does not load ({error}); converting it again")

    base_url = base_url.rstrip("/")
    made = [d for d in (target_dir, model_dir) if not d.exists()]
    try:
        for name in GPT2_FILES:
            url = f"{base_url}/{size}/{name}"
            try:
                download_file(url, model_dir / name)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"{url} does not exist (HTTP 404): either the model size {size!r} is wrong "
                    f"(OpenAI published {list(OPENAI_SIZES)}) or base_url {base_url!r} is "
                    f"wrong") from e
    except BaseException:
        # Folders this call made and left empty (offline, say) would only look like a
        # download begun; one holding a .part file stays, so that the next call resumes.
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise

    hparams_path = model_dir / "hparams.json"
    try:
        settings = json.loads(hparams_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{hparams_path} is not valid JSON ({e}); delete the folder "
                         f"{str(model_dir)!r} and run again") from None
    cfg = hparams_to_config(settings, source=str(hparams_path))
    params = load_gpt2_params_from_tf_ckpt(model_dir / "model.ckpt", settings)
    model = model_class(cfg)
    load_weights_into_gpt(model, params)
    del params                      # the arrays are a second full copy of the weights
    save_checkpoint(pth, model)
    if delete_tf_files:
        _delete_tf_files(model_dir)
    return pth


def _delete_tf_files(model_dir):
    for name in TF_CHECKPOINT_FILES:
        (model_dir / name).unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small (124M)",
                        help=f"one of {list(MODEL_CONFIGS)} or {list(OPENAI_SIZES)}")
    parser.add_argument("--out-dir", default="model_weights", help="where files are saved")
    parser.add_argument("--base-url", default=BASE_URL, help="where OpenAI's files live")
    parser.add_argument("--delete-tf-files", action="store_true",
                        help="remove the TF checkpoint after converting it")
    args = parser.parse_args(argv)
    path = download_and_save_gpt2(args.model, target_dir=args.out_dir, base_url=args.base_url,
                                  delete_tf_files=args.delete_tf_files)
    print(f"saved {path}; load it with model.load_checkpoint({str(path)!r})")
    return path


if __name__ == "__main__":
    try:
        main()
    except (DownloadError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")     # the message says what to do; no traceback
