"""The CUDA kernel sources and every (module, options) variant the glue compiles.

Pure Python, no CuPy: the NVRTC compile test (tests/test_cuda_compile.py) builds exactly these
strings and options, so the tested code is the shipped code. The ``.cu`` files live in the
repository's ``cuda/`` folder and ship inside the package as ``bofrs/_kernels/`` (a symlink in
the source tree, copied into the wheel by maturin).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

#: Where the kernel sources are (inside the installed package).
KERNEL_DIR = Path(__file__).resolve().parent.parent / "_kernels"

#: Files of each module, concatenated in this order (shared headers first).
MODULE_FILES: dict[str, tuple[str, ...]] = {
    "dequant": ("bofrs_common.cuh", "dequant.cu"),
    "matvec": ("bofrs_common.cuh", "matvec.cu"),
    "hadamard": ("bofrs_common.cuh", "fwht.cuh", "hadamard.cu"),
    "higgs_dequant": ("bofrs_common.cuh", "fwht.cuh", "higgs_dequant.cu"),
    "higgs_matvec": ("bofrs_common.cuh", "higgs_matvec.cu"),
}

#: Options of every compile. CuPy appends its own (:data:`CUPY_ADDED_OPTIONS`, among them
#: ``-ftz=true``); the kernels do not depend on them (exact arithmetic is inline PTX).
BASE_OPTIONS = ("-std=c++17", "--prec-div=true", "--prec-sqrt=true")
#: What CuPy (13, 14: ``cupy/cuda/compiler.py``) appends to the options of a RawModule before
#: calling NVRTC, besides ``-arch``; the compile test passes them too.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

#: Element kinds of activations / outputs (the BOFRS_ACT / BOFRS_OUT defines).
KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}
#: Scale formats (the kernels' ``scale_fmt`` argument).
SCALE_FORMATS = {"float32": 0, "bfloat16": 1, "float16": 2, "dq8": 3, "dq8s": 4}
#: Token counts the fused kernels are compiled for (a launch uses the smallest T >= tokens).
TOKEN_TILES = (1, 2, 4, 8, 16)
#: (p, code bits) the fused HIGGS matvec handles: grid dimension and bits of one code, that is
#: ``log2`` of the grid's points (``bits per weight * p``); byte-aligned code widths only, others
#: (3- and 6-bit codes) decode the rotated weight and multiply.
HIGGS_MATVEC_GRIDS = ((1, 2), (1, 4), (1, 8), (2, 4), (2, 8))
#: Bytes of codes per lane load in the fused kernels.
MATVEC_CHUNK = 16


@functools.cache
def source(module: str) -> str:
    """The full source of ``module``: its files concatenated, each after a comment naming it
    (no ``#line`` directive: it would disable NVRTC's precompiled headers, with a warning)."""
    if module not in MODULE_FILES:
        raise ValueError(f"unknown CUDA module {module!r}; known: {', '.join(MODULE_FILES)}")
    parts = []
    for name in MODULE_FILES[module]:
        text = (KERNEL_DIR / name).read_text()
        parts.append(f"// ---- {name} ----\n{text}")
    return "\n".join(parts)


def options(**defines: int) -> tuple[str, ...]:
    """Compile options: :data:`BASE_OPTIONS` plus ``-DBOFRS_<NAME>=<value>`` (sorted)."""
    return BASE_OPTIONS + tuple(f"-DBOFRS_{k.upper()}={int(v)}" for k, v in sorted(defines.items()))


@dataclass(frozen=True)
class Variant:
    """One compile: a module, its options, and the kernels the glue takes from it."""

    module: str
    options: tuple[str, ...]
    kernels: tuple[str, ...]


def matvec_kernel(tile: int) -> str:
    """Name of the block-wise fused kernel for up to ``tile`` tokens."""
    return f"bofrs_matvec_t{tile}_v{MATVEC_CHUNK}"


def higgs_matvec_kernel(tile: int) -> str:
    """Name of the HIGGS fused kernel for up to ``tile`` tokens."""
    return f"bofrs_higgs_matvec_t{tile}_v{MATVEC_CHUNK}"


@functools.cache
def variant(module: str, **defines: int) -> Variant:
    """The variant of ``module`` with these defines (the one the glue compiles; cached, as it
    is looked up on every launch)."""
    if module == "dequant":
        kernels: tuple[str, ...] = ("bofrs_dequant", "bofrs_scatter_outliers")
    elif module == "matvec":
        kernels = tuple(matvec_kernel(t) for t in TOKEN_TILES)
    elif module == "hadamard":
        kernels = ("bofrs_hadamard",)
    elif module == "higgs_dequant":
        kernels = ("bofrs_higgs_dequant",)
    elif module == "higgs_matvec":
        kernels = tuple(higgs_matvec_kernel(t) for t in TOKEN_TILES)
    else:
        raise ValueError(f"unknown CUDA module {module!r}")
    return Variant(module, options(**defines), kernels)


def all_variants() -> list[Variant]:
    """Every variant the glue may compile at run time."""
    out = []
    for kind in KINDS.values():
        out.append(variant("dequant", out=kind))
        out.append(variant("matvec", act=kind))
        out.append(variant("hadamard", act=kind))
        out.append(variant("higgs_dequant", out=kind))
    for p, bits in HIGGS_MATVEC_GRIDS:
        out.append(variant("higgs_matvec", p=p, bits=bits))
    return out
