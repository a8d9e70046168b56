"""NVRTC through ctypes: compile CUDA source for a given architecture without a driver or CuPy.

libnvrtc comes from PyPI (the ``nvidia-cuda-nvrtc`` wheel torch depends on, or
``nvidia-cuda-nvrtc-cu12``); :func:`find_nvrtc` looks for it under ``site-packages/nvidia``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from pathlib import Path


def find_nvrtc() -> Path | None:
    """Path of a libnvrtc shared library from an ``nvidia`` wheel (newest first), or None."""
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*",
                        "nvidia/*/bin/nvrtc64_*.dll"):
            found += [p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p]
    found.sort(key=lambda p: (Path(p).parent.parent.name, p), reverse=True)
    return Path(found[0]) if found else None


class Nvrtc:
    """A loaded libnvrtc."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        lib = self.lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"NVRTC error: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, source: str, name: str, options: tuple[str, ...]) -> tuple[bool, str, bytes]:
        """Compiles; returns (success, log, the cubin (``-arch=sm_XX``) or PTX produced)."""
        lib = self.lib
        prog = ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
        ))
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            buf = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, buf))
            log = buf.value.decode(errors="replace").strip()
            out = b""
            if status == 0:
                cubin = any(o.startswith(("-arch=sm_", "--gpu-architecture=sm_")) for o in options)
                get_size, get = (
                    (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if cubin
                    else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
                )
                n = ctypes.c_size_t()
                self._check(get_size(prog, ctypes.byref(n)))
                data = ctypes.create_string_buffer(n.value)
                self._check(get(prog, data))
                out = data.raw
            return status == 0, log, out
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
