"""Format detection, parsing and chunking, on real PDFs and a real LoCoMo conversation."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.formats import (
    FormatError,
    Item,
    Limits,
    Skip,
    SourceDocument,
    chunk_text,
    detect_format,
    iter_documents,
)

DATA = Path(__file__).with_name("data")
CORPUS = json.loads((DATA / "files.json").read_text())["data"]
PASSWORD = "openpassword"


def _read(
    path: Path, fmt: str | None = None, **kwargs: object
) -> list[tuple[SourceDocument, list[Item | Skip]]]:
    """Every document with its items, consumed in order as a caller must."""
    fmt = fmt or detect_format(str(path))
    documents = iter_documents(str(path), fmt, name=kwargs.pop("name", path.name), **kwargs)
    return [(document, list(document.items)) for document in documents]


def _one(path: Path, fmt: str | None = None, **kwargs: object) -> tuple[SourceDocument, list]:
    (result,) = _read(path, fmt, **kwargs)
    return result


def _items(entries: list[Item | Skip]) -> list[Item]:
    return [entry for entry in entries if isinstance(entry, Item)]


def _skips(entries: list[Item | Skip]) -> list[Skip]:
    return [entry for entry in entries if isinstance(entry, Skip)]


def _format_error(call: Callable[[], object]) -> FormatError:
    with pytest.raises(FormatError) as info:
        call()
    assert info.value.message.endswith(".")
    return info.value


def _progress() -> tuple[list[float], Callable[[float], None]]:
    seen: list[float] = []
    return seen, seen.append


# --- PDF ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", CORPUS, ids=[entry["path"] for entry in CORPUS])
def test_corpus_pdf_pages_and_text(entry: dict) -> None:
    path = DATA / entry["path"]
    seen, report = _progress()
    password = PASSWORD if entry["encrypted"] else None
    assert detect_format(str(path)) == "pdf"
    document, entries = _one(path, "pdf", password=password, on_progress=report)
    items = _items(entries)
    assert document.pages == entry["pages"]
    assert document.fmt == "pdf" and document.content_type == "application/pdf"
    assert document.bytes == path.stat().st_size
    assert document.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert document.title
    assert _skips(entries) == []
    # Every page of these files carries text, so every page gives at least one chunk.
    assert {item.page for item in items} == set(range(1, entry["pages"] + 1))
    assert all(item.content.strip() and len(item.content) <= 1000 for item in items)
    assert all(item.metadata == {"page": item.page} for item in items)
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_pdf_title_from_metadata() -> None:
    document, _ = _one(DATA / "google-doc-document.pdf")
    assert document.title == "PDF Example Document"


def test_encrypted_pdf_needs_the_right_password() -> None:
    path = DATA / "libreoffice-writer-password.pdf"
    assert _format_error(lambda: _one(path)).code == "encrypted_pdf"
    assert _format_error(lambda: _one(path, password="nope")).code == "wrong_password"
    document, entries = _one(path, password=PASSWORD)
    assert document.pages == 1
    assert "Lorem ipsum" in " ".join(item.content for item in _items(entries))


def test_truncated_pdf_is_corrupt(tmp_path: Path) -> None:
    raw = (DATA / "pdflatex-4-pages.pdf").read_bytes()
    for name, data in [("half.pdf", raw[: len(raw) // 2]), ("no-tail.pdf", raw[:-300])]:
        path = tmp_path / name
        path.write_bytes(data)
        assert detect_format(str(path)) == "pdf"
        assert _format_error(lambda p=path: _one(p)).code == "corrupt_pdf"


def test_random_bytes_named_pdf_are_corrupt(tmp_path: Path) -> None:
    rng = __import__("random").Random(7)
    for name, data in [
        ("random.pdf", bytes(rng.randrange(256) for _ in range(4096))),
        ("header.pdf", b"%PDF-1.7\n" + bytes(rng.randrange(256) for _ in range(4096))),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        assert detect_format(str(path), filename=name) == "pdf"
        assert _format_error(lambda p=path: _one(p, "pdf")).code == "corrupt_pdf"


def test_too_many_pages() -> None:
    path = DATA / "pdflatex-4-pages.pdf"
    error = _format_error(lambda: _one(path, limits=Limits(max_pages=3)))
    assert error.code == "too_many_pages"


def test_parsing_waits_for_iteration(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4 garbage")
    documents = iter_documents(str(path), "pdf", name="broken.pdf")
    with pytest.raises(FormatError):
        next(documents)


# --- chunking -------------------------------------------------------------------------


def _sample_text(paragraphs: int = 30) -> str:
    counter = iter(range(1_000_000))
    out = []
    for p in range(paragraphs):
        sentences = []
        for s in range(1 + (p * 7) % 9):
            words = [f"w{next(counter)}" for _ in range(3 + (p + s) % 17)]
            sentences.append(" ".join(words) + ".")
        out.append(" ".join(sentences))
    return "\n\n".join(out)


def _rebuild(chunks: list[str]) -> list[str]:
    """Words of the chunks with each chunk's carried-over words removed."""
    words: list[str] = []
    for chunk in chunks:
        new = chunk.split()
        carried = 0
        for k in range(min(len(words), len(new)), 0, -1):
            if words[-k:] == new[:k]:
                carried = k
                break
        words.extend(new[carried:])
    return words


@pytest.mark.parametrize("size,overlap", [(40, 0), (40, 15), (200, 50), (1000, 100), (80, 79)])
def test_chunk_text_sizes_overlap_and_no_lost_words(size: int, overlap: int) -> None:
    text = _sample_text()
    chunks = chunk_text(text, size, overlap)
    assert chunks and all(chunk.strip() and len(chunk) <= size for chunk in chunks)
    assert all(chunk == chunk.strip() for chunk in chunks)
    if overlap == 0:
        assert " ".join(chunks).split() == text.split()
    else:
        assert _rebuild(chunks) == text.split()
        carried = sum(
            1
            for before, after in zip(chunks, chunks[1:], strict=False)
            if after.split()[0] in before.split()
        )
        assert carried >= len(chunks) // 2
        for before, after in zip(chunks, chunks[1:], strict=False):
            head = after.split()[0]
            if head in before.split():
                # The carried text is the end of the previous chunk and at most `overlap`.
                start = after.index(head)
                tail = before[before.rindex(head) :]
                assert after[start:].startswith(tail) and len(tail) <= overlap


def test_chunk_text_keeps_paragraphs_and_sentences_whole_when_they_fit() -> None:
    text = "First paragraph here.\n\nSecond one. It has two sentences.\n\n\n  Third.  "
    assert chunk_text(text, 1000, 0) == [
        "First paragraph here.\n\nSecond one. It has two sentences.\n\nThird."
    ]
    assert chunk_text(text, 40, 0) == [
        "First paragraph here.",
        "Second one. It has two sentences.",
        "Third.",
    ]
    # Pieces of different paragraphs share a chunk when they fit together.
    assert chunk_text(text, 20, 0) == [
        "First paragraph",
        "here.\n\nSecond one.",
        "It has two",
        "sentences.\n\nThird.",
    ]


def test_chunk_text_cuts_only_words_that_do_not_fit() -> None:
    word = "x" * 95
    chunks = chunk_text(f"short {word} end", 30, 5)
    assert chunks == ["short", "x" * 30, "x" * 30, "x" * 30, "xxxxx end"]


def test_chunk_text_edge_cases() -> None:
    assert chunk_text("", 100, 10) == []
    assert chunk_text(" \n\n \t ", 100, 10) == []
    assert chunk_text("one", 1, 0) == ["o", "n", "e"]
    with pytest.raises(ValueError):
        chunk_text("text", 10, 10)
    with pytest.raises(ValueError):
        chunk_text("text", 0, 0)


# --- text, Markdown, HTML -------------------------------------------------------------


def test_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    text = _sample_text(50)
    path.write_text(text, encoding="utf-8")
    seen, report = _progress()
    document, entries = _one(path, chunk_size=300, chunk_overlap=0, on_progress=report)
    assert document.fmt == "text" and document.title == "notes.txt" and document.pages is None
    assert " ".join(item.content for item in _items(entries)).split() == text.split()
    assert all(len(item.content) <= 300 for item in _items(entries))
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_text_streams_one_huge_line(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    words = [f"word{i}" for i in range(60_000)]
    path.write_text(" ".join(words), encoding="utf-8")
    _, entries = _one(path, chunk_size=500, chunk_overlap=0)
    items = _items(entries)
    assert all(len(item.content) <= 500 for item in items)
    assert " ".join(item.content for item in items).split() == words


def test_text_encodings(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ol\u00e9\n".encode("latin-1"))
    error = _format_error(lambda: _one(path, "text"))
    assert error.code == "invalid_encoding"
    assert "offset 3" in error.message

    path = tmp_path / "utf16.txt"
    path.write_bytes("caf\u00e9 ol\u00e9\n".encode("utf-16"))
    assert detect_format(str(path)) == "text"
    _, entries = _one(path)
    assert [item.content for item in _items(entries)] == ["caf\u00e9 ol\u00e9"]

    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert [item.content for item in _items(_one(path)[1])] == ["hello"]


def test_markdown_title_and_sections(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_text(
        "Intro line.\n\n```bash\n# not a title\necho hi\n\necho bye\n```\n\n"
        "# Real Title #\nBody text under the title.\n## Part\nMore.\n",
        encoding="utf-8",
    )
    document, entries = _one(path, chunk_size=50, chunk_overlap=0)
    assert document.fmt == "markdown" and document.title == "Real Title"
    assert [item.content for item in _items(entries)] == [
        "Intro line.",
        "```bash\n# not a title\necho hi\n\necho bye\n```",
        "# Real Title #\n\nBody text under the title.",
        "## Part\n\nMore.",
    ]


def test_markdown_title_fallbacks(tmp_path: Path) -> None:
    path = tmp_path / "x.md"
    path.write_text("no heading here", encoding="utf-8")
    assert _one(path)[0].title == "x.md"
    path.write_text("text first\n\n#  Last line heading", encoding="utf-8")
    assert _one(path)[0].title == "Last line heading"


def test_html(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        "<!DOCTYPE html><html><head><title> The  Page </title>"
        "<style>body { color: red }</style><script>var secret = 1;</script></head>"
        "<body><noscript>enable js</noscript><template><p>hidden</p></template>"
        "<h1>Heading</h1><p>First   <b>bold</b>\n paragraph &amp; more.</p>"
        "<div>Second<br>line</div><pre>  keep\n    this</pre>"
        "<table><tr><td>a</td><td>b</td></tr></table></body></html>",
        encoding="utf-8",
    )
    assert detect_format(str(path), filename="page") == "html"
    document, entries = _one(path)
    assert document.title == "The Page" and document.fmt == "html"
    assert [item.content for item in _items(entries)] == [
        "Heading\n\nFirst bold paragraph & more.\n\nSecond\n\nline\n\nkeep\n    this\n\na b"
    ]


def test_html_declared_charset(tmp_path: Path) -> None:
    path = tmp_path / "old.html"
    path.write_bytes(
        b'<html><head><meta charset="iso-8859-1"><title>Caf\xe9</title></head>'
        b"<body><p>cr\xe8me</p></body></html>"
    )
    document, entries = _one(path)
    assert document.title == "Caf\u00e9"
    assert [item.content for item in _items(entries)] == ["cr\u00e8me"]


# --- JSON, JSONL, CSV -----------------------------------------------------------------


def test_json_array_and_object(tmp_path: Path) -> None:
    memories = [
        {
            "content": "first",
            "importance": 0.5,
            "metadata": {"tag": "a"},
            "created_at": "2024-01-02T03:04:05+02:00",
            "id": "m1",
            "extra": "ignored",
        },
        {"content": 42},
        {"content": "third", "importance": 2},
        "not an object",
        {"content": "fifth", "created_at": "yesterday"},
        {"content": "sixth", "id": 6, "metadata": {"source_id": "kept"}},
    ]
    for payload in (memories, {"memories": memories}):
        path = tmp_path / "memories.json"
        path.write_text(json.dumps(payload), encoding="utf-8")
        assert detect_format(str(path)) == "json"
        document, entries = _one(path)
        assert document.fmt == "json"
        items = _items(entries)
        assert [item.content for item in items] == ["first", "sixth"]
        first = items[0]
        assert first.importance == 0.5
        assert first.metadata == {"tag": "a", "source_id": "m1"}
        assert first.created_at == datetime(2024, 1, 2, 1, 4, 5, tzinfo=UTC)
        assert items[1].metadata == {"source_id": "kept"}
        assert [(s.where, s.reason) for s in _skips(entries)] == [
            ("memories.json[1]", "content is missing or not a string"),
            ("memories.json[2]", "importance must be a number from 0 to 1"),
            ("memories.json[3]", "not a JSON object"),
            ("memories.json[4]", "created_at is not an ISO 8601 time"),
        ]


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"content": "a"},', encoding="utf-8")
    assert _format_error(lambda: _one(path, "json")).code == "invalid_json"
    path.write_text('{"content": "not a list"}', encoding="utf-8")
    assert _format_error(lambda: _one(path, "json")).code == "invalid_json"
    path.write_text('[{"content": "a", "importance": NaN}]', encoding="utf-8")
    assert _format_error(lambda: _one(path, "json")).code == "invalid_json"


def test_jsonl_with_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "memories.jsonl"
    lines = [
        json.dumps({"content": "one", "created_at": "2023-05-08T13:56:00"}).encode(),
        b"{not json",
        b"",
        json.dumps({"content": "x" * 500}).encode(),
        b'{"content": "caf\xe9"}',
        json.dumps({"content": "six", "importance": 1}).encode(),
        b'["an", "array"]',
        json.dumps({"content": "eight"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    assert detect_format(str(path), filename="memories") == "jsonl"
    seen, report = _progress()
    document, entries = _one(path, limits=Limits(max_line_bytes=200), on_progress=report)
    assert document.fmt == "jsonl"
    items = _items(entries)
    assert [item.content for item in items] == ["one", "six", "eight"]
    assert items[0].created_at == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    assert items[1].importance == 1.0
    assert [(s.where, s.reason) for s in _skips(entries)] == [
        ("memories.jsonl:2", "line is not valid JSON"),
        ("memories.jsonl:4", "line is longer than 200 bytes"),
        ("memories.jsonl:5", "line is not valid UTF-8"),
        ("memories.jsonl:7", "not a JSON object"),
    ]
    assert seen[-1] == 1.0


def test_jsonl_long_line_is_skipped_and_the_next_line_kept(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(b'{"content": "' + b"y" * 3_000_000 + b'"}\n')
        f.write(b'{"content": "after"}\n')
    _, entries = _one(path, limits=Limits(max_line_bytes=1000))
    assert [item.content for item in _items(entries)] == ["after"]
    assert [s.where for s in _skips(entries)] == ["big.jsonl:1"]


def test_locomo_conversation_as_jsonl(tmp_path: Path) -> None:
    conversation = json.loads((DATA / "locomo-26.json").read_text())
    sessions = sorted(
        (int(key.split("_")[1]), turns)
        for key, turns in conversation.items()
        if re.fullmatch(r"session_\d+", key)
    )
    path = tmp_path / "locomo-26.jsonl"
    expected = []
    with path.open("w", encoding="utf-8") as f:
        for number, turns in sessions:
            when = datetime.strptime(
                conversation[f"session_{number}_date_time"], "%I:%M %p on %d %B, %Y"
            ).replace(tzinfo=UTC)
            for turn in turns:
                record = {
                    "content": f"{turn['speaker']}: {turn['text']}",
                    "metadata": {"dia_id": turn["dia_id"], "session": number},
                    "created_at": when.isoformat(),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                expected.append((turn["dia_id"], record["content"], when))
    assert len(expected) == 419
    document, entries = _one(path)
    items = _items(entries)
    assert _skips(entries) == []
    assert [(i.metadata["dia_id"], i.content, i.created_at) for i in items] == expected
    assert items[0].metadata == {"dia_id": "D1:1", "session": 1}


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_bytes(
        b"\xef\xbb\xbfid,Text,importance,created_at,source\r\n"
        b'1,"Hello, world",0.9,2024-03-01T10:00:00Z,crm\r\n'
        b'2,"multi\nline",,,\r\n'
        b"3,bad importance,high,,\r\n"
        b"4,,0.1,,\r\n"
        b"5,bad \xff byte,,,\r\n"
        b",,,,\r\n"
        b"7,too,many,fields,here,extra\r\n"
        b"8,last,0,2024-03-01,x\r\n"
    )
    assert detect_format(str(path)) == "csv"
    document, entries = _one(path)
    assert document.fmt == "csv" and document.content_type == "text/csv"
    items = _items(entries)
    assert [item.content for item in items] == ["Hello, world", "multi\nline", "last"]
    assert items[0].importance == 0.9
    assert items[0].created_at == datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert items[0].metadata == {"id": "1", "source": "crm"}
    assert items[1].metadata == {"id": "2"} and items[1].importance is None
    assert items[2].importance == 0.0
    assert [(s.where, s.reason) for s in _skips(entries)] == [
        # Physical line numbers: the quoted field of row 2 spans two lines.
        ("notes.csv:5", "importance must be a number from 0 to 1"),
        ("notes.csv:6", "content is empty"),
        ("notes.csv:7", "row is not valid UTF-8"),
        ("notes.csv:9", "row has more fields than the header"),
    ]


def test_csv_semicolons_and_long_fields(tmp_path: Path) -> None:
    path = tmp_path / "semi.csv"
    path.write_text('content;tag\nfirst;a\n"' + "z" * 400 + '";b\nthird;c\n', encoding="utf-8")
    _, entries = _one(path, limits=Limits(max_line_bytes=300))
    assert [item.content for item in _items(entries)] == ["first", "third"]
    assert [item.metadata for item in _items(entries)] == [{"tag": "a"}, {"tag": "c"}]
    assert [s.where for s in _skips(entries)] == ["semi.csv:3"]


def test_csv_header_errors(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text(",".join(["content"] + [f"c{i}" for i in range(20)]) + "\nx\n")
    error = _format_error(lambda: _one(path, limits=Limits(max_csv_columns=10)))
    assert error.code == "csv_too_many_columns"
    path.write_text("title,body\na,b\n")
    assert _format_error(lambda: _one(path)).code == "csv_no_content_column"
    path.write_text("")
    assert _format_error(lambda: _one(path, "csv")).code == "csv_no_header"


# --- detection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,kwargs,expected",
    [
        (b"%PDF-1.4\n...", {"filename": "a.txt"}, "pdf"),
        (b"plain words", {"content_type": "text/markdown; charset=utf-8"}, "markdown"),
        (b"a,b\n1,2\n", {"filename": "data.CSV"}, "csv"),
        (b"# Title\n\ntext", {}, "markdown"),
        (b"just some words", {"content_type": "text/plain"}, "text"),
        (b"just some words", {"content_type": "application/octet-stream"}, "text"),
        (b'[{"content": "a"}]', {}, "json"),
        (b'{"memories": []}', {}, "json"),
        (b'{"content": "a"}\n{"content": "b"}\n', {}, "jsonl"),
        (b'{"content": "a"}\n', {"content_type": "application/json"}, "jsonl"),
        (b'{\n  "memories": []\n}', {"filename": "x.json"}, "json"),
        (b"  <!doctype html><p>hi", {}, "html"),
        (b"anything", {"declared": "md"}, "markdown"),
        (b"%PDF-1.4", {"declared": "text"}, "text"),
    ],
)
def test_detect_format(tmp_path: Path, data: bytes, kwargs: dict, expected: str) -> None:
    path = tmp_path / "source"
    path.write_bytes(data)
    assert detect_format(str(path), **kwargs) == expected


def test_detect_format_refusals(tmp_path: Path) -> None:
    path = tmp_path / "source"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert _format_error(lambda: detect_format(str(path))).code == "unsupported_format"
    path.write_bytes(b"")
    assert _format_error(lambda: detect_format(str(path))).code == "empty_file"
    path.write_bytes(gzip.compress(b"not a tar"))
    assert _format_error(lambda: detect_format(str(path))).code == "unsupported_format"
    error = _format_error(lambda: detect_format(str(path), declared="docx"))
    assert error.code == "unsupported_format"
    _zip(path, {"word/document.xml": b"<w/>"})
    error = _format_error(lambda: detect_format(str(path), filename="letter.docx"))
    assert error.code == "unsupported_format"


# --- archives -------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return path


def _archive_entries(path: Path, **kwargs: object):
    documents = iter_documents(str(path), detect_format(str(path)), name=path.name, **kwargs)
    read = [(document, list(document.items)) for document in documents]
    return read, documents.skipped


def test_zip_of_documents(tmp_path: Path) -> None:
    pdf = (DATA / "minimal-document.pdf").read_bytes()
    path = _zip(
        tmp_path / "bundle.zip",
        {
            "docs/": b"",
            "docs/readme.md": b"# Read me\n\nSome text.",
            "docs/paper.pdf": pdf,
            "data/memories.jsonl": b'{"content": "m1"}\n{"content": "m2"}\n',
            "__MACOSX/docs/._paper.pdf": b"junk",
            ".hidden/secret.txt": b"hidden",
            "docs/.DS_Store": b"\x00\x00",
            "inner.zip": _zip(tmp_path / "inner.zip", {"a.txt": b"a"}).read_bytes(),
            "image.png": b"\x89PNG\r\n\x1a\n\x00\x00",
            "empty.txt": b"",
        },
    )
    assert detect_format(str(path)) == "zip"
    seen, report = _progress()
    read, skipped = _archive_entries(path, on_progress=report)
    by_name = {document.name: (document, entries) for document, entries in read}
    assert set(by_name) == {"docs/readme.md", "docs/paper.pdf", "data/memories.jsonl"}
    readme, entries = by_name["docs/readme.md"]
    assert readme.fmt == "markdown" and readme.title == "Read me"
    assert readme.sha256 == hashlib.sha256(b"# Read me\n\nSome text.").hexdigest()
    assert by_name["docs/paper.pdf"][0].pages == 1
    assert [i.content for i in _items(by_name["data/memories.jsonl"][1])] == ["m1", "m2"]
    reasons = {skip.where: skip.reason for skip in skipped}
    assert reasons["inner.zip"] == "nested archive"
    assert "binary" in reasons["image.png"]
    assert reasons["empty.txt"] == "member is empty"
    assert len(reasons) == 3
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_tar_gz_of_documents(tmp_path: Path) -> None:
    directory = tarfile.TarInfo("./notes")
    directory.type = tarfile.DIRTYPE
    path = _tar(
        tmp_path / "bundle.tar.gz",
        [
            directory,
            ("./notes/a.txt", b"alpha text"),
            ("notes/b.csv", b"content\nbeta\n"),
            ("nested.tar.gz", _tar(tmp_path / "n.tar.gz", [("x.txt", b"x")]).read_bytes()),
        ],
    )
    assert detect_format(str(path)) == "tar"
    read, skipped = _archive_entries(path)
    assert [(d.name, [i.content for i in _items(e)]) for d, e in read] == [
        ("notes/a.txt", ["alpha text"]),
        ("notes/b.csv", ["beta"]),
    ]
    assert skipped == [Skip("nested archive", "nested.tar.gz")]


def test_archive_temporary_files_are_removed(tmp_path: Path, monkeypatch) -> None:
    workdir = tmp_path / "tmp"
    workdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(workdir))
    monkeypatch.setattr("tempfile.tempdir", None)
    path = _zip(tmp_path / "a.zip", {"a.txt": b"a", "b.txt": b"b"})
    documents = iter_documents(str(path), "zip", name="a.zip")
    first = next(documents)
    assert len(list(workdir.rglob("member-*"))) == 1
    list(first.items)
    next(documents)
    assert [p.name for p in workdir.rglob("member-*")] == ["member-1"]
    documents.close()
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "../evil.txt",
        "docs/../../evil.txt",
        "/etc/passwd",
        "C:/Windows/evil.txt",
        "..\\evil.txt",
        "ok\\..\\..\\evil.txt",
    ],
)
def test_zip_with_unsafe_path_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fine.txt", b"fine")
        info = zipfile.ZipInfo("placeholder")
        info.filename = name  # ZipInfo() would normalise the name; an attacker's would not
        archive.writestr(info, b"evil")
    error = _format_error(lambda: _archive_entries(path))
    assert error.code == "unsafe_archive"


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    assert _format_error(lambda: _archive_entries(path)).code == "unsafe_archive"


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_tar_links_and_devices_are_refused(tmp_path: Path, kind: bytes) -> None:
    link = tarfile.TarInfo("notes/link")
    link.type = kind
    link.linkname = "/etc/passwd"
    path = _tar(tmp_path / "links.tar.gz", [("notes/a.txt", b"a"), link])
    assert _format_error(lambda: _archive_entries(path)).code == "unsafe_archive"


def test_tar_absolute_and_parent_paths_are_refused(tmp_path: Path) -> None:
    for name in ("/etc/cron.d/evil", "a/../../evil"):
        path = _tar(tmp_path / "evil.tar.gz", [(name, b"x")])
        assert _format_error(lambda p=path: _archive_entries(p)).code == "unsafe_archive"


def test_zip_bomb_by_ratio(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("zeros.txt", "w") as member,
    ):
        block = b"\x00" * (1024 * 1024)
        for _ in range(20):
            member.write(block)
    assert path.stat().st_size < 100_000
    assert _format_error(lambda: _archive_entries(path)).code == "archive_bomb"


def _declare_size(path: Path, size: int) -> None:
    """Rewrite the uncompressed size a ZIP's headers state for its (only) member."""
    raw = bytearray(path.read_bytes())
    local = raw.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, size)
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, size)
    path.write_bytes(bytes(raw))


def test_zip_bomb_by_declared_size(tmp_path: Path) -> None:
    path = _zip(tmp_path / "huge.zip", {"a.txt": b"a" * 10_000})
    _declare_size(path, 1_000_000_000)  # 1 GB, as a real bomb would state it
    assert _format_error(lambda: _archive_entries(path)).code == "archive_bomb"

    path = _zip(tmp_path / "two.zip", {"a.txt": b"a" * 6000, "b.txt": b"b" * 6000})
    small = Limits(max_uncompressed_bytes=10_000)
    error = _format_error(lambda: _archive_entries(path, limits=small))
    assert error.code == "archive_bomb"


def test_zip_header_understating_a_size_does_not_unpack_past_it(tmp_path: Path) -> None:
    path = _zip(tmp_path / "liar.zip", {"a.txt": os.urandom(50_000).hex().encode()})
    _declare_size(path, 1000)
    error = _format_error(lambda: _archive_entries(path))
    assert error.code in ("archive_bomb", "corrupt_archive")


def test_tar_bomb_stops_at_the_header(tmp_path: Path) -> None:
    """A header claiming 1 GB is refused without decompressing what would follow it."""
    info = tarfile.TarInfo("huge.txt")
    info.size = 1_000_000_000
    path = tmp_path / "huge.tar.gz"
    path.write_bytes(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 512))
    assert detect_format(str(path)) == "tar"
    assert _format_error(lambda: _archive_entries(path)).code == "archive_bomb"


def test_too_many_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(5)})
    error = _format_error(lambda: _archive_entries(path, limits=Limits(max_archive_members=4)))
    assert error.code == "too_many_members"
    path = _tar(tmp_path / "many.tar.gz", [(f"{i}.txt", b"x") for i in range(5)])
    error = _format_error(lambda: _archive_entries(path, limits=Limits(max_archive_members=4)))
    assert error.code == "too_many_members"


def test_corrupt_archives(tmp_path: Path) -> None:
    raw = _zip(tmp_path / "ok.zip", {"a.txt": b"hello " * 1000}).read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(raw[: len(raw) // 2])
    assert _format_error(lambda: _archive_entries(path)).code == "corrupt_archive"
    raw = _tar(tmp_path / "ok.tar.gz", [("a.txt", os.urandom(100_000))]).read_bytes()
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(raw[: len(raw) // 2])
    assert _format_error(lambda: _archive_entries(path)).code == "corrupt_archive"


def test_bad_member_costs_only_that_member(tmp_path: Path) -> None:
    encrypted = (DATA / "libreoffice-writer-password.pdf").read_bytes()
    path = _zip(tmp_path / "mixed.zip", {"locked.pdf": encrypted, "ok.txt": b"fine"})
    read, skipped = _archive_entries(path)
    assert [document.name for document, _ in read] == ["ok.txt"]
    assert skipped[0].where == "locked.pdf" and "password" in skipped[0].reason
    read, skipped = _archive_entries(path, password=PASSWORD)
    assert [document.name for document, _ in read] == ["locked.pdf", "ok.txt"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_hebbrix_export_imports_only_its_memories(tmp_path: Path, kind: str) -> None:
    members = {
        "manifest.json": json.dumps({"format": "hebbrix-export", "version": 1}).encode(),
        "memories.jsonl": b'{"id": "mem_1", "content": "kept", "importance": 0.7}\n'
        b'{"id": "mem_2", "content": "also kept"}\n',
        "collections.jsonl": b'{"id": "col_1", "name": "docs"}\n',
        "documents.jsonl": b'{"id": "doc_1", "content": "a document row"}\n',
        "notes.txt": b"not a memory",
    }
    if kind == "zip":
        path = _zip(tmp_path / "export.zip", members)
    else:
        path = _tar(tmp_path / "export.tar.gz", list(members.items()))
    read, skipped = _archive_entries(path)
    assert skipped == []
    assert [document.name for document, _ in read] == ["memories.jsonl"]
    document, entries = read[0]
    assert document.fmt == "jsonl"
    items = _items(entries)
    assert [(i.content, i.metadata) for i in items] == [
        ("kept", {"source_id": "mem_1"}),
        ("also kept", {"source_id": "mem_2"}),
    ]


def test_manifest_of_another_kind_is_an_ordinary_member(tmp_path: Path) -> None:
    path = _zip(
        tmp_path / "other.zip",
        {
            "manifest.json": b'{"format": "something-else"}',
            "memories.jsonl": b'{"content": "m"}\n',
            "a.txt": b"text",
        },
    )
    read, _ = _archive_entries(path)
    names = [document.name for document, _ in read]
    assert "memories.jsonl" in names and "a.txt" in names
