"""The samples ``--calibration SOURCE`` names, as token ids: a text, JSON Lines, JSON, CSV or Parquet file, a folder
of them, or a Hub dataset (``org/name[@revision]``: one split's files, ``hub.dataset``), tokenized by the model's
tokenizer.

A text file's samples are its paragraphs (blank lines between them), or its lines where it has no blank line. A
record's sample is its ``column``, else the first of ``messages``, ``conversations``, ``text``, ``prompt`` (with
``completion``: TRL's prompt-completion form, one text or one conversation) and ``content`` it holds. Messages are
rendered by the tokenizer's chat template, which holds the special tokens; where it has none, their contents are
joined by newlines and read as text. Text is tokenized with the tokenizer's special tokens (BOS). Each sample is
cut to ``max_length`` tokens; empty ones are skipped and the first ``samples`` others taken, in the source's order:
reading, and downloading, stops there.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib
import io
import json
import lzma
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from ..errors import InputNotFoundError, InvalidOptionError, LorasurgeonError, UnsupportedError
from ..hub.dataset import open_split, split_files
from ..hub.source import REPO_ID, did_you_mean
from ..words import plural

FIELDS = ("messages", "conversations", "text", "prompt", "content")  # a record's sample, the first it holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_FORMATS = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "json", "csv": "csv", "tsv": "tsv", "parquet": "parquet"}
_UNREADABLE = frozenset({"arrow", "tar", "h5", "hdf5", "lance", "eval", "zip", "zst", "lz4"})
_OPENERS: dict[str, Callable[..., IO[str]]] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ShareGPT's "from"s

Piece = str | list[dict[str, Any]]  # a sample before tokenization: its text, or its conversation
Files = list[tuple[str, Callable[[], Path]]]  # each file's name (for messages) and how to have it on disk


@dataclass(frozen=True)
class Samples:
    """The calibration samples as token ids (each 1 to max_length long, in the source's order), and one line
    saying what was read and how."""

    ids: list[list[int]]
    source: str  # e.g. "prompts.jsonl: the first 16 records (messages, the model's chat template), 1,234 tokens"

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.ids)


@dataclass(frozen=True)
class _Record:
    """One record (a dict, or a text) and where it is, for messages: ``prompts.jsonl line 3``."""

    where: str
    value: Any
    unit: str = "record"  # what the source's samples are called: record, paragraph, line


def read_samples(
    source: str | os.PathLike[str],
    tokenizer_dir: Path,
    *,
    samples: int = 128,
    max_length: int = 512,
    split: str = "train",
    column: str | None = None,
) -> Samples:
    """The first ``samples`` non-empty samples of ``source`` (a file, a folder, a Hub dataset id), tokenized by
    the tokenizer in ``tokenizer_dir``, each cut to ``max_length`` tokens.

    Raises:
        InvalidOptionError: a bad option value, a column no record has, a record with no sample, unreadable data.
        InputNotFoundError: no such file, folder, dataset or split (the splits it has named); no tokenizer.
        UnsupportedError: a format it cannot read; pyarrow (Parquet) or transformers missing.
        LorasurgeonError: the Hub refused or could not be reached; the tokenizer cannot be loaded.
    """
    _check_options(source, samples, max_length, split, column)
    folder = Path(tokenizer_dir)
    folder = folder.parent if folder.is_file() else folder
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputNotFoundError(
            f"{folder}: no tokenizer beside the model (tokenizer.json, tokenizer_config.json): the calibration text "
            "cannot be tokenized"
        )
    label, files = _locate(source, split)
    tokenizer = load_tokenizer(folder)
    records = (r for name, path in files for r in _read_file(path(), name, column))
    return _take(records, tokenizer, label, samples=samples, max_length=max_length, column=column)


def _check_options(
    source: str | os.PathLike[str], samples: int, max_length: int, split: str, column: str | None
) -> None:
    """Each option a value that can be used, or refused by its name."""
    if not str(os.fspath(source)).strip():
        raise InvalidOptionError("--calibration needs a text or JSONL file, or a Hub dataset id")
    for flag, value in (("--calibration-samples", samples), ("--max-length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOptionError(f"{flag} must be a whole number of at least 1, not {value!r}")
    if not isinstance(split, str) or not split.strip():
        raise InvalidOptionError(f"--calibration-split must name a split (train, validation, test, ...), not {split!r}")
    if column is not None and (not isinstance(column, str) or not column.strip()):
        raise InvalidOptionError(f"--calibration-column must name a field of the records, not {column!r}")


def load_tokenizer(folder: Path) -> Any:
    """transformers' tokenizer from ``folder`` (local files only).

    Raises:
        UnsupportedError: transformers is not installed.
        LorasurgeonError: the files there cannot be loaded as a tokenizer.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UnsupportedError(
            "--calibration tokenizes its samples with transformers: pip install transformers"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # whatever the tokenizer's class raises on files it cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LorasurgeonError(
            f"{folder}: the tokenizer cannot be loaded, so the calibration text cannot be tokenized "
            f"({type(exc).__name__}: {first})"
        ) from None


def _locate(source: str | os.PathLike[str], split: str) -> tuple[str, Files]:
    """The source's label (for the report) and its files, in order: a local file, a local folder's split, or a
    Hub dataset's split (downloaded when read); a mistyped local path is refused, never sent to the Hub."""
    spec = os.fspath(source)
    path = Path(spec).expanduser()
    if path.is_file():
        return spec, [(spec, lambda: path)]
    if path.is_dir():
        found = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
        chosen = split_files(found, split, spec)
        return f"{spec}, split {split}", [(str(path / f), partial(Path, path / f)) for f in chosen]
    if path.exists():
        raise InvalidOptionError(f"--calibration {spec}: not a file or a folder")
    match = REPO_ID.match(spec)
    if not match or Path(spec.split("/", 1)[0]).exists():
        raise InputNotFoundError(f"--calibration {spec}: no such file or folder{did_you_mean(path)}")
    dataset = open_split(match.group("repo"), match.group("rev"), split)
    return f"{dataset.name}, split {split}", [(f"{dataset.name} {f}", partial(dataset.fetch, f)) for f in dataset.files]


def _format(name: str) -> tuple[str, str | None]:
    """A file's format (jsonl, json, csv, tsv, parquet; text for any other) and compression, by its name.

    Raises:
        UnsupportedError: a format or compression it does not read (Arrow, WebDataset tar, zip, zstd, ...).
    """
    suffixes = Path(name).name.lower().split(".")[1:]
    compression = suffixes.pop() if suffixes and suffixes[-1] in (*_OPENERS, *_UNREADABLE) else None
    ext = suffixes[-1] if suffixes else ""
    for unread in (compression, ext):
        if unread in _UNREADABLE:
            raise UnsupportedError(
                f"--calibration {name}: .{unread} files are not read (text, JSON Lines, JSON, CSV, TSV or Parquet, "
                "gzip, bzip2 or xz compressed)"
            )
    return _FORMATS.get(ext, "text"), compression


def _open_text(path: Path, compression: str | None, newline: str | None = None) -> IO[str]:
    opener: Callable[..., IO[str]] = _OPENERS[compression] if compression else open
    return opener(path, "rt", encoding="utf-8-sig", newline=newline)


def _read_file(path: Path, name: str, column: str | None) -> Iterator[_Record]:
    """The records of one file, in order (its sample in each still to be found).

    Raises:
        InvalidOptionError: the file is not what its name says (JSON, CSV, UTF-8 text), with the line.
    """
    fmt, compression = _format(name)
    if fmt == "parquet":
        yield from _parquet_records(path, name, column)
        return
    if fmt == "text" and column is not None:
        raise InvalidOptionError(
            f"--calibration-column {column}: {name} is plain text, not records (JSON Lines, JSON, CSV or Parquet)"
        )
    try:
        if fmt == "text":
            yield from _text_records(path, name, compression)
            return
        with _open_text(path, compression, newline="" if fmt in ("csv", "tsv") else None) as f:
            if fmt == "jsonl":
                yield from _jsonl_records(f, name)
            elif fmt == "json":
                yield from _json_records(f.read(), name, column)
            else:
                yield from _csv_records(f, name, "\t" if fmt == "tsv" else ",")
    except UnicodeDecodeError as exc:
        raise InvalidOptionError(f"--calibration {name}: not UTF-8 text (byte {exc.start} of a line)") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise InvalidOptionError(f"--calibration {name}: cannot be read ({type(exc).__name__}: {exc})") from None


def _paragraphs(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """Runs of non-blank lines, joined by newlines, with their first line's number."""
    group: list[str] = []
    start = 0
    for n, line in enumerate(lines, 1):
        if line.strip():
            start = start if group else n
            group.append(line.rstrip("\n"))
        elif group:
            yield start, "\n".join(group)
            group = []
    if group:
        yield start, "\n".join(group)


def _text_records(path: Path, name: str, compression: str | None) -> Iterator[_Record]:
    """A text file's paragraphs, or its non-blank lines where it has a single paragraph."""
    with _open_text(path, compression) as f:
        runs = _paragraphs(f)
        by_paragraph = next(runs, None) is not None and next(runs, None) is not None
    with _open_text(path, compression) as f:
        if by_paragraph:
            for n, text in _paragraphs(f):
                yield _Record(f"{name} line {n}", text, "paragraph")
        else:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _Record(f"{name} line {n}", line.rstrip("\n"), "line")


def _jsonl_records(lines: Iterable[str], name: str) -> Iterator[_Record]:
    """One JSON value a line (blank lines skipped)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidOptionError(
                f"--calibration {name}: line {n} is not JSON ({exc.msg}, column {exc.colno})"
            ) from None
        yield _Record(f"{name} line {n}", value)


def _json_records(text: str, name: str, column: str | None) -> Iterator[_Record]:
    """A JSON list of records, an object holding one list of them, or one record; JSON Lines under a .json name
    (as datasets reads them) too."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a value, then more: one a line
            yield from _jsonl_records(io.StringIO(text), name)
            return
        raise InvalidOptionError(
            f"--calibration {name}: line {exc.lineno} is not JSON ({exc.msg}, column {exc.colno})"
        ) from None
    if isinstance(doc, dict) and not any(k in doc for k in (column, *FIELDS) if k is not None):
        lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(lists) != 1:
            raise InvalidOptionError(
                f"--calibration {name}: an object with {'no' if not lists else 'more than one'} list of records "
                f"(its keys: {', '.join(map(str, doc)) or 'none'}); give a list of records, or one a line (JSON Lines)"
            )
        doc = doc[lists[0]]
    for n, value in enumerate(doc if isinstance(doc, list) else [doc], 1):
        yield _Record(f"{name} record {n}", value)


def _csv_records(f: IO[str], name: str, delimiter: str) -> Iterator[_Record]:
    """One record a row, named by the header row."""
    reader = csv.DictReader(f, delimiter=delimiter)
    try:
        for row in reader:
            yield _Record(f"{name} line {reader.line_num}", {k: v for k, v in row.items() if k is not None})
    except csv.Error as exc:
        raise InvalidOptionError(f"--calibration {name}: line {reader.line_num} is not CSV ({exc})") from None


def _parquet_records(path: Path, name: str, column: str | None) -> Iterator[_Record]:
    """A Parquet file's rows, in batches, only the columns a sample is taken from read."""
    try:
        pq = importlib.import_module("pyarrow.parquet")  # untyped: Any to the type checker
    except ImportError:
        raise UnsupportedError(f"--calibration {name}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        names = list(table.schema_arrow.names)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidOptionError(f"--calibration {name}: not a Parquet file ({first})") from None
    if column is not None and column not in names:
        raise InvalidOptionError(
            f"--calibration-column {column}: {name} has no such column (it has: {', '.join(names)})"
        )
    field = column or next((f for f in FIELDS if f in names), None)
    if field is None:
        raise InvalidOptionError(
            f"--calibration {name}: no {', '.join(FIELDS)} column (it has: {', '.join(names)}); name the one to use "
            "with --calibration-column"
        )
    columns = [field, "completion"] if field == "prompt" and column is None and "completion" in names else [field]
    n = 0
    for batch in table.iter_batches(batch_size=64, columns=columns):
        for row in batch.to_pylist():
            n += 1
            yield _Record(f"{name} row {n}", row)


def _piece(record: _Record, column: str | None) -> tuple[str, Piece]:
    """A record's sample: the field it comes from (for the report) and its text or conversation.

    Raises:
        InvalidOptionError: no such column in the record (its fields named), no field a sample is taken from, or
            one that holds neither text nor messages.
    """
    value = record.value
    if isinstance(value, str):
        return "plain text" if record.unit != "record" else "text", value
    if not isinstance(value, dict):
        raise InvalidOptionError(
            f"--calibration {record.where}: a record is {_what(value)}, not an object with its text or messages"
        )
    fields = ", ".join(map(str, value)) or "none"
    if column is not None:
        if column not in value:
            raise InvalidOptionError(
                f"--calibration-column {column}: {record.where} has no such field (it has: {fields})"
            )
        return column, _content(value[column], column, record.where)
    present = [f for f in FIELDS if f in value]
    if not present:
        raise InvalidOptionError(
            f"--calibration {record.where}: no {', '.join(FIELDS)} field (it has: {fields}); name the one to use with "
            "--calibration-column"
        )
    field = next((f for f in present if value[f] is not None), present[0])
    if field == "prompt" and value.get("completion") is not None:
        return "prompt + completion", _prompt_completion(value["prompt"], value["completion"], record.where)
    return field, _content(value[field], field, record.where)


def _content(value: Any, field: str, where: str) -> Piece:
    """A field's text (a list of texts joined by newlines) or conversation; None is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [_message(m, f"{field}[{i}]", where) for i, m in enumerate(value)]
    raise InvalidOptionError(f"--calibration {where}: {field} holds {_what(value)}, not text or messages")


def _message(message: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """A message as chat templates take it: a role and its content (ShareGPT's from/value renamed)."""
    if "role" in message and "content" in message:
        return message
    if "from" in message and "value" in message:
        return {"role": _ROLES.get(message["from"], message["from"]), "content": message["value"]}
    raise InvalidOptionError(
        f"--calibration {where}: {name} is not a message, a role and its content (it has: "
        f"{', '.join(map(str, message)) or 'nothing'})"
    )


def _prompt_completion(prompt: Any, completion: Any, where: str) -> Piece:
    """TRL's prompt-completion record as one sample: the texts concatenated, or the conversations one."""
    p, c = _content(prompt, "prompt", where), _content(completion, "completion", where)
    if isinstance(p, str) and isinstance(c, str):
        return p + c
    if isinstance(p, list) and isinstance(c, list):
        return p + c
    raise InvalidOptionError(
        f"--calibration {where}: one of prompt and completion is text, the other messages (TRL's forms have both "
        "of one kind)"
    )


def _what(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a text", bool: "true or false"}.get(
        type(value), type(value).__name__
    )


def _text_of(content: Any) -> str:
    """A message's content as text: itself, or its text parts (a multimodal message's) joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p if isinstance(p, str) else p.get("text") for p in content if isinstance(p, str | dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return "" if content is None else str(content)


def _encode(tokenizer: Any, piece: Piece, chat: bool, where: str) -> list[int]:
    """The token ids of a sample (none for an empty one): a text with the tokenizer's special tokens, a
    conversation rendered by its chat template (which holds them), or its contents joined by newlines."""
    if isinstance(piece, str):
        text, special = piece, True
    else:
        text, special = "\n".join(_text_of(m.get("content")) for m in piece), True
        if text.strip() and chat:
            try:
                text, special = tokenizer.apply_chat_template(piece, tokenize=False), False
            except Exception as exc:  # the template's own refusals (raise_exception), jinja's errors
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InvalidOptionError(
                    f"--calibration {where}: the model's chat template cannot render these messages ({first})"
                ) from None
    if not text.strip():
        return []
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _take(
    records: Iterator[_Record], tokenizer: Any, label: str, *, samples: int, max_length: int, column: str | None
) -> Samples:
    """The first ``samples`` non-empty samples of ``records``, tokenized and cut to ``max_length``; the line
    that says what they are.

    Raises:
        InvalidOptionError: the source holds no sample.
    """
    chat = getattr(tokenizer, "chat_template", None) is not None
    ids: list[list[int]] = []
    kinds: dict[str, None] = {}
    unit, cut, empty, exhausted = "record", 0, 0, True
    for record in records:
        field, piece = _piece(record, column)
        sample = _encode(tokenizer, piece, chat, record.where)
        if not sample:
            empty += 1
            continue
        unit = record.unit if not ids else unit
        kinds[_how(field, piece, chat)] = None
        cut += len(sample) > max_length
        ids.append(sample[:max_length])
        if len(ids) == samples:
            exhausted = False
            break
    if not ids:
        what = f"its {plural(empty, unit)} are empty" if empty else "it holds nothing"
        raise InvalidOptionError(f"--calibration {label}: no sample to calibrate on ({what})")
    count = plural(len(ids), unit)
    extent = f"the first {count}" if not exhausted else f"all {count}" if len(ids) > 1 else f"its one {unit}"
    if exhausted and len(ids) < samples:
        extent += f", fewer than the {samples:,} asked for"
    notes = (f", {cut:,} cut to {max_length:,} tokens" if cut else "") + (f", {empty:,} empty skipped" if empty else "")
    tokens = sum(len(s) for s in ids)
    return Samples(ids, f"{label}: {extent} ({'; '.join(kinds)}), {plural(tokens, 'token')}{notes}")


def _how(field: str, piece: Piece, chat: bool) -> str:
    """How a sample was made, for the report: its field, and for a conversation the template or its absence."""
    if isinstance(piece, str):
        return field
    if chat:
        return f"{field}, the model's chat template"
    return f"{field}, no chat template: contents joined by newlines"
