"""Format detection, parsing and chunking for imported sources.

A downloaded source becomes one or more ``SourceDocument``s, each with a lazy stream of
``Item``s (future memories) and ``Skip``s (things passed over, reported in the job result).
Everything here streams or is size-capped, so memory stays flat in the size of the source,
and nothing here knows about the database, HTTP or Celery.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import json
import lzma
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import IO, Any

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError

FORMATS = ("pdf", "text", "markdown", "html", "json", "jsonl", "csv", "zip", "tar")
ARCHIVE_FORMATS = ("zip", "tar")

_BLOCK = 64 * 1024
# JSON arrays are parsed whole; past this size JSONL is the streaming alternative.
_MAX_JSON_BYTES = 50 * 1024 * 1024
_MAX_MANIFEST_BYTES = 1024 * 1024
# Small members compress far better than any sane ratio (a page of spaces, say), and are
# harmless whatever their ratio, so the ratio limit applies only above this size.
_RATIO_FLOOR = 1024 * 1024
# Title hunting reads only the start of a file; a title after this is not worth a pass.
_TITLE_SCAN_BYTES = 256 * 1024

_CONTENT_TYPES = {
    "pdf": "application/pdf",
    "text": "text/plain",
    "markdown": "text/markdown",
    "html": "text/html",
    "json": "application/json",
    "jsonl": "application/jsonl",
    "csv": "text/csv",
    "zip": "application/zip",
    "tar": "application/x-tar",
}

_ALIASES = {
    "txt": "text",
    "plain": "text",
    "md": "markdown",
    "htm": "html",
    "ndjson": "jsonl",
    "tar.gz": "tar",
    "tgz": "tar",
}

_MIME_FORMATS = {
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/json": "json",
    "text/json": "json",
    "application/jsonl": "jsonl",
    "application/x-jsonl": "jsonl",
    "application/jsonlines": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/x-ndjson": "jsonl",
    "text/csv": "csv",
    "application/csv": "csv",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/x-tar": "tar",
    "application/x-gtar": "tar",
}

_EXTENSION_FORMATS = {
    ".pdf": "pdf",
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".mdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".zip": "zip",
    ".tar": "tar",
    ".tgz": "tar",
    ".tbz2": "tar",
    ".txz": "tar",
}
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz")
# ZIP containers that are documents, not archives of documents: importing their XML
# parts as memories would be noise, so they are refused with a clear message.
_ZIP_DOCUMENT_SUFFIXES = (".docx", ".xlsx", ".pptx", ".odt", ".ods", ".odp", ".epub", ".jar")

_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class FormatError(Exception):
    """A source that cannot be imported; ``message`` is one sentence for the API client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_pages: int = 2000
    max_line_bytes: int = 1_000_000
    max_archive_members: int = 1000
    max_uncompressed_bytes: int = 500_000_000
    max_compression_ratio: float = 200.0
    max_csv_columns: int = 1000


DEFAULT_LIMITS = Limits()


@dataclass
class Item:
    """One future memory."""

    content: str
    page: int | None = None
    importance: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass
class Skip:
    """Something passed over, e.g. ``Skip("line is not valid JSON", "memories.jsonl:17")``."""

    reason: str
    where: str


@dataclass
class SourceDocument:
    name: str
    fmt: str
    content_type: str
    title: str | None
    bytes: int
    sha256: str
    pages: int | None
    items: Iterator[Item | Skip]


class Documents(Iterator[SourceDocument]):
    """The documents of one source, produced as the caller iterates.

    Archive members that are passed over (nested archives, unsupported or broken files)
    are not documents; they collect in ``skipped`` as iteration goes. A document's
    ``items`` must be consumed before asking for the next document: an archive member's
    file is deleted as soon as the iteration moves on.
    """

    def __init__(self, documents: Iterator[SourceDocument], skipped: list[Skip]) -> None:
        self._documents = documents
        self.skipped = skipped

    def __next__(self) -> SourceDocument:
        return next(self._documents)

    def close(self) -> None:
        """Stop early and remove temporary files now rather than when collected."""
        close = getattr(self._documents, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class _Options:
    chunk_size: int
    chunk_overlap: int
    password: str | None
    limits: Limits


class _Progress:
    """Forwards a monotonic fraction of the work, without flooding the callback."""

    def __init__(self, callback: Callable[[float], None] | None) -> None:
        self._callback = callback
        self._last = 0.0

    def __call__(self, fraction: float) -> None:
        if self._callback is None:
            return
        fraction = min(1.0, max(fraction, self._last))
        if fraction - self._last >= 0.001 or (fraction == 1.0 and self._last < 1.0):
            self._last = fraction
            self._callback(fraction)


Report = Callable[[float], None]


# ---------------------------------------------------------------------------------------
# Format detection


def detect_format(
    path: str,
    *,
    declared: str | None = None,
    content_type: str | None = None,
    filename: str | None = None,
) -> str:
    """Name the format of the file at ``path``, one of ``FORMATS``.

    A declared format wins; then magic bytes, the content type, the file name's extension,
    and last a look at the first bytes.
    """
    if declared:
        fmt = declared.strip().lower()
        fmt = _ALIASES.get(fmt, fmt)
        if fmt not in FORMATS:
            raise FormatError(
                "unsupported_format",
                f"The format {declared!r} is not supported; use one of {', '.join(FORMATS)}.",
            )
        return fmt

    with open(path, "rb") as f:
        head = f.read(_BLOCK)
    if not head:
        raise FormatError("empty_file", "The source is empty.")
    name = (filename or os.path.basename(path)).strip().lower()

    fmt = _format_from_magic(path, head)
    if fmt == "zip" and name.endswith(_ZIP_DOCUMENT_SUFFIXES):
        raise FormatError(
            "unsupported_format",
            "Office documents and e-books are not supported; export them to PDF first.",
        )
    if fmt:
        return fmt

    mime = (content_type or "").split(";")[0].strip().lower()
    fmt = _MIME_FORMATS.get(mime) or _format_from_name(name)
    if fmt in ("pdf", "zip", "tar"):
        # A container without its magic bytes: let its parser say how it is damaged.
        return fmt
    if b"\x00" in head and not head.startswith(_UTF16_BOMS):
        raise FormatError(
            "unsupported_format",
            "The source is a binary file of a kind that cannot be imported; supported are "
            "PDF, text, Markdown, HTML, JSON, JSONL, CSV, ZIP and tar.",
        )
    text = _decode_head(head)
    if fmt == "json":
        return _json_or_jsonl(text)
    if fmt:
        return fmt
    return _sniff_text(text)


def _format_from_magic(path: str, head: bytes) -> str | None:
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _is_tar_header(head):
        return "tar"
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            try:
                with opener(path, "rb") as f:
                    inner = f.read(512)
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise FormatError(
                    "corrupt_archive", "The compressed file is damaged or incomplete."
                ) from exc
            if _is_tar_header(inner):
                return "tar"
            raise FormatError(
                "unsupported_format",
                "The source is a compressed file that is not a tar archive; only tar archives "
                "(.tar.gz, .tar.bz2, .tar.xz) and ZIP are supported.",
            )
    return None


_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _is_tar_header(block: bytes) -> bool:
    return len(block) >= 262 and block[257:262] == b"ustar"


def _format_from_name(name: str) -> str | None:
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    return _EXTENSION_FORMATS.get(os.path.splitext(name)[1])


def _decode_head(head: bytes) -> str:
    for bom, codec in (
        (_UTF8_BOM, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if head.startswith(bom):
            return head[len(bom) :].decode(codec, "replace")
    return head.decode("utf-8", "replace")


def _json_or_jsonl(text: str) -> str:
    first_line = text.lstrip().split("\n", 1)[0].strip()
    if first_line.startswith("{"):
        try:
            obj = json.loads(first_line)
        except ValueError:
            return "json"
        if isinstance(obj, dict) and "memories" not in obj:
            return "jsonl"
    return "json"


def _sniff_text(text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return "json"
    if stripped.startswith("{"):
        return _json_or_jsonl(stripped)
    lowered = stripped[:4096].lower()
    if stripped.startswith("<") and re.search(r"<(!doctype html|html|head|body)[\s>]", lowered):
        return "html"
    if re.match(r"#{1,6} \S", stripped):
        return "markdown"
    return "text"


# ---------------------------------------------------------------------------------------
# Chunking

# A sentence ends at . ! or ? (and any closing quotes or brackets); group 1 is the gap.
_SENTENCE_GAP = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s+)")
_WORD_GAP = re.compile(r"(\s+)")
_GAPS = (_SENTENCE_GAP, _WORD_GAP)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n\s*")


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Split ``text`` into chunks of at most ``size`` characters.

    Paragraphs are kept whole when they fit, then sentences, then words; a word longer
    than ``size`` is cut. Each chunk after the first starts with up to ``overlap``
    characters (whole words where possible) from the end of the chunk before it.
    """
    chunker = _Chunker(size, overlap)
    chunks: list[str] = []
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    for paragraph in _PARAGRAPH_BREAK.split(normalized):
        paragraph = paragraph.strip()
        if paragraph:
            chunks.extend(chunker.add(paragraph))
    chunks.extend(chunker.finish())
    return chunks


def _check_chunking(size: int, overlap: int) -> None:
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    if overlap < 0 or overlap >= size:
        raise ValueError("chunk overlap must be at least 0 and smaller than the chunk size")


def _pieces(text: str, size: int, level: int = 0) -> Iterator[tuple[str, str]]:
    """Yield ``(gap, piece)`` pairs that concatenate back to ``text``, pieces <= size."""
    if len(text) <= size:
        yield "", text
        return
    if level == len(_GAPS):
        for start in range(0, len(text), size):
            yield "", text[start : start + size]
        return
    gap, start = "", 0
    for match in _GAPS[level].finditer(text):
        gap_start, gap_end = match.span(1)
        yield from _with_gap(gap, _pieces(text[start:gap_start], size, level + 1))
        gap, start = text[gap_start:gap_end], gap_end
    yield from _with_gap(gap, _pieces(text[start:], size, level + 1))


def _with_gap(gap: str, pieces: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    for index, (inner_gap, piece) in enumerate(pieces):
        yield (gap if index == 0 else inner_gap), piece


def _tail(text: str, limit: int) -> str:
    """The whole words at the end of ``text`` that fit in ``limit`` characters."""
    if limit <= 0:
        return ""
    start = max(0, len(text) - limit)
    if start > 0 and not text[start - 1].isspace() and not text[start].isspace():
        match = re.search(r"\s", text[start:])
        if match is None:
            return ""  # a word fragment would read as a different word
        start += match.end()
    return text[start:].lstrip()


class _Chunker:
    """Packs paragraphs into chunks incrementally, so a source never has to be whole."""

    def __init__(self, size: int, overlap: int) -> None:
        _check_chunking(size, overlap)
        self.size = size
        self.overlap = overlap
        self._current = ""

    def add(self, paragraph: str) -> list[str]:
        done: list[str] = []
        for index, (gap, piece) in enumerate(_pieces(paragraph, self.size)):
            self._place("\n\n" if index == 0 else gap, piece, done)
        return done

    def finish(self) -> list[str]:
        last, self._current = self._current, ""
        return [last] if last else []

    def _place(self, gap: str, piece: str, done: list[str]) -> None:
        current = self._current
        if not current:
            self._current = piece
            return
        if len(current) + len(gap) + len(piece) <= self.size:
            self._current = current + gap + piece
            return
        done.append(current)
        tail = _tail(current, min(self.overlap, self.size - len(gap) - len(piece)))
        self._current = tail + gap + piece if tail else piece


class _Paragraphs:
    """Collects text into paragraphs; a paragraph longer than ``bound`` is cut at a space.

    The bound keeps memory flat on a source that never breaks a paragraph (one huge line).
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.collapse = False
        self._parts: list[str] = []
        self._length = 0
        self._ready: list[str] = []

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)
        if self._length > self.bound:
            buffer = "".join(self._parts)
            while len(buffer) > self.bound:
                cut = buffer.rfind("\n", 0, self.bound)
                if cut <= 0:
                    cut = max(buffer.rfind(" ", 0, self.bound), 0) or self.bound
                self._emit(buffer[:cut])
                buffer = buffer[cut:]
            self._parts, self._length = [buffer], len(buffer)

    def end(self) -> None:
        if self._parts:
            self._emit("".join(self._parts))
            self._parts, self._length = [], 0

    def take(self) -> list[str]:
        ready, self._ready = self._ready, []
        return ready

    def _emit(self, text: str) -> None:
        text = " ".join(text.split()) if self.collapse else text.strip()
        if text:
            self._ready.append(text)


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and PDF extraction produces them now and then.
    return text.replace("\x00", "")


# ---------------------------------------------------------------------------------------
# Documents


def iter_documents(
    path: str,
    fmt: str,
    *,
    name: str,
    chunk_size: int = 1000,
    chunk_overlap: int = 100,
    password: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    on_progress: Callable[[float], None] | None = None,
) -> Documents:
    """The documents in the file at ``path``: one for a plain file, one per archive member.

    Parsing happens while the caller iterates. ``on_progress`` receives the fraction
    (0..1) of the work done. ``FormatError`` (raised while iterating the documents or
    their items) means the source as a whole cannot be imported.
    """
    _check_chunking(chunk_size, chunk_overlap)
    if fmt not in FORMATS:
        raise FormatError("unsupported_format", f"The format {fmt!r} is not supported.")
    options = _Options(chunk_size, chunk_overlap, password, limits)
    skipped: list[Skip] = []
    report = _Progress(on_progress)
    if fmt in ARCHIVE_FORMATS:
        documents = _archive_documents(path, fmt, name, options, report, skipped)
    else:
        documents = _single_document(path, fmt, name, options, report)
    return Documents(documents, skipped)


def _single_document(
    path: str, fmt: str, name: str, options: _Options, report: Report
) -> Iterator[SourceDocument]:
    yield _open_document(path, fmt, name, options, report)


def _open_document(
    path: str, fmt: str, name: str, options: _Options, report: Report
) -> SourceDocument:
    """Check the file and describe it; its items are read later, on demand."""
    size = os.path.getsize(path)
    default_title = os.path.basename(name.rstrip("/")) or name
    if fmt == "pdf":
        return _open_pdf(path, name, size, default_title, options, report)

    encoding = None
    if fmt in ("text", "markdown", "html"):
        with open(path, "rb") as f:
            encoding = _text_encoding(f.read(4096), fmt)
    sha256, title = _scan(path, fmt, encoding)
    items: Iterator[Item | Skip]
    if fmt in ("text", "markdown"):
        items = _text_items(path, encoding or "utf-8", fmt == "markdown", options, report, size)
    elif fmt == "html":
        items = _html_items(path, encoding or "utf-8", options, report, size)
    elif fmt == "json":
        if size > _MAX_JSON_BYTES:
            raise FormatError(
                "json_too_large",
                f"The JSON file is larger than {_MAX_JSON_BYTES // (1024 * 1024)} MB; "
                "send the memories as JSONL, one per line, instead.",
            )
        items = _json_items(path, name, report)
    elif fmt == "jsonl":
        _refuse_utf16(path, "JSONL")
        items = _jsonl_items(path, name, options.limits, report, size)
    elif fmt == "csv":
        _refuse_utf16(path, "CSV")
        columns = _csv_columns(path, options.limits)
        items = _csv_items(path, name, columns, options.limits, report, size)
    else:
        raise FormatError("unsupported_format", f"The format {fmt!r} is not a document format.")
    return SourceDocument(
        name=name,
        fmt=fmt,
        content_type=_CONTENT_TYPES[fmt],
        title=title or default_title,
        bytes=size,
        sha256=sha256,
        pages=None,
        items=items,
    )


def _text_encoding(head: bytes, fmt: str) -> str:
    if head.startswith(_UTF8_BOM):
        return "utf-8-sig"
    if head.startswith(_UTF16_BOMS):
        return "utf-16"
    if fmt == "html":
        declared = _html_charset(head)
        if declared:
            return declared
    return "utf-8"


def _html_charset(head: bytes) -> str | None:
    match = re.search(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", head, re.I)
    if not match:
        return None
    try:
        name = codecs.lookup(match.group(1).decode("ascii")).name
    except LookupError:
        return None
    # A page that could announce its charset in ASCII is not UTF-16 or UTF-32, whatever it
    # says; browsers read such a label as UTF-8 too.
    return None if name.startswith(("utf-16", "utf-32")) else name


def _refuse_utf16(path: str, label: str) -> None:
    with open(path, "rb") as f:
        if f.read(2) in _UTF16_BOMS:
            raise FormatError("invalid_encoding", f"The {label} file is UTF-16; send it as UTF-8.")


def _scan(path: str, fmt: str, encoding: str | None) -> tuple[str, str | None]:
    """Hash the file, check that it decodes, and find its title, in one pass.

    Decoding everything up front means a text file with a bad byte fails before any of
    its memories are written, instead of half-way through.
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder(encoding)("strict") if encoding else None
    finder: _TitleFinder | None = None
    if fmt == "markdown":
        finder = _MarkdownTitle()
    elif fmt == "html":
        finder = _HtmlText(None)
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            digest.update(block)
            if decoder is not None:
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    where = offset - pending + exc.start
                    raise FormatError(
                        "invalid_encoding",
                        f"The file is not valid {_encoding_label(encoding)} text "
                        f"(bad byte at offset {max(where, 0)}).",
                    ) from None
                if finder is not None and not finder.done:
                    finder.feed_title(text, final=not block)
                    if offset >= _TITLE_SCAN_BYTES:
                        finder.done = True
            if not block:
                break
            offset += len(block)
    return digest.hexdigest(), finder.title if finder else None


def _encoding_label(encoding: str | None) -> str:
    return {"utf-8": "UTF-8", "utf-8-sig": "UTF-8", "utf-16": "UTF-16"}.get(
        encoding or "", encoding or "UTF-8"
    )


class _TitleFinder:
    title: str | None = None
    done: bool = False

    def feed_title(self, text: str, final: bool) -> None:
        raise NotImplementedError


class _MarkdownTitle(_TitleFinder):
    _HEADING = re.compile(r"^ {0,3}# +(.+?)(?: +#+)? *$")

    def __init__(self) -> None:
        self._carry = ""
        self._fenced = False

    def feed_title(self, text: str, final: bool) -> None:
        lines = (self._carry + text).split("\n")
        self._carry = "" if final else lines.pop()
        for line in lines:
            line = line.rstrip("\r")
            if _is_fence(line):
                self._fenced = not self._fenced
                continue
            match = None if self._fenced else self._HEADING.match(line)
            if match:
                self.title = match.group(1).strip()
                self.done = True
                return


def _is_fence(line: str) -> bool:
    stripped = line.lstrip()
    return stripped.startswith("```") or stripped.startswith("~~~")


# ---------------------------------------------------------------------------------------
# PDF

_CORRUPT_PDF = "The PDF is damaged or incomplete and cannot be read."


def _open_pdf(
    path: str, name: str, size: int, default_title: str, options: _Options, report: Report
) -> SourceDocument:
    sha256 = _sha256_file(path)
    try:
        # strict: a truncated or garbled file must fail, not turn into a few stray words.
        reader = PdfReader(path, strict=True)
    except Exception as exc:  # pypdf raises many kinds, and RecursionError on deep nesting
        raise FormatError("corrupt_pdf", _CORRUPT_PDF) from exc
    if reader.is_encrypted:
        _decrypt(reader, options.password)
    try:
        pages = len(reader.pages)
    except Exception as exc:
        raise FormatError("corrupt_pdf", _CORRUPT_PDF) from exc
    if pages > options.limits.max_pages:
        raise FormatError(
            "too_many_pages",
            f"The PDF has {pages} pages, more than the limit of {options.limits.max_pages}.",
        )
    return SourceDocument(
        name=name,
        fmt="pdf",
        content_type=_CONTENT_TYPES["pdf"],
        title=_pdf_title(reader) or default_title,
        bytes=size,
        sha256=sha256,
        pages=pages,
        items=_pdf_items(reader, pages, name, options, report),
    )


def _decrypt(reader: PdfReader, password: str | None) -> None:
    # The empty password opens files that restrict only editing or printing.
    attempts = [password, ""] if password else [""]
    for attempt in attempts:
        try:
            if reader.decrypt(attempt) != PasswordType.NOT_DECRYPTED:
                return
        except DependencyError as exc:
            raise FormatError(
                "unsupported_pdf", "The PDF uses an encryption this server cannot open."
            ) from exc
        except Exception as exc:
            raise FormatError("corrupt_pdf", _CORRUPT_PDF) from exc
    if password is None:
        raise FormatError(
            "encrypted_pdf", "The PDF is encrypted; give its password in parameters.password."
        )
    raise FormatError(
        "wrong_password", "The password in parameters.password does not open the PDF."
    )


def _pdf_title(reader: PdfReader) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:
        return None
    title = _clean(str(title)).strip() if title else ""
    return title or None


def _pdf_items(
    reader: PdfReader, pages: int, name: str, options: _Options, report: Report
) -> Iterator[Item | Skip]:
    for index in range(pages):
        number = index + 1
        try:
            text = reader.pages[index].extract_text()
        except Exception:
            yield Skip("the text of this page could not be extracted", f"{name}:page {number}")
        else:
            for chunk in chunk_text(_clean(text or ""), options.chunk_size, options.chunk_overlap):
                yield Item(content=chunk, page=number, metadata={"page": number})
        report(number / pages)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Text, Markdown, HTML

_MARKDOWN_HEADING = re.compile(r" {0,3}#{1,6}(\s|$)")


def _chunk_items(chunker: _Chunker, paragraphs: list[str] | None) -> Iterator[Item]:
    """Items for the chunks these paragraphs complete; ``None`` flushes the last chunk."""
    if paragraphs is None:
        chunks = chunker.finish()
    else:
        chunks = [chunk for paragraph in paragraphs for chunk in chunker.add(paragraph)]
    for chunk in chunks:
        yield Item(content=chunk)


def _paragraph_bound(options: _Options) -> int:
    return max(_BLOCK, 4 * options.chunk_size)


def _text_items(
    path: str, encoding: str, markdown: bool, options: _Options, report: Report, size: int
) -> Iterator[Item | Skip]:
    chunker = _Chunker(options.chunk_size, options.chunk_overlap)
    paragraphs = _Paragraphs(_paragraph_bound(options))
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    carry = ""
    mid_line = False  # the carry was flushed early: the next text continues a line
    fenced = False
    consumed = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            consumed += len(block)
            lines = (carry + decoder.decode(block, final=not block)).split("\n")
            carry = lines.pop() if block else ""
            if not block and lines and lines[-1] == "":
                lines.pop()
            for line in lines:
                line = _clean(line.rstrip("\r"))
                if mid_line:
                    paragraphs.add(line + "\n")
                    mid_line = False
                elif markdown and _is_fence(line):
                    # A fenced code block stays one paragraph, blank lines and all.
                    if not fenced:
                        paragraphs.end()
                    paragraphs.add(line + "\n")
                    if fenced:
                        paragraphs.end()
                    fenced = not fenced
                elif fenced:
                    paragraphs.add(line + "\n")
                elif not line.strip():
                    paragraphs.end()
                elif markdown and _MARKDOWN_HEADING.match(line):
                    paragraphs.end()
                    paragraphs.add(line)
                    paragraphs.end()
                else:
                    paragraphs.add(line + "\n")
            if len(carry) > paragraphs.bound:
                paragraphs.add(_clean(carry))
                carry, mid_line = "", True
            if not block:
                paragraphs.end()
            yield from _chunk_items(chunker, paragraphs.take())
            report(consumed / size if size else 1.0)
            if not block:
                break
    yield from _chunk_items(chunker, None)


_HTML_DROP = frozenset({"script", "style", "noscript", "template"})
_HTML_BLOCKS = frozenset(
    "address article aside blockquote body br caption dd details dialog div dl dt fieldset "
    "figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section "
    "summary table tr ul".split()
)
_HTML_CELLS = frozenset({"td", "th"})


class _HtmlText(HTMLParser, _TitleFinder):
    """Text of an HTML page, split into paragraphs at block elements.

    With no paragraph sink it only looks for the title, which is how the first pass over
    a page finds it.
    """

    def __init__(self, paragraphs: _Paragraphs | None) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs = paragraphs
        self.title = None
        self.done = False
        self._dropped = 0
        self._in_title = False
        self._title_parts: list[str] = []
        self._pre = 0
        if paragraphs is not None:
            paragraphs.collapse = True

    def feed_title(self, text: str, final: bool) -> None:
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_DROP:
            self._dropped += 1
        elif tag == "title" and self.title is None:
            self._in_title = True
        elif tag in _HTML_CELLS and self.paragraphs is not None:
            self.paragraphs.add(" ")
        elif tag in _HTML_BLOCKS:
            self._break()
            if tag == "pre":
                self._pre += 1
                self._set_collapse()

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_DROP:
            self._dropped = max(0, self._dropped - 1)
        elif tag == "title" and self._in_title:
            self._in_title = False
            self.title = " ".join("".join(self._title_parts).split()) or None
            self.done = True
        elif tag in _HTML_BLOCKS:
            self._break()
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
                self._set_collapse()

    def handle_data(self, data: str) -> None:
        if self._dropped:
            return
        if self._in_title:
            self._title_parts.append(data)
        elif self.paragraphs is not None:
            self.paragraphs.add(_clean(data))

    def _break(self) -> None:
        if self.paragraphs is not None:
            self.paragraphs.end()

    def _set_collapse(self) -> None:
        if self.paragraphs is not None:
            self.paragraphs.collapse = self._pre == 0


def _html_items(
    path: str, encoding: str, options: _Options, report: Report, size: int
) -> Iterator[Item | Skip]:
    chunker = _Chunker(options.chunk_size, options.chunk_overlap)
    paragraphs = _Paragraphs(_paragraph_bound(options))
    parser = _HtmlText(paragraphs)
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    consumed = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            consumed += len(block)
            parser.feed(decoder.decode(block, final=not block))
            if not block:
                parser.close()
                paragraphs.end()
            yield from _chunk_items(chunker, paragraphs.take())
            report(consumed / size if size else 1.0)
            if not block:
                break
    yield from _chunk_items(chunker, None)


# ---------------------------------------------------------------------------------------
# JSON, JSONL, CSV: one memory per object or row, never chunked


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON, and PostgreSQL's jsonb refuses them.
    raise ValueError(f"{name} is not allowed")


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _importance(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("importance is not a number")
    if not 0.0 <= value <= 1.0:
        raise ValueError("importance is out of range")
    return float(value)


def _memory(obj: object) -> Item | str:
    """An item from a memory object, or the reason it cannot be one."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    content = obj.get("content")
    if not isinstance(content, str):
        return "content is missing or not a string"
    if not content.strip():
        return "content is empty"
    if "\x00" in content:
        return "content contains a NUL character"
    importance = None
    if obj.get("importance") is not None:
        try:
            importance = _importance(obj["importance"])
        except ValueError:
            return "importance must be a number from 0 to 1"
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        return "metadata must be a JSON object"
    else:
        metadata = dict(metadata)
    source_id = obj.get("id")
    if source_id is not None and "source_id" not in metadata:
        metadata["source_id"] = source_id
    created_at = None
    if obj.get("created_at") is not None:
        created_at = _parse_time(obj["created_at"])
        if created_at is None:
            return "created_at is not an ISO 8601 time"
    return Item(content=content, importance=importance, metadata=metadata, created_at=created_at)


def _json_items(path: str, name: str, report: Report) -> Iterator[Item | Skip]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        document = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise FormatError("invalid_encoding", "The JSON file is not valid UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise FormatError(
            "invalid_json", f"The file is not valid JSON ({exc.msg} at line {exc.lineno})."
        ) from None
    except ValueError as exc:
        raise FormatError("invalid_json", f"The file is not valid JSON ({exc}).") from None
    del raw
    if isinstance(document, dict) and isinstance(document.get("memories"), list):
        document = document["memories"]
    if not isinstance(document, list):
        raise FormatError(
            "invalid_json",
            'The JSON file must be an array of memories or an object with a "memories" array.',
        )
    total = len(document)
    for index, obj in enumerate(document):
        result = _memory(obj)
        yield result if isinstance(result, Item) else Skip(result, f"{name}[{index}]")
        report((index + 1) / total)
    report(1.0)


def _read_line(f: IO[bytes], limit: int) -> tuple[bytes, int, bool]:
    """One line of at most ``limit`` bytes (newline excluded) without reading more.

    Returns the line, the bytes consumed, and whether the line was too long (its rest
    is then read in blocks and thrown away).
    """
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, len(line), False
    consumed = len(line)
    while True:
        rest = f.readline(_BLOCK)
        consumed += len(rest)
        if not rest or rest.endswith(b"\n"):
            return b"", consumed, True


def _jsonl_items(
    path: str, name: str, limits: Limits, report: Report, size: int
) -> Iterator[Item | Skip]:
    consumed = 0
    with open(path, "rb") as f:
        number = 0
        while True:
            line, used, too_long = _read_line(f, limits.max_line_bytes)
            if not used:
                break
            number += 1
            consumed += used
            where = f"{name}:{number}"
            if too_long:
                yield Skip(f"line is longer than {limits.max_line_bytes} bytes", where)
            else:
                if number == 1:
                    line = line.removeprefix(_UTF8_BOM)
                yield from _jsonl_line(line, where)
            report(consumed / size if size else 1.0)


def _jsonl_line(line: bytes, where: str) -> Iterator[Item | Skip]:
    if not line.strip():
        return
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        yield Skip("line is not valid UTF-8", where)
        return
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        yield Skip("line is not valid JSON", where)
        return
    result = _memory(obj)
    yield result if isinstance(result, Item) else Skip(result, where)


class _LineTooLong(Exception):
    pass


class _CsvLines:
    """Lines for ``csv.reader``, read with a bound so no line is ever held whole."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self._limit = limit
        self.number = 0
        self.consumed = 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line, used, too_long = _read_line(self._f, self._limit)
        if not used:
            raise StopIteration
        self.number += 1
        self.consumed += used
        if too_long:
            raise _LineTooLong
        if self.number == 1:
            line = line.removeprefix(_UTF8_BOM)
        # Bad bytes survive as lone surrogates, so only the row that holds them is skipped.
        return line.decode("utf-8", "surrogateescape")


_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class _CsvColumns:
    names: list[str]
    delimiter: str
    content: int
    importance: int | None
    created_at: int | None


def _csv_reader(lines: _CsvLines, delimiter: str) -> Iterator[list[str]]:
    return csv.reader(lines, delimiter=delimiter, strict=False)


def _raise_field_limit(limit: int) -> None:
    # The csv module's limit is process-wide; only ever raise it.
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _csv_columns(path: str, limits: Limits) -> _CsvColumns:
    _raise_field_limit(limits.max_line_bytes)
    with open(path, "rb") as f:
        try:
            header_line = next(_CsvLines(f, limits.max_line_bytes))
        except StopIteration:
            raise FormatError(
                "csv_no_header", "The CSV file is empty; it needs a header row."
            ) from None
        except _LineTooLong:
            raise FormatError(
                "csv_header_too_long",
                f"The CSV header row is longer than {limits.max_line_bytes} bytes.",
            ) from None
    # Semicolon and tab separated files are common enough to recognise by their header.
    header: list[str] = []
    for delimiter in (",", ";", "\t", "|"):
        try:
            header = next(csv.reader([header_line], delimiter=delimiter))
        except (csv.Error, StopIteration):
            continue
        lowered = [column.strip().lower() for column in header]
        if len(header) > limits.max_csv_columns:
            raise FormatError(
                "csv_too_many_columns",
                f"The CSV file has {len(header)} columns, more than the limit of "
                f"{limits.max_csv_columns}.",
            )
        for wanted in ("content", "text"):
            if wanted in lowered:
                return _CsvColumns(
                    names=[column.strip() for column in header],
                    delimiter=delimiter,
                    content=lowered.index(wanted),
                    importance=lowered.index("importance") if "importance" in lowered else None,
                    created_at=lowered.index("created_at") if "created_at" in lowered else None,
                )
    raise FormatError(
        "csv_no_content_column",
        'The CSV file needs a "content" or "text" column in its header row.',
    )


def _csv_items(
    path: str, name: str, columns: _CsvColumns, limits: Limits, report: Report, size: int
) -> Iterator[Item | Skip]:
    _raise_field_limit(limits.max_line_bytes)
    used = {columns.content, columns.importance, columns.created_at}
    with open(path, "rb") as f:
        lines = _CsvLines(f, limits.max_line_bytes)
        reader = _csv_reader(lines, columns.delimiter)
        next(reader, None)  # the header, checked already
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except _LineTooLong:
                row = None
                yield Skip(
                    f"line is longer than {limits.max_line_bytes} bytes", f"{name}:{lines.number}"
                )
            except csv.Error as exc:
                row = None
                yield Skip(f"row is malformed ({exc})", f"{name}:{lines.number}")
            if row is not None:
                result = _csv_row(row, columns, used, limits)
                if result is not None:
                    yield (
                        result
                        if isinstance(result, Item)
                        else Skip(result, f"{name}:{lines.number}")
                    )
            report(lines.consumed / size if size else 1.0)


def _csv_row(
    row: list[str], columns: _CsvColumns, used: set[int | None], limits: Limits
) -> Item | str | None:
    if not any(cell.strip() for cell in row):
        return None
    if len(row) > len(columns.names):
        return "row has more fields than the header"
    if any(len(cell) > limits.max_line_bytes for cell in row):
        return f"a field is longer than {limits.max_line_bytes} bytes"
    if any(_SURROGATE.search(cell) for cell in row):
        return "row is not valid UTF-8"
    if any("\x00" in cell for cell in row):
        return "row contains a NUL character"
    cells = row + [""] * (len(columns.names) - len(row))
    content = cells[columns.content]
    if not content.strip():
        return "content is empty"
    importance = None
    if columns.importance is not None and cells[columns.importance].strip():
        try:
            importance = _importance(float(cells[columns.importance]))
        except ValueError:
            return "importance must be a number from 0 to 1"
    created_at = None
    if columns.created_at is not None and cells[columns.created_at].strip():
        created_at = _parse_time(cells[columns.created_at])
        if created_at is None:
            return "created_at is not an ISO 8601 time"
    metadata = {
        (column or f"column_{index + 1}"): cells[index]
        for index, column in enumerate(columns.names)
        if index not in used and cells[index] != ""
    }
    return Item(content=content, importance=importance, metadata=metadata, created_at=created_at)


# ---------------------------------------------------------------------------------------
# Archives

_CORRUPT_ARCHIVE = "The archive is damaged or incomplete."
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class _Member:
    path: str
    size: int
    packed: int | None  # compressed size where the format records it (ZIP)
    ref: Any
    encrypted: bool = False


class _Unsupported(Exception):
    pass


def _member_path(raw: str) -> str:
    """The member's normalised path; refuses names that could escape a directory."""
    unsafe = FormatError(
        "unsafe_archive", f"The archive has a member with an unsafe path: {raw[:200]!r}."
    )
    path = raw.replace("\\", "/")
    if "\x00" in path or path.startswith("/") or _DRIVE.match(path):
        raise unsafe
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise unsafe
    return "/".join(parts)


def _refuse_link(raw: str) -> FormatError:
    return FormatError(
        "unsafe_archive",
        f"The archive has a link or special file, which imports refuse: {raw[:200]!r}.",
    )


def _too_many(limit: int) -> FormatError:
    return FormatError(
        "too_many_members", f"The archive has more members than the limit of {limit}."
    )


def _bomb(detail: str) -> FormatError:
    return FormatError(
        "archive_bomb", f"The archive {detail}, which looks like a decompression bomb."
    )


class _ZipArchive:
    def __init__(self, path: str) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise FormatError("corrupt_archive", _CORRUPT_ARCHIVE) from exc

    def close(self) -> None:
        self._zip.close()

    def members(self, limits: Limits) -> list[_Member]:
        infos = self._zip.infolist()
        if len(infos) > limits.max_archive_members:
            raise _too_many(limits.max_archive_members)
        members, total = [], 0
        for info in infos:
            path = _member_path(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir() or kind == stat.S_IFDIR or not path:
                continue
            if kind not in (0, stat.S_IFREG):
                raise _refuse_link(info.filename)
            total += info.file_size
            if total > limits.max_uncompressed_bytes:
                raise _bomb(f"would unpack to more than {limits.max_uncompressed_bytes} bytes")
            if (
                info.file_size > _RATIO_FLOOR
                and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1)
            ):
                raise _bomb(
                    f"member {path!r} is compressed more than {limits.max_compression_ratio:g} to 1"
                )
            members.append(
                _Member(
                    path,
                    info.file_size,
                    info.compress_size,
                    info,
                    encrypted=bool(info.flag_bits & 0x1),
                )
            )
        return members

    def open(self, member: _Member) -> IO[bytes]:
        return self._zip.open(member.ref)


class _TarArchive:
    def __init__(self, path: str) -> None:
        try:
            # Kept open while the caller walks the members; close() ends it.
            self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise FormatError("corrupt_archive", _CORRUPT_ARCHIVE) from exc
        self._size = os.path.getsize(path)

    def close(self) -> None:
        self._tar.close()

    def members(self, limits: Limits) -> list[_Member]:
        try:
            return self._scan(limits)
        except _ARCHIVE_READ_ERRORS as exc:
            raise FormatError("corrupt_archive", _CORRUPT_ARCHIVE) from exc

    def _scan(self, limits: Limits) -> list[_Member]:
        members, total, count = [], 0, 0
        # Checked header by header: the scan stops before reading past a huge member.
        for info in self._tar:
            count += 1
            if count > limits.max_archive_members:
                raise _too_many(limits.max_archive_members)
            path = _member_path(info.name)
            if info.isdir() or not path:
                continue
            if not info.isreg():
                raise _refuse_link(info.name)
            total += info.size
            if total > limits.max_uncompressed_bytes:
                raise _bomb(f"would unpack to more than {limits.max_uncompressed_bytes} bytes")
            if total > _RATIO_FLOOR and total > limits.max_compression_ratio * max(self._size, 1):
                raise _bomb(f"is compressed more than {limits.max_compression_ratio:g} to 1")
            members.append(_Member(path, info.size, None, info))
        return members

    def open(self, member: _Member) -> IO[bytes]:
        stream = self._tar.extractfile(member.ref)
        if stream is None:
            raise _Unsupported("it is not a regular file")
        return stream


_ARCHIVE_READ_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
)


class _Unpacker:
    """Writes members out one at a time, counting real bytes against the limits."""

    def __init__(
        self, archive: _ZipArchive | _TarArchive, archive_size: int, limits: Limits
    ) -> None:
        self.archive = archive
        self.archive_size = max(archive_size, 1)
        self.limits = limits
        self.total = 0

    def extract(self, member: _Member, target: str) -> None:
        limits = self.limits
        written = 0
        try:
            with self.archive.open(member) as source, open(target, "xb") as out:
                while block := source.read(_BLOCK):
                    written += len(block)
                    self.total += len(block)
                    # Headers can lie; these limits hold on the bytes actually produced.
                    if written > member.size:
                        raise _bomb(f"member {member.path!r} is larger than its header says")
                    if self.total > limits.max_uncompressed_bytes:
                        raise _bomb(f"unpacks to more than {limits.max_uncompressed_bytes} bytes")
                    ratio = limits.max_compression_ratio
                    if (
                        written > _RATIO_FLOOR
                        and member.packed is not None
                        and written > ratio * max(member.packed, 1)
                    ):
                        raise _bomb(
                            f"member {member.path!r} is compressed more than {ratio:g} to 1"
                        )
                    if self.total > _RATIO_FLOOR and self.total > ratio * self.archive_size:
                        raise _bomb(f"is compressed more than {ratio:g} to 1")
                    out.write(block)
        except (FormatError, _Unsupported):
            raise
        except NotImplementedError as exc:
            raise _Unsupported("its compression method is not supported") from exc
        except RuntimeError as exc:  # zipfile's word for an encrypted member
            raise _Unsupported("it is encrypted") from exc
        except _ARCHIVE_READ_ERRORS as exc:
            raise FormatError("corrupt_archive", _CORRUPT_ARCHIVE) from exc

    def read_small(self, member: _Member, target: str, cap: int) -> bytes | None:
        if member.size > cap or member.encrypted:
            return None
        try:
            self.extract(member, target)
            with open(target, "rb") as f:
                return f.read(cap + 1)
        except _Unsupported:
            return None
        finally:
            with suppress(FileNotFoundError):
                os.remove(target)


def _ignored(path: str) -> bool:
    parts = path.split("/")
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def _export_memories(
    members: list[_Member], unpacker: _Unpacker, workdir: str
) -> list[tuple[_Member, str | None]] | None:
    """For one of this project's own exports, the members to import; else None."""
    manifest = next((m for m in members if m.path == "manifest.json"), None)
    if manifest is None:
        return None
    raw = unpacker.read_small(manifest, os.path.join(workdir, "manifest"), _MAX_MANIFEST_BYTES)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or parsed.get("format") != "hebbrix-export":
        return None
    # Only the memories are imported: collections and documents are the store's own rows,
    # and the memories carry what a re-import needs.
    return [(m, "jsonl") for m in members if m.path == "memories.jsonl"]


def _archive_documents(
    path: str, fmt: str, name: str, options: _Options, report: Report, skipped: list[Skip]
) -> Iterator[SourceDocument]:
    archive: _ZipArchive | _TarArchive = _ZipArchive(path) if fmt == "zip" else _TarArchive(path)
    try:
        members = archive.members(options.limits)
        with tempfile.TemporaryDirectory(prefix="hebbrix-archive-") as workdir:
            unpacker = _Unpacker(archive, os.path.getsize(path), options.limits)
            work = _export_memories(members, unpacker, workdir)
            if work is None:
                work = [(m, None) for m in members if not _ignored(m.path)]
            for index, (member, forced) in enumerate(work):
                member_report = _scaled(report, index, len(work))
                target = os.path.join(workdir, f"member-{index}")
                try:
                    document = _member_document(
                        unpacker, member, forced, target, options, member_report, skipped
                    )
                    if document is not None:
                        try:
                            yield document
                        finally:
                            _close(document.items)
                finally:
                    with suppress(FileNotFoundError):
                        os.remove(target)
                report((index + 1) / len(work))
    finally:
        archive.close()
    report(1.0)


def _member_document(
    unpacker: _Unpacker,
    member: _Member,
    forced: str | None,
    target: str,
    options: _Options,
    report: Report,
    skipped: list[Skip],
) -> SourceDocument | None:
    if member.encrypted:
        skipped.append(Skip("member is encrypted", member.path))
        return None
    try:
        unpacker.extract(member, target)
    except _Unsupported as exc:
        skipped.append(Skip(f"member skipped: {exc}", member.path))
        return None
    if os.path.getsize(target) == 0:
        skipped.append(Skip("member is empty", member.path))
        return None
    try:
        fmt = forced or detect_format(target, filename=member.path)
        if fmt in ARCHIVE_FORMATS:
            skipped.append(Skip("nested archive", member.path))
            return None
        return _open_document(target, fmt, member.path, options, report)
    except FormatError as exc:
        # One bad file in an archive costs that file, not the whole import.
        skipped.append(Skip(exc.message, member.path))
        return None


def _scaled(report: Report, index: int, count: int) -> Report:
    def scaled(fraction: float) -> None:
        report((index + fraction) / count)

    return scaled


def _close(items: Iterator[Item | Skip]) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()
