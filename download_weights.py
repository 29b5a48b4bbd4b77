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
import json
import os
import re
import sys
import time
from pathlib import Path

import requests
import torch
from tqdm import tqdm

from gpt2_params import gpt2_param_names, iter_gpt2_weights
from model import MODEL_CONFIGS, GPTModel, load_checkpoint, save_checkpoint

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"

# What OpenAI published for every size. The four checkpoint files hold the weights;
# hparams.json the shape; encoder.json and vocab.bpe the tokenizer (dataset.py has its own
# offline copy, but they are tiny and belong with the model).
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
TF_CHECKPOINT_FILES = ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                       "model.ckpt.meta")


class DownloadError(RuntimeError):
    """A download that cannot succeed by retrying (or that ran out of retries)."""


class _TransientError(Exception):
    """Internal: this attempt failed in a way that another attempt may fix."""


class _StartAgain(Exception):
    """Internal: the .part file was unusable and has been removed; download from zero."""


# ---------------------------------------------------------------------------------------
# Downloading

def _content_range(header):
    """Parse ``Content-Range: bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (start, total).

    Either may be None when the server left it out ("*").
    """
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[len("bytes "):].partition("/")
    start = None if span.strip() == "*" else int(span.split("-")[0])
    return start, (None if total.strip() in ("", "*") else int(total))


def _download_attempt(url, part, desc, timeout, chunk_size):
    """One HTTP request that appends to (or restarts) ``part``.

    Returns when ``part`` holds the whole file. Raises _StartAgain when the partial file
    was unusable and has been removed, _TransientError for failures worth retrying after
    a pause, and DownloadError or FileNotFoundError for ones that retrying cannot fix.
    """
    offset = part.stat().st_size if part.exists() else 0
    # identity: a gzip-encoded answer would be decoded by requests and no longer match
    # Content-Length, and byte ranges of a compressed body cannot be resumed reliably.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 404:
            raise FileNotFoundError(f"{url} does not exist (HTTP 404); check the URL")
        if status == 416:
            # "Range not satisfiable": we asked to start at or past the end. If the server
            # says the file is exactly as long as our .part, the .part is complete (the
            # previous run died between the last byte and the rename).
            _, total = _content_range(response.headers.get("Content-Range"))
            if offset and total == offset:
                return
            if not offset:
                raise DownloadError(f"{url} answered 416 to a plain GET; the server is broken")
            part.unlink()
            raise _StartAgain("the partial file was longer than the remote file")
        if status >= 500 or status in (408, 429):
            raise _TransientError(f"server answered HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{url} answered HTTP {status} {response.reason}; "
                                f"check the URL and that you may download it")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # requests would decode the body, so its length no longer matches Content-Length
            # and a byte range of it means nothing: the file cannot be checked or resumed.
            raise DownloadError(
                f"{url} was sent with Content-Encoding: {encoding} although we asked for the "
                f"plain bytes (Accept-Encoding: identity), so its length cannot be checked. "
                f"Use a server or mirror (--base-url) that sends the file as it is")
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                # a range we did not ask for: appending it would corrupt the file
                part.unlink(missing_ok=True)
                raise _StartAgain(f"the server sent bytes from {start} when asked for "
                                  f"bytes from {offset}")
            mode = "ab"
        else:
            # 200: the whole file. Either we asked for all of it, or the server ignores
            # Range requests; then the bytes we already have are useless and we restart.
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc) as bar:
            for chunk in response.iter_content(chunk_size=chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size < total:
        # urllib3 usually notices a cut connection itself; this is the backstop.
        raise _TransientError(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise _StartAgain(f"the server sent {size} bytes after announcing {total}")


def download_file(url, destination, *, retries=5, backoff=1.0, timeout=(10, 60),
                  chunk_size=1 << 16):
    """Download ``url`` to ``destination`` with a progress bar; resumable and atomic.

    Bytes go to ``destination + ".part"``; only when the stream ended and its length
    equals the server's Content-Length is it renamed to ``destination``. So the final
    file exists only if it is complete, and its existence is how we know: a second call
    returns at once without touching the network (this also lets a finished download
    be used offline). We do not re-check it against the server with a HEAD request:
    OpenAI's files never change, and a half-written file can never carry the final name.

    An existing ``.part`` is resumed with an HTTP Range request. A server that ignores
    Range (answers 200) restarts the file from zero; one that answers 416 means the .part
    is already whole. Connection errors, timeouts, 5xx answers and a connection cut
    mid-body are retried: an attempt that got new bytes resumes at once, one that got
    nothing waits ``backoff * 2**k`` seconds first and counts towards ``retries``.
    An unusable .part (longer than the remote file, answered with a range we did not ask
    for, or more bytes than announced) is deleted and the file started again; every such
    start-again also waits and counts towards ``retries``, and is never forgiven by later
    progress, so a server that keeps doing it cannot loop us forever. A body sent with a
    Content-Encoding (gzip, ...) is refused at once: its length cannot be checked.
    ``timeout`` is (connect, read) in seconds, so a silent server cannot hang us.
    When a connection is cut, the chunk being read is lost (urllib3 drops a short read),
    so ``chunk_size`` is kept small: a resume repeats at most 64 KiB.

    Limits: a server that sends no Content-Length gives us nothing to check the length
    against (OpenAI's does send it), and a .part is assumed to come from the same remote
    file (no ETag/If-Range check; OpenAI's files are immutable).

    Returns the destination Path. Raises FileNotFoundError on 404 and DownloadError for
    other failures; the .part is kept so that running again resumes.
    """
    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    failures = 0         # failed attempts in a row; progress resets it
    restarts = 0         # times the .part was thrown away; never reset
    while True:
        size_before = part.stat().st_size if part.exists() else 0
        try:
            _download_attempt(url, part, destination.name, timeout, chunk_size)
        except _StartAgain as e:
            restarts += 1
            if restarts > retries:
                raise DownloadError(
                    f"downloading {url} had to start again from zero {restarts} times "
                    f"(last: {e}); the server does not send the file consistently. Try "
                    f"again later or use another mirror (--base-url)") from None
            _pause(f"{destination.name}: {e}; starting again from zero", restarts, retries,
                   backoff * 2 ** (restarts - 1))
            continue
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError, _TransientError) as e:
            if part.exists() and part.stat().st_size > size_before:
                failures = 0           # progress: a flaky connection, not a dead one
                continue
            failures += 1
            if failures > retries:
                what_now = (f"the partial file {part} is kept, so running again resumes "
                            f"where it stopped" if part.exists() else
                            "check the network connection, or point --base-url at a mirror")
                raise DownloadError(f"downloading {url} failed {failures} times in a row "
                                    f"({e}); {what_now}") from e
            _pause(f"{destination.name}: {e}", failures, retries, backoff * 2 ** (failures - 1))
            continue
        os.replace(part, destination)
        return destination


def _pause(what, attempt, retries, seconds):
    """Say why and when the download tries again (instead of waiting in silence), then wait."""
    print(f"{what}; retry {attempt} of {retries} in {seconds:g} s", file=sys.stderr, flush=True)
    time.sleep(seconds)


# ---------------------------------------------------------------------------------------
# Checking that the config and the weights agree on the number of blocks

HF_BLOCK = re.compile(r"(?:transformer\.)?h\.(\d+)\.")    # HF: "[transformer.]h.{n}."
TF_BLOCK = re.compile(r"(?:model/)?h(\d+)/")                # OpenAI: "[model/]h{n}/"


def check_block_count(names, n_layers, pattern, source, config, fix):
    """Raise ValueError when the weight ``names`` hold blocks numbered ``n_layers`` or more.

    The converters fetch only the blocks the config asks for, so a config with fewer
    blocks than the weights (a stale or hand-edited n_layer) would otherwise load a
    shorter, different model without a word. Fewer blocks than the config is already an
    error (the missing weight is named). ``config`` names what says n_layer, ``fix`` says
    what to do.
    """
    blocks = [int(m.group(1)) for name in names if (m := pattern.match(name))]
    if blocks and max(blocks) >= n_layers:
        raise ValueError(f"{source} holds {max(blocks) + 1} transformer blocks but {config} "
                         f"says n_layer={n_layers}; {fix}")


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
    missing = [f"model/{tf_name}" for _, _, tf_name, _ in rows if f"model/{tf_name}" not in shapes]
    if missing:
        raise ValueError(f"{str(ckpt_path)!r} lacks {len(missing)} GPT-2 variables "
                         f"(first: {missing[0]!r}) although hparams.json says "
                         f"n_layer={settings['n_layer']}. {retry_hint}")
    params = {}
    for _, _, tf_name, is_conv1d in tqdm(rows, desc="reading TF checkpoint", unit="tensor"):
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
        name = row[2]
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

def model_sizes():
    """{"124M": "gpt2-small (124M)", ...}, read off MODEL_CONFIGS: one list of sizes."""
    return {key[key.index("(") + 1:key.index(")")]: key for key in MODEL_CONFIGS if "(" in key}


def resolve_model_size(model_size):
    """"124M" or "gpt2-small (124M)" -> "124M", the folder name OpenAI uses."""
    sizes = model_sizes()
    if model_size in sizes:
        return model_size
    for short, key in sizes.items():
        if model_size == key:
            return short
    raise ValueError(f"unknown model_size {model_size!r}; choose one of {list(sizes)} "
                     f"or {list(sizes.values())}")


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
    size = resolve_model_size(model_size)
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
    for name in GPT2_FILES:
        url = f"{base_url}/{size}/{name}"
        try:
            download_file(url, model_dir / name)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{url} does not exist (HTTP 404): either the model size {size!r} is wrong "
                f"(OpenAI published {list(model_sizes())}) or base_url {base_url!r} is "
                f"wrong") from e

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
                        help=f"one of {list(MODEL_CONFIGS)} or {list(model_sizes())}")
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
