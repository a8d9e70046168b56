"""llama.cpp as a benchmark peer: find or build it from the PyPI sdist of llama-cpp-python, and
requantize GGUF files with it.

Nothing is downloaded beyond the registries: the sdist of ``llama-cpp-python`` vendors llama.cpp's
source in ``vendor/llama.cpp``; it is fetched with ``pip download --no-deps --no-binary :all:``,
unpacked and built with cmake + ninja (Debian: ``apt-get install cmake ninja-build``). Nothing of
llama.cpp is ever committed to this repository.

Cache directory: ``$BOFRS_LLAMACPP_DIR`` (default ``~/.cache/bofrs/llamacpp``), laid out as

    llama_cpp_python-X.Y.Z.tar.gz           the sdist
    llama_cpp_python-X.Y.Z/vendor/llama.cpp the source; build/bin/ holds the binaries
    build.log                               the build's output, ending in "rc N" when done
    gguf/                                   requantized models (see :func:`requantize`)

API (used by the benches and by other evaluation code):

- :func:`find_or_build` -> :class:`LlamaCpp` or ``None`` (with a message) where it cannot be built;
- :func:`requantize` ``(src, type) -> Path``, cached by (input file, type);
- :func:`tensor_types` ``(path) -> {tensor name: ggml type name}`` of a GGUF file.

CLI: ``python benches/llamacpp.py`` (find or build, print the binaries and version; exit 0 with a
message if it cannot), ``--no-build`` (only look), ``--requantize SRC TYPE`` (print the output path).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The binaries the benches need (cmake targets of llama.cpp).
TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity", "test-backend-ops")
#: cmake options of the build (the tests give ``test-backend-ops``).
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=ON",
)
#: Last line of ``build.log`` once a build has finished (``rc 0`` on success).
_DONE = re.compile(r"^rc (-?\d+)\s*$")
#: A build log untouched this long belongs to a build that died without writing its "rc" line.
STALE_LOG_SECONDS = 900.0

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: where its binaries are and which version they are."""

    source: Path  #: the llama.cpp source tree (``.../vendor/llama.cpp``)
    bin_dir: Path  #: directory holding :data:`TARGETS`
    sdist_version: str  #: version of the llama-cpp-python sdist it came from, e.g. ``"0.3.36"``
    build: str  #: what ``llama-bench --version`` says (``"version: N (commit)"``), or ``""``
    commit: str  #: the commit in that line, or ``""``

    def binary(self, name: str) -> Path:
        """Path of one of :data:`TARGETS` (``ValueError`` for another name)."""
        if name not in TARGETS:
            raise ValueError(f"name must be one of {TARGETS}, got {name!r}")
        return self.bin_dir / name

    def describe(self) -> str:
        """One line: sdist version, build line and binary directory."""
        return f"llama.cpp from llama-cpp-python {self.sdist_version} ({self.build or 'version unknown'}), {self.bin_dir}"


def cache_dir() -> Path:
    """``$BOFRS_LLAMACPP_DIR`` or ``~/.cache/bofrs/llamacpp``."""
    return Path(os.environ.get("BOFRS_LLAMACPP_DIR") or Path.home() / ".cache" / "bofrs" / "llamacpp")


def _version_key(name: str) -> tuple[int, ...]:
    """``llama_cpp_python-0.3.36`` -> ``(0, 3, 36)`` (non-numeric parts count as 0)."""
    version = name.split("-", 1)[1] if "-" in name else ""
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _sources(directory: Path) -> list[Path]:
    """Unpacked sdists' llama.cpp trees in ``directory``, newest version first."""
    trees = [p for p in directory.glob("llama_cpp_python-*") if (p / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file()]
    trees.sort(key=lambda p: _version_key(p.name), reverse=True)
    return [p / "vendor" / "llama.cpp" for p in trees]


def _built(source: Path) -> bool:
    bin_dir = source / "build" / "bin"
    return all(os.access(bin_dir / t, os.X_OK) for t in TARGETS)


def parse_version(text: str) -> tuple[str, str]:
    """``(line, commit)`` from the output of ``llama-bench --version``: the ``version: N (commit)``
    (or ``version: V (build N, commit C)``) line and its commit, or ``("", "")``."""
    for line in text.splitlines():
        match = re.match(r"\s*version:\s*(\S+)\s*\(([^)]*)\)", line)
        if match:
            inner = match.group(2)
            commit = re.search(r"commit\s+([0-9a-fA-F]+)", inner)
            return line.strip(), commit.group(1) if commit else inner.strip()
    return "", ""


def _describe(source: Path) -> LlamaCpp:
    bin_dir = source / "build" / "bin"
    sdist = source.parent.parent.name
    try:
        out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True, timeout=60)
        line, commit = parse_version(out.stdout + "\n" + out.stderr)
    except (OSError, subprocess.SubprocessError):
        line, commit = "", ""
    return LlamaCpp(source, bin_dir, sdist.split("-", 1)[-1], line, commit)


def build_state(log_path: Path, now: float | None = None) -> str:
    """State of a build from its log: ``"none"`` (no log), ``"done"`` (ends in ``rc 0``),
    ``"failed"`` (ends in another ``rc``, or untouched for :data:`STALE_LOG_SECONDS`), else
    ``"running"``."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256))
            tail = handle.read().decode("utf-8", "replace").rstrip().splitlines()
        age = (time.time() if now is None else now) - log_path.stat().st_mtime
    except FileNotFoundError:
        return "none"
    match = _DONE.match(tail[-1]) if tail else None
    if match:
        return "done" if match.group(1) == "0" else "failed"
    return "failed" if age > STALE_LOG_SECONDS else "running"


def _wait_for_build(log_path: Path, log: Log, timeout: float) -> str:
    """Waits while another process builds (its log still growing); returns the final state."""
    state = build_state(log_path)
    if state == "running":
        log(f"llama.cpp: waiting for the build in progress ({log_path})")
    deadline = time.monotonic() + timeout
    while state == "running" and time.monotonic() < deadline:
        time.sleep(10)
        state = build_state(log_path)
    return state


def _fetch_sdist(directory: Path, log: Log) -> Path | None:
    """Downloads (if needed) and unpacks the llama-cpp-python sdist; its llama.cpp tree or None."""
    archives = sorted(directory.glob("llama_cpp_python-*.tar.gz"), key=lambda p: _version_key(p.name[: -len(".tar.gz")]))
    if not archives:
        log("llama.cpp: pip download --no-deps --no-binary :all: llama-cpp-python")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(directory), "llama-cpp-python"],
            capture_output=True, text=True,
        )  # fmt: skip
        (directory / "dl.log").write_text(done.stdout + done.stderr + f"rc {done.returncode}\n")
        archives = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            log(f"llama.cpp: the sdist could not be downloaded (see {directory / 'dl.log'})")
            return None
    archive = archives[-1]
    log(f"llama.cpp: unpacking {archive.name}")
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(directory, filter="data")
        except TypeError:  # Python without extraction filters (before 3.10.12)
            tar.extractall(directory)
    trees = _sources(directory)
    return trees[0] if trees else None


def _build(source: Path, log_path: Path, log: Log) -> bool:
    """Configures and builds :data:`TARGETS` in ``source/build``; output to ``log_path``."""
    jobs = str(os.cpu_count() or 2)
    steps = [
        ["cmake", "-S", str(source), "-B", str(source / "build"), "-G", "Ninja", *CMAKE_OPTIONS],
        ["cmake", "--build", str(source / "build"), "-j", jobs, "--target", *TARGETS],
    ]
    log(f"llama.cpp: building {', '.join(TARGETS)} in {source / 'build'} (log: {log_path}; several minutes)")
    with open(log_path, "w") as handle:
        rc = 0
        for step in steps:
            handle.write("$ " + " ".join(step) + "\n")
            handle.flush()
            rc = subprocess.run(step, stdout=handle, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                break
        handle.write(f"rc {rc}\n")
    if rc != 0:
        log(f"llama.cpp: the build failed (rc {rc}; see {log_path})")
    return rc == 0


def find_or_build(build: bool = True, *, log: Log = _stderr, wait_seconds: float = 3600.0) -> LlamaCpp | None:
    """The llama.cpp binaries in :func:`cache_dir`, building them first when ``build`` (fetching
    the sdist if none is there). Waits up to ``wait_seconds`` for a build another process is
    running. Returns ``None`` after logging why where llama.cpp is not available (no cmake or
    ninja, no registry, a failed build, or ``build=False`` and nothing built)."""
    directory = cache_dir()
    trees = _sources(directory) if directory.is_dir() else []
    if trees and _built(trees[0]) and build_state(directory / "build.log") in ("none", "done"):
        return _describe(trees[0])
    if _wait_for_build(directory / "build.log", log, wait_seconds) == "running":
        log("llama.cpp: gave up waiting for the build in progress")
        return None
    trees = _sources(directory) if directory.is_dir() else []
    if trees and _built(trees[0]):
        return _describe(trees[0])
    if not build:
        log(f"llama.cpp: not built in {directory} (run python benches/llamacpp.py to build it)")
        return None
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        log(f"llama.cpp: cannot build without {' and '.join(missing)} (apt-get install cmake ninja-build)")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per cache directory
        trees = _sources(directory)
        if trees and _built(trees[0]):
            return _describe(trees[0])
        source = trees[0] if trees else _fetch_sdist(directory, log)
        if source is None or not _build(source, directory / "build.log", log):
            return None
    return _describe(source)


def _file_key(path: Path) -> str:
    """Identity of a model file for the requantization cache: its resolved path, size and mtime."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def requantize(src: str | os.PathLike[str], type: str, llama: LlamaCpp | None = None, *, threads: int | None = None) -> Path:
    """``src`` (a GGUF file) requantized to ``type`` (a ``llama-quantize`` type name such as
    ``"Q4_0"``, ``"IQ4_NL"``, ``"IQ4_XS"``, ``"Q4_K"``, ``"Q4_K_M"``) with
    ``llama-quantize --allow-requantize``; cached in ``cache_dir()/gguf`` by (input file, type).
    llama-quantize keeps some tensors at types of its own choosing (see :func:`tensor_types`):
    ``"TYPE:OUT"`` (``"Q4_0:Q4_0"``) also sets the output projection and the token embedding to
    ``OUT`` (``--output-tensor-type``, ``--token-embedding-type``; by default Q8_0 / Q6_K).
    ``RuntimeError`` if llama.cpp is unavailable or the quantizer fails."""
    path = Path(src)
    if not isinstance(type, str) or not re.fullmatch(r"[A-Za-z0-9_]+(:[A-Za-z0-9_]+)?", type):
        raise ValueError(f"type must be a llama-quantize type name such as 'Q4_0' (or 'Q4_0:Q4_0'), got {type!r}")
    if not path.is_file():
        raise FileNotFoundError(f"src: no such GGUF file: {path}")
    main_type, _, output_type = type.upper().partition(":")
    out_dir = cache_dir() / "gguf"
    suffix = main_type + (f".OUT-{output_type}" if output_type else "")
    out = out_dir / f"{path.stem}-{_file_key(path)}.{suffix}.gguf"
    if out.is_file():
        return out
    llama = llama or find_or_build()
    if llama is None:
        raise RuntimeError("llama.cpp is not available to requantize (see the message above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.partial")
    outputs = ["--output-tensor-type", output_type, "--token-embedding-type", output_type] if output_type else []
    command = [str(llama.binary("llama-quantize")), "--allow-requantize", *outputs, str(path), str(partial), main_type,
               str(threads or os.cpu_count() or 1)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama-quantize failed (rc {done.returncode}): {' '.join(command)}\n{tail}")
    (out_dir / f"{out.name}.log").write_text(done.stdout + done.stderr)
    os.replace(partial, out)
    return out


def tensor_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{tensor name: ggml type name}`` of a GGUF file (read with the ``gguf`` package)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-build", action="store_true", help="only look for a build")
    parser.add_argument("--requantize", nargs=2, metavar=("SRC", "TYPE"), help="requantize a GGUF file")
    args = parser.parse_args(argv)
    llama = find_or_build(build=not args.no_build)
    if llama is None:
        print("llama.cpp is not available: skipped")
        return 0
    print(llama.describe())
    for target in TARGETS:
        print(f"  {target}: {llama.binary(target)}")
    if args.requantize:
        print(requantize(args.requantize[0], args.requantize[1], llama))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
