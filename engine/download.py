"""HTTP downloads that resume after a cut connection and never leave a half file.

    download_file(url, destination)   bytes -> destination.part -> (complete) -> destination
    download_file(url, destination, size=N, sha256=HEX)    ... -> (checked) -> destination

download_weights.py fetches OpenAI's checkpoints with it, engine/eval_data.py the benchmark
files (with their known size and sha256); download_weights_hf.py leaves the Hub's files to
huggingface_hub.
"""

import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from engine.fileio import file_sha256


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


def _download_attempt(url, part, desc, timeout, chunk_size, expected_size=None,
                      mirror_flag="--base-url"):
    """One HTTP request that appends to (or restarts) ``part``.

    Returns when ``part`` holds the whole file. Raises _StartAgain when the partial file
    was unusable and has been removed, _TransientError for failures worth retrying after
    a pause, and DownloadError or FileNotFoundError for ones that retrying cannot fix.
    ``expected_size``: the file's known length; a server announcing another length is
    sending another file (an error page, a changed file), one that announces none is held
    to it.
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
                f"Use a server or mirror{_named(mirror_flag)} that sends the file as it is")
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
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise _StartAgain(f"the server announced {total} bytes where the file has "
                              f"{expected_size}")
        total = expected_size if total is None else total
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


def _check_sha256(part, sha256):
    """Delete ``part`` and start again (_StartAgain) unless its sha256 is ``sha256``."""
    digest = file_sha256(part)
    if digest != sha256.lower():
        part.unlink()
        raise _StartAgain(f"its sha256 is {digest}, not the expected {sha256}")


def download_file(url, destination, *, retries=5, backoff=1.0, timeout=(10, 60),
                  chunk_size=1 << 16, size=None, sha256=None, mirror_flag="--base-url"):
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

    A file whose length and content are known can be held to them: with ``size`` a server
    that announces another length is refused at once, one that announces none is held to
    ``size`` (a short file resumes, a long one starts again); with ``sha256`` the complete
    file is hashed before it takes its name. A wrong file is deleted and downloaded again,
    counted as a start-again like the others. ``mirror_flag`` is the command-line flag the
    messages suggest for another server (None: a command that has none).

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
            _download_attempt(url, part, destination.name, timeout, chunk_size, size,
                              mirror_flag)
            if sha256 is not None:
                _check_sha256(part, sha256)
        except _StartAgain as e:
            restarts += 1
            if restarts > retries:
                raise DownloadError(
                    f"downloading {url} had to start again from zero {restarts} times "
                    f"(last: {e}); the server does not send the file consistently. Try "
                    f"again later or use another mirror{_named(mirror_flag)}") from None
            _pause(f"{destination.name}: {e}; starting again from zero", restarts, retries,
                   backoff * 2 ** (restarts - 1))
            continue
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError, _TransientError) as e:
            if _name_does_not_resolve(e):
                # no network (or a mistyped host): waiting and asking again will not help
                host = urlparse(url).hostname
                raise DownloadError(
                    f"cannot download {url}: the host name {host!r} does not resolve, so this "
                    f"machine is offline or the name is wrong; connect and run again"
                    f"{_or_point(mirror_flag, 'a reachable mirror')}") from None
            if part.exists() and part.stat().st_size > size_before:
                failures = 0           # progress: a flaky connection, not a dead one
                continue
            failures += 1
            if failures > retries:
                what_now = (f"the partial file {part} is kept, so running again resumes "
                            f"where it stopped" if part.exists() else
                            f"check the network connection{_or_point(mirror_flag, 'a mirror')}")
                raise DownloadError(f"downloading {url} failed {failures} times in a row "
                                    f"({e}); {what_now}") from e
            _pause(f"{destination.name}: {e}", failures, retries, backoff * 2 ** (failures - 1))
            continue
        os.replace(part, destination)
        return destination


def _named(mirror_flag):       # " (--base-url)": the flag that names a mirror, when there is one
    return f" ({mirror_flag})" if mirror_flag else ""


def _or_point(mirror_flag, where):
    return f", or point {mirror_flag} at {where}" if mirror_flag else ""


def _name_does_not_resolve(error):
    """Whether ``error`` (a requests ConnectionError) comes from a failed DNS lookup."""
    for _ in range(10):         # requests -> urllib3 -> socket: a few causes deep
        if error is None:
            return False
        if isinstance(error, socket.gaierror) or type(error).__name__ == "NameResolutionError":
            return True
        error = error.__cause__ or error.__context__ or next(
            (a for a in getattr(error, "args", ()) if isinstance(a, BaseException)), None)
    return False


def _pause(what, attempt, retries, seconds):
    """Say why and when the download tries again (instead of waiting in silence), then wait."""
    print(f"{what}; retry {attempt} of {retries} in {seconds:g} s", file=sys.stderr, flush=True)
    time.sleep(seconds)
