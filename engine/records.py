"""Records on disk: instructions, labelled texts, preference pairs; checks, splits, length groups.

    read_records(path, format=None)     a .json list or a .jsonl file (one record a line) ->
                                        a list of records, each checked, with errors that name
                                        the record's line (JSONL) or its index (JSON list)
    split_records(records, 0.1, seed)   -> (train, valid): whole records, decided per record
    copies_across(train, valid)         validation records that are copies of training ones
    group_by_length(order, lengths, b)  batches of records of similar length (less padding),
    LengthGroupedSampler                and the DataLoader sampler that uses it
    fetch_records(url, folder)          a public set downloaded once (engine/download.py)
    is_records(data), is_url(data)      what train.py's --data names
    fit(render, messages, max_tokens)   a conversation cut to fit the context (the rules are
                                        dataset.fit_conversation's docstring)
    read_labelled(path), label_names    a classifier's texts and labels (CSV / TSV / JSONL),
    split_labelled(records, 0.1, seed)  and their split, stratified by class
    fetch_sms_spam(folder)              the SMS Spam Collection (UCI), downloaded and checked
    read_preferences(path)              DPO's {"prompt", "chosen", "rejected"} records, checked

Two record formats, told apart by their keys (``format=`` forces one):

    "alpaca"    {"instruction": str, "input": str (optional), "output": str}
                Dolly's names work too: "context" is read as "input", "response" as "output"
    "messages"  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
                an optional system message first, then user and assistant taking turns,
                ending with the assistant

dataset.py re-exports these and turns a record into token ids (the template lives there).
"""

import csv
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.data import Sampler

from engine.download import download_file
from engine.fileio import atomic_write
from engine.text_files import read_text

FORMATS = ("alpaca", "messages")
ROLES = ("system", "user", "assistant")
ALPACA_FIELDS = {"input": ("input", "context"), "output": ("output", "response")}


def is_records(data):
    """Whether ``data`` (a path or URL) names instruction records: a .json / .jsonl file."""
    return urlparse(str(data)).path.lower().endswith((".json", ".jsonl"))


def is_url(data):
    return str(data).startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# Checking one record
# ---------------------------------------------------------------------------------------------

def record_format(record, format=None):
    """"alpaca" or "messages": ``format`` when given, else what the record's keys say.
    Raises ValueError (without saying where: the caller adds that) for anything else."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None (detect), got {format!r}")
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__} "
                         f"{_short(record)}")
    found = "messages" if "messages" in record else "alpaca" if "instruction" in record else None
    if found is None:
        raise ValueError(f"neither an Alpaca record (\"instruction\", \"output\") nor a "
                         f"conversation (\"messages\"): its keys are {sorted(record)}")
    if format is not None and found != format:
        raise ValueError(f"a {found} record where format={format!r} was asked for")
    return found


def check_record(record, format=None):
    """The record's format, after checking every field; ValueError says what is wrong."""
    found = record_format(record, format)
    if found == "alpaca":
        instruction = record["instruction"]
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"\"instruction\" must be a non-empty string, got "
                             f"{_short(instruction)}")
        for field, names in ALPACA_FIELDS.items():
            both = [n for n in names if n in record]
            if len(both) > 1:       # one would be dropped without a word
                raise ValueError(f"it has both \"{both[0]}\" and \"{both[1]}\" (Dolly's name "
                                 f"for the same field); keep one of them")
            name = next(iter(both), None)
            if name is None and field == "output":
                raise ValueError("it has no \"output\" (the answer the model learns to give)")
            if name is not None and not isinstance(record[name], str):
                raise ValueError(f"\"{name}\" must be a string, got {_short(record[name])}")
        return found
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"\"messages\" must be a non-empty list, got {_short(messages)}")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"message {i} must be an object with \"role\" and \"content\", "
                             f"got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): \"content\" must be a string, got "
                             f"{_short(content)}")
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise ValueError(f"message {i} is {role!r} where {expected!r} was due: a system "
                             f"message may only come first, then user and assistant take turns")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the answer the model "
                         "learns to give)")
    return found


def alpaca_fields(record):
    """(instruction, input, output) of an Alpaca record (Dolly's context / response too)."""
    found = {field: next((record[n] for n in names if n in record), "")
             for field, names in ALPACA_FIELDS.items()}
    return record["instruction"], found["input"], found["output"]


def fit(render, messages, max_tokens):
    """``render(messages) -> (ids, scored)`` within ``max_tokens`` -> (ids, scored, dropped,
    cut): the oldest exchanges dropped first (the system message stays), then shorten()
    (dataset.fit_conversation says it in words)."""
    dropped = 0
    ids, scored = render(messages)
    while len(ids) > max_tokens and sum(m["role"] == "user" for m in messages) > 1:
        first, second = [i for i, m in enumerate(messages) if m["role"] == "user"][:2]
        messages, dropped = messages[:first] + messages[second:], dropped + 1
        ids, scored = render(messages)
    if len(ids) <= max_tokens:
        return ids, scored, dropped, False
    return *shorten(ids, scored, max_tokens), dropped, True


def shorten(ids, scored, max_tokens):
    """One exchange's ids and scored flags cut to ``max_tokens`` (dataset.fit_conversation's
    steps 2 and 3): the prompt (the unscored tokens before the answer) loses its middle,
    keeping its first and last tokens, but keeps at least a quarter of ``max_tokens``; then
    the answer loses its end."""
    n_prompt = scored.index(True) if True in scored else len(ids)
    prompt, answer = ids[:n_prompt], ids[n_prompt:]
    keep = max(max_tokens - len(answer), min(n_prompt, max_tokens // 4))      # prompt tokens
    head = keep // 2
    ids = prompt[:head] + prompt[n_prompt - (keep - head):] + answer[:max_tokens - keep]
    return ids, [False] * keep + [True] * (len(ids) - keep)


def _short(value, limit=60):
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_records(records, format=None, name="records", lines=None):
    """Check every record; the first bad one raises ValueError naming ``name`` and the
    record's place: ``lines[i]`` ("line 7" of a JSONL file) or its index in the list."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None (detect), got {format!r}")
    if not records:
        raise ValueError(f"{name} holds no records: an instruction set needs at least one "
                         f"(.json: a list of records, .jsonl: one record a line)")
    _each(lambda record: check_record(record, format), records, name, lines)
    if not any(answer.strip() for record in records for answer in _answers(record)):
        raise ValueError(f"{name}: every record's answer (\"output\", or the assistant's "
                         f"messages) is empty, so a model tuned on it would only learn to stop "
                         f"at once; fill in the answers")
    return records


def _each(fn, records, name, wheres=None):
    """[fn(record) for each record]; the first ValueError is raised again as one line naming
    ``name`` and the record's place: ``wheres[i]`` ("line 7" of a file), or its index."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(fn(record))
        except ValueError as e:
            where = wheres[i] if wheres else f"record {i} (counting from 0)"
            raise ValueError(f"{name} {where}: {e}") from None
    return out


def _answers(record):
    """The texts a record teaches the model to say: its output, or the assistant's turns."""
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [alpaca_fields(record)[2]]


def load_records(records, format=None, name=None):
    """``records`` checked, or read from ``records`` when it is a path (read_records)."""
    if isinstance(records, (str, os.PathLike)):
        return read_records(records, format)
    return check_records(records, format, name or "records")


# ---------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------

def read_records(path, format=None):
    """The records of a .json file (one list) or a .jsonl file (one record a line), checked.

    A file with another suffix is read as a JSON list when it starts with ``[``, else as
    JSONL. Blank lines of a JSONL file are skipped. Errors are one line naming the file and
    the record: ``data.jsonl line 7: it has no "output" ...``.
    """
    rows = _file_rows(path, "instruction", "records, such as data/instructions.jsonl")
    return check_records([r for _, r in rows], format, str(path), [w for w, _ in rows])


def _file_rows(path, what, example):
    """(where, record) of a .json list or a .jsonl file (another suffix: a list when it starts
    with "["), with one-line errors for a missing file (naming ``what`` and ``example``), an
    empty one and bad JSON."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} file at {path} (absolute: {path.resolve()}): give "
                                f"a .json or .jsonl file of {example}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: put records in it (.json: a list of records, "
                         f".jsonl: one record a line)")
    text = read_text(path).removeprefix("\ufeff")      # a UTF-8 byte-order mark is no JSON
    as_list = path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip()[:1] == "[")
    return _json_rows(path, text) if as_list else _jsonl_rows(path, text)


def _json_rows(path, text):
    """(where, record) of a .json file holding one list of records."""
    try:
        records = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); a .json file holds one list of "
                         f"records, a .jsonl file one record a line") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, not a list of "
                         f"records; for one record a line, name the file .jsonl")
    return [(f"record {i} (counting from 0)", r) for i, r in enumerate(records)]


def _jsonl_rows(path, text):
    """(where, record) of a .jsonl file: one record a line; blank lines are skipped. "\n"
    only: str.splitlines() also cuts at U+2028 and friends, which JSON strings may hold."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except ValueError as e:
                raise ValueError(f"{path} line {number} is not valid JSON ({e}); a .jsonl file "
                                 f"holds one record a line") from None
    return rows


def fetch_records(url, folder="data"):
    """The path of ``url``'s file in ``folder``, downloaded there once (download_file: resumed
    after a cut, never left half-written); a file already there is used as it is."""
    name = Path(urlparse(url).path).name
    if not name:
        raise ValueError(f"{url} names no file; give the URL of a .json or .jsonl file")
    destination = Path(folder) / name
    if destination.exists():
        print(f"using {destination}, downloaded before from {url} (delete it to download "
              f"again)")
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(download_file(url, destination))


# ---------------------------------------------------------------------------------------------
# The validation split and batches of similar length
# ---------------------------------------------------------------------------------------------

def split_records(records, valid_fraction=0.1, seed=123):
    """``(train, valid)``: whole records, each side in the file's order.

    A record goes to validation when a hash of (seed, the record) falls in the first
    ``valid_fraction`` of the hash range. So the split is the same on every run and machine,
    a record's side does not depend on the file's order or on the other records (records
    added later never move an old one across, which would leak it into training), and
    duplicate records land on the same side. If no record falls there, the one with the
    lowest hash is held out: validation is never empty, training keeps the rest. Nothing is
    written to disk.
    """
    if isinstance(valid_fraction, bool) or not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be a number strictly between 0 and 1, got "
                         f"{valid_fraction!r}")
    if len(records) < 2:
        raise ValueError(f"{len(records)} record(s) cannot be split into training and "
                         f"validation: give at least 2 (some are held out to measure the "
                         f"validation loss on)")
    keys = [_hash_fraction(seed, r) for r in records]
    held = [k < valid_fraction for k in keys]
    if not any(held):
        held[keys.index(min(keys))] = True
    if all(held):
        held[keys.index(max(keys))] = False
    return ([r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h])


def copies_across(train, valid):
    """How many ``valid`` records are copies of a ``train`` record. Equal records hash alike,
    so split_records puts them on one side, except when every record would land on one side
    (a file of one record repeated): then the validation loss partly measures memory."""
    seen = {_key(r) for r in train}
    return sum(_key(r) in seen for r in valid)


def _key(record):
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def _hash_fraction(seed, record):
    """A number in [0, 1) fixed by the seed and the record's content."""
    data = json.dumps([seed, record], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def group_by_length(order, lengths, batch_size, generator=None, window=64):
    """Batches (index lists) of records of similar length, in random batch order.

    ``order`` (a shuffled list of indices) is cut into windows of ``window * batch_size``
    records; each window is sorted by length and cut into batches, and the full batches are
    shuffled (with ``generator``, a torch.Generator). Records in a batch then need little
    padding, while which records meet stays random. A short batch (there is at most one, the
    last) stays last, where ``drop_last`` drops it.
    """
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    shuffled = torch.randperm(len(full), generator=generator).tolist()
    return [full[k] for k in shuffled] + short


def check_batch_size(batch_size):
    """Raise ValueError unless ``batch_size`` is a positive int (every data loader's check)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


class LengthGroupedSampler(Sampler):
    """A shuffled order in which each run of ``batch_size`` records has similar lengths
    (group_by_length), for a DataLoader with that batch_size: batches need little padding."""

    def __init__(self, lengths, batch_size, generator=None):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = group_by_length(order, self.lengths, self.batch_size, self.generator)
        return iter([i for batch in batches for i in batch])


# ---------------------------------------------------------------------------------------------
# Labelled texts: a classifier's data (classify.py)
# ---------------------------------------------------------------------------------------------

def read_labelled(path, labels=None):
    """The ``[{"text": str, "label": str}, ...]`` of a labelled file, each one checked.

    A .csv / .tsv file has a header row naming its ``text`` and ``label`` columns (others are
    ignored); a .jsonl / .json file holds ``{"text", "label"}`` records (a .json: one list).
    A label is a name or an integer, kept as its text ("spam", "1"). ``labels``: the class
    names a classifier knows; a record with another label is then an error. Errors are one
    line naming the file and the line (or record): a missing column, an empty text, a
    missing or unknown label.
    """
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        text = read_text(path).removeprefix("\ufeff")
        rows = _table_rows(path, text, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        rows = _file_rows(path, "labelled", "{\"text\", \"label\"} records (or a .csv / .tsv "
                                            "with text and label columns, such as "
                                            "data/sms_demo.tsv)")
    records = _each(lambda row: _labelled(row, labels), [row for _, row in rows], path,
                    [where for where, _ in rows])
    if not records:
        raise ValueError(f"{path} holds no records: put texts and their labels in it")
    return records


def _table_rows(path, text, delimiter):
    """(where, {"text", "label"}) of a CSV / TSV file's rows after its header."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    missing = [c for c in ("text", "label") if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path} has no {' and no '.join(map(repr, missing))} column (its "
                         f"header: {reader.fieldnames}); name the columns text and label in "
                         f"its first line")
    return [(f"line {reader.line_num}", {"text": row["text"], "label": row["label"]})
            for row in reader]




def _labelled(row, labels):
    """One checked {"text", "label"} record; ValueError says what is wrong with it."""
    if not isinstance(row, dict) or not {"text", "label"} <= set(row):
        raise ValueError(f"a record needs \"text\" and \"label\", got {_short(row)}")
    text, label = row["text"], row["label"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the text is empty ({_short(text)}); every record needs a text")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise ValueError(f"the label must be a name or an integer, got {_short(label)}")
    label = str(label).strip()
    if labels is not None and label not in labels:
        raise ValueError(f"label {label!r} is not one of the classifier's classes {labels}")
    return {"text": text, "label": label}


def label_names(records, name="the data"):
    """The class names of ``records``, in class order: by value when every label is an integer
    (0, 1, 2 ... keep their numbers), else alphabetically. One class only is an error."""
    names = sorted({r["label"] for r in records})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    if len(names) < 2:
        raise ValueError(f"{name} has one class only ({names}): a classifier needs texts of "
                         f"at least two labels")
    return names


def split_labelled(records, valid_fraction=0.1, seed=123, name="the data"):
    """``(train, valid)``, stratified: of each class, the ``valid_fraction`` share of its
    records (at least one) whose seeded hashes (split_records's) are lowest is held out, so
    both sides keep the classes' shares, the same on every run; identical records stay
    together. Each side keeps the file's order."""
    if isinstance(valid_fraction, bool) or not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be a number strictly between 0 and 1, got "
                         f"{valid_fraction!r}")
    held = set()
    for label in sorted({r["label"] for r in records}):
        of_class = sorted((r for r in records if r["label"] == label),
                          key=lambda r: _hash_fraction(seed, r))
        cut = _hash_fraction(seed, of_class[max(1, round(valid_fraction * len(of_class))) - 1])
        chosen = [r for r in of_class if _hash_fraction(seed, r) <= cut]
        if len(chosen) == len(of_class):
            raise ValueError(f"{name}: class {label!r} has {len(of_class)} distinct record(s): "
                             f"give each class at least 2, one for training and one for "
                             f"validation")
        held.update(map(id, chosen))
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


# The SMS Spam Collection v.1 (Almeida, Gomez Hidalgo and Yamakami 2011; UCI ML Repository,
# CC BY 4.0): 5,574 messages, 4,827 ham and 747 spam, as its authors' page and UCI's list
# them. The sha256 published for it (Hugging Face datasets' sms_spam: 203,415 bytes,
# 1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3; also in Julia's
# MLDatasets) is of the zip at UCI's former address; the address below serves a repackaged
# zip, and no size or hash of that one is published. So what the zip holds is checked
# instead: every line "ham" or "spam", a tab and a message, in exactly those numbers.
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_MEMBER = "SMSSpamCollection"
SMS_SPAM_COUNTS = {"ham": 4827, "spam": 747}


def fetch_sms_spam(folder="data", url=SMS_SPAM_URL):
    """``folder/sms_spam.tsv``: the SMS Spam Collection as a TSV with a header (label, text),
    made once from UCI's zip (``url``: it or a mirror of it), which is kept beside it and
    checked first (SMS_SPAM_COUNTS); a zip that fails the check is deleted."""
    out, archive = Path(folder) / "sms_spam.tsv", Path(folder) / "sms_spam_collection.zip"
    if out.is_file():
        return out
    download_file(url, archive, mirror_flag="--url")
    try:
        rows = _sms_rows(archive)
    except ValueError as e:
        archive.unlink(missing_ok=True)
        raise ValueError(f"{url} did not give the SMS Spam Collection ({e}); the zip was "
                         f"deleted: try again, or another copy of it with --url") from None
    return write_labelled_tsv(out, rows)


def write_labelled_tsv(path, rows):
    """``path``, written atomically: a TSV with a header (label, text) and ``rows``, the
    (label, text) pairs, as read_labelled reads it."""
    table = io.StringIO(newline="")
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerows([("label", "text"), *rows])
    return atomic_write(path, lambda f: f.write(table.getvalue().encode("utf-8")))


def _sms_rows(archive):
    """[(label, message), ...] of the collection's zip, after checking what it holds."""
    try:
        with zipfile.ZipFile(archive) as z:
            data = z.read(SMS_SPAM_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"not a zip holding {SMS_SPAM_MEMBER}: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    rows = [tuple(line.rstrip("\r").split("\t", 1)) for line in text.split("\n") if line.strip()]
    counts = {label: sum(r[0] == label for r in rows) for label in SMS_SPAM_COUNTS}
    if counts != SMS_SPAM_COUNTS or len(rows) != sum(counts.values()) or any(
            len(r) != 2 or not r[1].strip() for r in rows):
        raise ValueError(f"{SMS_SPAM_MEMBER} has {len(rows)} lines, {counts}; the collection "
                         f"has {sum(SMS_SPAM_COUNTS.values())}, {SMS_SPAM_COUNTS}, each a label, "
                         f"a tab and a message")
    return rows


# ---------------------------------------------------------------------------------------------
# Preference pairs: DPO's data (train_utils.dpo_objective)
# ---------------------------------------------------------------------------------------------

def read_preferences(path):
    """The preference records of a .json list or a .jsonl file, each one checked: a prompt and
    two answers to it, the one preferred and the one not,

        {"prompt": str, "chosen": str, "rejected": str}
        {"instruction": str, "input": str (optional), "chosen": str, "rejected": str}

    (the second: the book's preference data, Alpaca's fields). Errors name the file and the
    record's line (JSONL) or index."""
    rows = _file_rows(path, "preference", "{\"prompt\", \"chosen\", \"rejected\"} records, "
                                        "such as data/preferences.jsonl")
    return check_preferences([r for _, r in rows], str(path), [w for w, _ in rows])


def check_preferences(records, name="records", lines=None):
    """Check every preference record; the first bad one raises ValueError naming ``name``
    and its place (``lines[i]``, or its index)."""
    if not records:
        raise ValueError(f"{name} holds no records: a preference set needs at least one "
                         f"{{\"prompt\", \"chosen\", \"rejected\"}} record")
    _each(_check_preference, records, name, lines)
    return records


def _check_preference(record):
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {_short(record)}")
    prompt = "prompt" if "prompt" in record else "instruction"
    for key in (prompt, "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"it has no \"{key}\" (a preference record holds \"prompt\" (or "
                             f"\"instruction\"), \"chosen\" and \"rejected\"); its keys are "
                             f"{sorted(record)}")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"\"{key}\" must be a non-empty string, got {_short(record[key])}")
    if not isinstance(record.get("input", ""), str):
        raise ValueError(f"\"input\" must be a string, got {_short(record['input'])}")
    if record["chosen"] == record["rejected"]:
        raise ValueError("\"chosen\" and \"rejected\" are the same answer: a pair must prefer "
                         "one answer to another")


def load_preferences(records, name=None):
    """``records`` checked, or read from ``records`` when it is a path (read_preferences)."""
    if isinstance(records, (str, os.PathLike)):
        return read_preferences(records)
    return check_preferences(records, name or "records")
