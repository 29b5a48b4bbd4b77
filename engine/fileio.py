"""File plumbing: every file this project writes goes through ``atomic_write``.

    write(temp file beside the target) -> flush + fsync -> os.replace onto the target

A crash, a Ctrl-C or ``kill -9`` at any moment leaves either the old file or the complete new
one, never half of one that a later run would trust. (The one safe way back in for a
checkpoint is engine/checkpoints.py's ``read_checkpoint``.)

Before any of that, every command that writes calls ``check_output`` on each output, before
any work: a place that can be written, and never one of the command's own inputs.
"""

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path

import torch


class DiskFullError(OSError):
    """The disk (or the user's quota) filled up while a file was written; nothing changed."""


def atomic_write(path, write, by_path=False, size_hint=None, previous=None):
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync, then rename over ``path``.

    ``os.replace`` within one folder is atomic. ``by_path=True`` hands ``write`` the temp
    file's path instead of an open file, for writers that open the file themselves
    (safetensors' save_file, matplotlib's savefig); the file keeps the permissions it was
    created with. A full disk raises DiskFullError, one line that names the path and the
    space needed (``size_hint()``: the file's expected size in bytes, when known); the old
    file stays as it was and the temp file is removed. A folder that cannot be written
    raises NotWritableError, one line naming it.

    ``previous``: a path (beside ``path``) where the file being replaced stays, as a second
    name of it (a hard link: no copy). The old ``previous`` is deleted before the new file
    is written, so the disk never holds more than two versions at once, as without it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path)
        if previous is not None:
            Path(previous).unlink(missing_ok=True)
        tmp, fd = _create_temp_file(path)
    except PermissionError as e:        # also a read-only file system (EROFS), see below
        raise _not_writable(path, e) from None
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise _not_writable(path, e) from None
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
        if previous is not None and path.exists():
            _keep_as(path, Path(previous))
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if _is_disk_full(e):
            raise _disk_full(path, max(written, size_hint() if size_hint else 0)) from None
        raise
    _fsync_folder(path.parent)      # so that the rename itself survives a power cut
    return path


def file_sha256(path):
    """The sha256 (hex) of a file's bytes, read a few MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def atomic_save(obj, path, previous=None):
    """torch.save ``obj`` to ``path`` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f), size_hint=lambda: _nbytes(obj),
                        previous=previous)


class NotWritableError(PermissionError):
    """A file could not be created in its folder (no permission, read-only file system)."""


def _not_writable(path, error):
    folder = path.parent
    e = NotWritableError(
        f"cannot write {path}: the folder {folder} is not writable ({error.strerror}); make "
        f"it writable, or choose a path in another folder")
    e.strerror = error.strerror     # str(e) stays the line above (no errno set)
    return e


def _keep_as(path, previous):
    """Give the file at ``path`` the second name ``previous`` (replacing what is there).

    A hard link costs no space and no time, and ``path`` stays in place until the new file
    is renamed over it. Where links are not supported (some network and FAT file systems)
    the file is renamed instead: for the moment until the new one arrives, only
    ``previous`` holds it then.
    """
    try:
        os.link(path, previous)
    except FileExistsError:
        previous.unlink()
        os.link(path, previous)
    except OSError:
        os.replace(path, previous)


@contextlib.contextmanager
def ctrl_c_after():
    """Ctrl-C (SIGINT) during this block takes effect when it ends, as KeyboardInterrupt.

    A checkpoint written and then recorded as written is one step for the caller: cut in
    between, the file would hold a step that the caller's message does not know of. Off the
    main thread (where signals cannot be caught) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    before = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if caught:
        raise KeyboardInterrupt


def _nbytes(obj, seen=None):
    """Bytes of the tensors in a (nested) dict / list / tuple: about its torch.save size.

    torch.save writes each storage once, however many tensors share it (a tied output head
    and its embedding are one matrix), and a view costs its whole storage: so do we.
    """
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


def _is_disk_full(e):
    """ENOSPC / EDQUOT, also as the RuntimeError torch.save and safetensors turn them into,
    or hidden behind the error torch.save raises next while closing its archive."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, Exception) and any(text in str(e) for text in (
                "No space left on device", "Disk quota exceeded", "file write failed")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(path, needed):
    free = shutil.disk_usage(path.parent).free
    need = f"about {_size(needed)}" if needed else "more space"
    return DiskFullError(f"No space left on the disk for {path}: writing it needs {need}, and "
                         f"{_size(free)} are free there. Nothing was changed (the previous "
                         f"file, if any, is intact); free some space or write elsewhere")


def _size(n_bytes):
    return f"{n_bytes / 2**20:,.1f} MB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:,.1f} KB"


# The files a model folder is read from (by our loader, transformers or a converter): an
# output inside a folder given as an input may not be one of these, existing or new (a
# model.safetensors written into a sharded folder would be read instead of the shards).
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                      "tokenizer.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                      "bpe_tokenizer.json", "model.safetensors.index.json", "model*.safetensors",
                      "pytorch_model*.bin")


def check_output(path, inputs, flag, *, also=(), folder=False, example=None, writable=True):
    """Refuse, before any work, an output that cannot be written or would replace an input.

    Every command that writes calls this first, so that a long job never ends in an error
    about its output, and never writes over what it read. ``path``: what the flag ``flag``
    names, a file (``folder=True``: a folder the command writes into); ``also``: the other
    files it writes (its history beside a checkpoint, the files of an export folder);
    ``inputs``: ``(flag, path)`` pairs of what the command reads (a None path: not given).

    Refused with ValueError, in one line naming both flags: a written file that is an input
    (the same resolved path, through a symbolic link or not, or the same file under another
    name: a hard link), or that lies in an input folder as one of the files a model folder is
    read from (MODEL_FOLDER_FILES). ``example``: another value to suggest for ``flag``.
    Refused with OSError (check_writable): a folder where a file is meant or the other way
    round, a place where nothing can be created; ``writable=False`` skips that (the other
    processes of a torchrun job, which write nothing). Returns ``Path(path)``.
    """
    shown, path = os.fspath(path), Path(path)      # the flag's value, as it was given
    written = ([] if folder else [path]) + [Path(p) for p in also]
    instead = f"choose another {flag}" + (f", e.g. {flag} {example}" if example else "")
    for read_flag, source in inputs:
        if source is None:
            continue
        source = Path(source)
        for target in written:
            same = target.resolve() == source.resolve()
            if same or (target.exists() and source.exists() and os.path.samefile(target, source)):
                what = (f"{flag} {shown} is" if target == path else
                        f"{flag} {shown} would make it write {target}, which is")
                link = "" if same else " under another name (a hard link)"
                raise ValueError(f"{what} the file it reads as {read_flag} ({source}){link}, "
                                 f"and writing would replace it; {instead}")
            if source.is_dir() and target.resolve().parent == source.resolve() and any(
                    target.match(name) for name in MODEL_FOLDER_FILES):
                raise ValueError(
                    f"{flag} {shown} would write {target.name} into {source}, the model folder "
                    f"it reads as {read_flag}, where {target.name} is one of the folder's own "
                    f"files; {instead} (outside {source})")
    if writable:
        check_writable(shown, flag, folder)
    return path


def check_writable(path, flag=None, folder=False):
    """Raise OSError, before any long work, when ``path`` (a file; with ``folder=True`` a
    folder to write into) cannot be written. Nothing is created: the nearest folder that
    exists gets a temporary file, removed at once."""
    named = f"{flag} {os.fspath(path)}" if flag else os.fspath(path)
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot write {named}: it is a file, not a folder; choose "
                                 f"another {flag or 'folder'}")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"cannot write {named}: it is a folder; give the path of a "
                                f"file (in it, or elsewhere)")
    base = path if folder else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(f"cannot write {named}: {base} is a file, not a folder; "
                                 f"choose another {flag or 'path'}")
    try:
        tmp, fd = _create_temp_file(base / path.name)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise NotWritableError(f"cannot write {named}: nothing can be created in {base} "
                               f"({e.strerror or e}); choose a place you can write to, or "
                               f"make {base} writable") from None


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
