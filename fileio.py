"""File plumbing: every file this project writes goes through ``atomic_write``.

    write(temp file beside the target) -> flush + fsync -> os.replace onto the target

A crash, a Ctrl-C or ``kill -9`` at any moment leaves either the old file or the complete new
one, never half of one that a later run would trust. ``read_checkpoint`` is the one safe way
in: ``torch.load(weights_only=True)``, with errors that say what to do.
"""

import glob
import os
import pickle
import secrets
import socket
from pathlib import Path

import torch


def atomic_write(path, write, by_path=False):
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync, then rename over ``path``.

    ``os.replace`` within one folder is atomic. ``by_path=True`` hands ``write`` the temp
    file's path instead of an open file, for writers that open the file themselves
    (safetensors' save_file, matplotlib's savefig); the file keeps the permissions it was
    created with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    tmp, fd = _create_temp_file(path)
    try:
        if by_path:
            mode = os.fstat(fd).st_mode & 0o777
            os.close(fd)
            write(Path(tmp))
            os.chmod(tmp, mode)         # save_file, for one, makes its file private (0600)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(path.parent)      # so that the rename itself survives a power cut
    return path


def atomic_save(obj, path):
    """torch.save ``obj`` to ``path`` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _temp_prefix(path, pid=""):
    # ".train.txt.tokens.u16.<host>-<pid>.": whose temp file it is, so that a later run
    # can tell the leftovers of a killed process from a file another one is still writing
    return f".{path.name}.{socket.gethostname()}-{pid}"


def _create_temp_file(path):
    """A new empty file beside ``path``: (its path, an fd open for writing).

    Not tempfile.mkstemp, which makes the file private (mode 0600): with os.open and mode
    0666 the system applies the umask, so the file ends up with the permissions a plain
    open() would give it (others can read the token cache on a shared disk, for example).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f"{_temp_prefix(path, os.getpid())}.{secrets.token_hex(4)}.tmp"
        try:
            return str(tmp), os.open(tmp, flags, 0o666)
        except FileExistsError:         # the same 32 random bits twice: draw again
            continue


def _remove_stale_temp_files(path):
    """Delete temp files of ``path`` left by processes of this machine that are gone.

    A process killed while writing (kill -9, out of memory, power loss) cannot clean up, and
    its temp file can be as large as a checkpoint. Only files whose process is known to have
    ended are removed; on Windows, where that cannot be checked the same way, none are.
    """
    if os.name == "nt":
        return
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)        # signal 0: only asks whether the process exists
        except ProcessLookupError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:             # a read-only folder, say: leave it
                pass
        except OSError:                 # exists, owned by someone else
            pass


def _fsync_folder(folder):
    if os.name == "nt":                 # folders cannot be opened for fsync there
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                            # some file systems do not support it; not fatal
    finally:
        os.close(fd)


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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{str(path)!r} holds Python objects other than tensors and plain data, so it "
            f"was not loaded (loading it could run arbitrary code). Only load .pth files "
            f"you trust; re-save them as plain state dicts. Detail: {e}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{str(path)!r} is truncated or is not a PyTorch checkpoint ({e}); "
            f"delete it and save or download it again") from None
