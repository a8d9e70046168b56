"""The R lazy-load reader behind bofrs.evaldata, on databases the test writes itself."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from bofrs import evaldata


def serialize(obj: list[str | None] | list[int]) -> bytes:
    """R's XDR serialization (version 3) of a character or integer vector."""
    out = b"X\n" + struct.pack(">III", 3, 0x40201, 0x30500) + struct.pack(">I", 5) + b"UTF-8"
    if obj and isinstance(obj[0], int):
        return out + struct.pack(">II", 13, len(obj)) + b"".join(struct.pack(">i", v) for v in obj)  # type: ignore[arg-type]
    out += struct.pack(">II", 16, len(obj))
    for s in obj:
        if s is None:
            out += struct.pack(">II", 9, 0xFFFFFFFF)
        else:
            raw = str(s).encode()
            out += struct.pack(">II", 0x00040009, len(raw)) + raw
    return out


def database(objects: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(o)) + zlib.compress(o) for o in objects)


def test_reads_character_vectors_and_skips_other_objects(tmp_path: Path) -> None:
    book1 = ["", "PRIDE AND PREJUDICE", "", "It is a truth universally acknowledged", None, "é"]
    book2 = ["Persuasion", "Sir Walter Elliot"]
    path = tmp_path / "data" / "Rdata.rdb"
    path.parent.mkdir()
    path.write_bytes(database([serialize(book1), serialize([1, 2, 3]), serialize(book2)]))
    vectors = evaldata.read_rdb_strings(path)
    assert vectors == [[s if s is not None else "" for s in book1], book2]
    novels = evaldata.austen_novels(tmp_path)
    assert list(novels) == ["PRIDE AND PREJUDICE", "Persuasion"]
    assert novels["Persuasion"] == "Persuasion\nSir Walter Elliot"


def test_corrupt_or_truncated_databases_raise(tmp_path: Path) -> None:
    good = database([serialize(["a", "b"])])
    path = tmp_path / "Rdata.rdb"
    path.write_bytes(good[:-5])
    with pytest.raises(ValueError, match="truncated"):
        evaldata.read_rdb_strings(path)
    path.write_bytes(good[:4] + b"garbage" + good[11:])
    with pytest.raises(ValueError, match="corrupt"):
        evaldata.read_rdb_strings(path)
    path.write_bytes(database([b"Y\n" + serialize(["a"])[2:]]))
    with pytest.raises(ValueError, match="XDR"):
        evaldata.read_rdb_strings(path)
    with pytest.raises(FileNotFoundError):
        evaldata.austen_novels(tmp_path / "missing.rdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        evaldata.austen_novels(tmp_path / "empty")


def test_split_at_chapter_finds_the_whole_heading() -> None:
    novel = "Title\n\nChapter 5\nfive\n\nChapter 50\nfifty\nCHAPTER 51\nend"
    before, after = evaldata.split_at_chapter(novel, 50)
    assert before + after == novel
    assert after.startswith("Chapter 50\nfifty")
    assert evaldata.split_at_chapter(novel, 51)[1] == "CHAPTER 51\nend"
    assert evaldata.split_at_chapter(novel, 5)[1].startswith("Chapter 5\nfive")
    with pytest.raises(ValueError, match="chapter"):
        evaldata.split_at_chapter(novel, 52)


def test_model_path_names_the_known_models() -> None:
    with pytest.raises(ValueError, match="model"):
        evaldata.model_path("llama-70b")
    assert set(evaldata.MODELS) == {"smollm2", "gemma3"}


def test_named_corpora_from_extracted_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    monkeypatch.delenv("BOFRS_EVALDATA", raising=False)
    pride = ["PRIDE AND PREJUDICE", "", "Chapter 1", "It is a truth", "Chapter 50", "Elizabeth", "THE END"]
    emma = ["EMMA", "Emma Woodhouse"]
    rdb = tmp_path / "austen" / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    rdb.parent.mkdir(parents=True)
    rdb.write_bytes(database([serialize(emma), serialize(pride)]))
    jargon = tmp_path / "jargon" / "usr/share/doc/jargon-text/jargon.txt.gz"
    jargon.parent.mkdir(parents=True)
    jargon.write_bytes(gzip.compress("The Jargon File\nhacker: n.\n".encode()))
    # a data root holding one folder per extracted package
    assert evaldata.corpus_text("pride50", tmp_path) == "Chapter 50\nElizabeth\nTHE END"
    assert evaldata.corpus_text("austen", tmp_path) == "EMMA\nEmma Woodhouse"
    assert evaldata.corpus_text("jargon", tmp_path).startswith("The Jargon File")
    # or the package folder itself, also through the environment
    monkeypatch.setenv("BOFRS_EVALDATA", str(tmp_path / "jargon"))
    assert "hacker" in evaldata.corpus_text("jargon")
    assert evaldata.find_austen(tmp_path / "austen") == rdb.parents[1]
    text = tmp_path / "mine.txt"
    text.write_text("plain text é", encoding="utf-8")
    assert evaldata.corpus_text(str(text)) == "plain text é"
    packed = tmp_path / "mine.txt.gz"
    packed.write_bytes(gzip.compress("zipped".encode()))
    assert evaldata.corpus_text(str(packed)) == "zipped"
    with pytest.raises(FileNotFoundError, match="corpus"):
        evaldata.corpus_text(str(tmp_path / "none.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    if not Path("/usr/lib/R/site-library/janeaustenr").exists():
        with pytest.raises(FileNotFoundError, match="r-cran-janeaustenr"):
            evaldata.corpus_text("pride50", empty)
    rdb.write_bytes(database([serialize(emma)]))
    with pytest.raises(ValueError, match="PRIDE AND PREJUDICE"):
        evaldata.corpus_text("pride50", tmp_path / "austen")
