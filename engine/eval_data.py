"""The benchmark files evaluate.py scores: where they come from, how they are checked and read.

    task_file("hellaswag")          data/eval/hellaswag_val.jsonl, downloaded once, checked
    task_path("hellaswag")          where that file is kept (nothing downloaded)
    read_hellaswag(path)            [{"activity_label", "ctx_a", "ctx_b", "endings", "label"}]
    read_lambada(path)              ["passage text", ...]
    read_wikitext(path)             ["document", ...]   (wiki.test.raw, or the zip holding it)

Each file is the one lm-evaluation-harness scores, in its original format, from its original
host. A download goes through engine/download.py (resume, retries, nothing under the final
name until it is complete) and is held to the file's known size and sha256, so a cut, an
error page or a changed file is refused, deleted and fetched again. The sizes and hashes
below are not ours: each is quoted from where it was published (see SOURCES).

Reading checks the format line by line and fails with one line that names the file, the
line and what was expected, so that a LAMBADA file given to the HellaSwag task, or an empty
file, says so instead of scoring nonsense.
"""

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests

from engine.download import DownloadError, download_file


@dataclass(frozen=True)
class TaskFile:
    name: str           # the file's name, in data/eval/
    url: str            # its public source
    size: int           # bytes
    sha256: str
    source: str         # where the size and sha256 were published


TASK_FILES = {
    # 10,042 validation examples, MIT licence (github.com/rowanz/hellaswag)
    "hellaswag": TaskFile(
        "hellaswag_val.jsonl",
        "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
        12246618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
        "huggingface/datasets, datasets/hellaswag/dataset_infos.json (download_checksums)"),
    # 5,153 passages: OpenAI's LAMBADA test set, what lm-eval's lambada_openai scores
    "lambada": TaskFile(
        "lambada_test.jsonl",
        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
        1819752, "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        "the sha256 that lm-evaluation-harness's original lambada task checked, and the "
        "table in the EleutherAI/lambada_openai dataset card; the size from that dataset"),
    # WikiText-2 raw (CC BY-SA): the zip of wiki.{train,valid,test}.raw. The mirror Stephen
    # Merity (its author) keeps since the original S3 bucket closed; its hash is the one the
    # datasets library recorded for the S3 file, so the archive is the same.
    "wikitext": TaskFile(
        "wikitext-2-raw-v1.zip",
        "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        4721645, "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        "huggingface/datasets, datasets/wikitext/dataset_infos.json (download_checksums)"),
}
WIKITEXT_MEMBER = "wikitext-2-raw/wiki.test.raw"        # the test split inside the zip


def task_path(task, folder="data/eval"):
    """Where ``task``'s file is kept (task_file downloads it there when it is missing)."""
    return Path(folder) / TASK_FILES[task].name


def task_file(task, folder="data/eval", url=None, retries=3, backoff=1.0, *,
              file_flag="--data", mirror_flag="--data-url"):
    """Path of ``task``'s file in ``folder``, downloaded from its source (or ``url``, a
    mirror of the same file: it is held to the same size and sha256) if it is not there.
    ``file_flag`` / ``mirror_flag``: the caller's flags for a file of one's own and for a
    mirror (None: it has none), which the advice of a failed download names."""
    spec = TASK_FILES[task]
    destination = task_path(task, folder)
    if destination.is_file():
        return destination
    url = url or spec.url
    print(f"downloading {spec.name} ({spec.size / 2**20:.1f} MiB) from {url} into {folder}/")
    try:
        return download_file(url, destination, size=spec.size, sha256=spec.sha256,
                             retries=retries, backoff=backoff, mirror_flag=mirror_flag)
    except (DownloadError, requests.RequestException) as e:
        # one line: why, and what to do without a network
        raise OSError(f"could not download {spec.name}: {e}. If this machine is offline, "
                      f"fetch {url} on one that is not and pass it with {file_flag} FILE, or "
                      f"put it at {destination}") from None


# ---------------------------------------------------------------------------------------
# Reading, with the format checked

HELLASWAG_FORMAT = ("--task hellaswag reads hellaswag_val.jsonl's format: one JSON object a "
                    "line with activity_label, ctx_a, ctx_b, endings (4) and label (0-3)")
LAMBADA_FORMAT = ('--task lambada reads lambada_test.jsonl\'s format: one {"text": "..."} a '
                  'line, the passage whose last word is to be predicted')
WIKITEXT_FORMAT = ("--task wikitext reads wikitext-2-raw's wiki.test.raw (or the "
                   "wikitext-2-raw-v1.zip holding it): articles that start at ' = Title = ' lines")


def _text(path, what):
    """The file's text; one-line errors for a missing, undecodable or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {what}")
    data = path.read_bytes()
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read(WIKITEXT_MEMBER)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{path} is not wikitext-2-raw-v1.zip ({e}); {what}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); {what}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; {what}")
    return text


def _json_lines(path, what):
    """[(line number, object)] of a JSON-lines file; blank lines are skipped."""
    records = []
    for number, line in enumerate(_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e.msg}); {what}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is a JSON {type(record).__name__}, not an "
                             f"object; {what}")
        records.append((number, record))
    return records


def _missing(path, number, record, fields, kind, what):
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{path} line {number} is not {kind}: it has no {missing[0]!r} (its "
                         f"fields: {', '.join(record) or 'none'}); {what}")


def read_hellaswag(path):
    """HellaSwag examples as in the file: dicts with at least activity_label, ctx_a, ctx_b,
    endings (four strings) and label (an int 0-3; the datasets library's "2" is read too)."""
    examples = []
    for number, record in _json_lines(path, HELLASWAG_FORMAT):
        _missing(path, number, record, ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                 "a HellaSwag example", HELLASWAG_FORMAT)
        endings, label = record["endings"], record["label"]
        if not (isinstance(endings, list) and len(endings) == 4
                and all(isinstance(e, str) for e in endings)):
            raise ValueError(f"{path} line {number}: 'endings' must be a list of 4 strings; "
                             f"{HELLASWAG_FORMAT}")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or label not in (0, 1, 2, 3):
            raise ValueError(f"{path} line {number}: 'label' must be 0, 1, 2 or 3, got "
                             f"{record['label']!r}; {HELLASWAG_FORMAT}")
        if not all(isinstance(record[f], str) for f in ("activity_label", "ctx_a", "ctx_b")):
            raise ValueError(f"{path} line {number}: activity_label, ctx_a and ctx_b must be "
                             f"strings; {HELLASWAG_FORMAT}")
        examples.append({**record, "label": label})
    return examples


def read_lambada(path):
    """The passages of a LAMBADA file (their last word is the target)."""
    texts = []
    for number, record in _json_lines(path, LAMBADA_FORMAT):
        _missing(path, number, record, ("text",), "a LAMBADA passage", LAMBADA_FORMAT)
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ValueError(f"{path} line {number}: 'text' must be a non-empty string; "
                             f"{LAMBADA_FORMAT}")
        texts.append(record["text"])
    return texts


def _is_title(line):
    """' = Title = ' (an article) but not ' = = Section = = ' (a part of one)."""
    line = line.replace("= = =", "===").replace("= =", "==").strip()
    return line.startswith("= ") and line.endswith(" =")


def split_wikitext(text):
    """Articles of a wikitext-raw file, cut where lm-eval's wikitext_document_level cuts:
    before every ' = Title = ' line; a stretch holding only whitespace is no article, except
    that the last one is kept whatever it holds (its "page" counts in lm-eval's totals)."""
    pages, lines = [], []
    for line in text.split("\n"):
        if _is_title(line):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def read_wikitext(path):
    """The articles of wiki.test.raw (or of the test split in wikitext-2-raw-v1.zip)."""
    text = _text(path, WIKITEXT_FORMAT)
    if not any(_is_title(line) for line in text.split("\n")):
        raise ValueError(f"{path} has no ' = Title = ' line, so no article; {WIKITEXT_FORMAT}")
    return split_wikitext(text)
