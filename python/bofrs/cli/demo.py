"""The embedded example: quantize a synthetic LLM-like weight with every built-in format."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from bofrs.formats.blockwise.codebooks import Codebook, available_codebooks, codebook
from bofrs.formats.blockwise.optimize import optimize_codebook
from bofrs.formats.metrics import quantization_error
from bofrs.formats.pack import pack
from bofrs.io.files import load_file, save_file


def example_weight(rows: int = 1024, cols: int = 4096, seed: int = 0) -> torch.Tensor:
    """A deterministic bf16 weight with the traits of real LLM layers: near-Gaussian rows of
    varying scale with a heavy-tailed minority (Student-t, 4 degrees of freedom)."""
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(rows, cols, generator=gen)
    chi = torch.randn(4, rows, cols, generator=gen).pow(2).sum(0).clamp_min(1e-3)  # chi^2(4)
    heavy = torch.randn(rows, cols, generator=gen) / torch.sqrt(chi / 4.0)
    mix = torch.where(torch.rand(rows, cols, generator=gen) < 0.1, heavy, gauss)
    row_scale = 0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=gen))
    return (mix * row_scale).to(torch.bfloat16)


def run(block_size: int = 64) -> str:
    """Packs the example with each codebook, round-trips it through a file, returns a report.

    Besides the built-ins, ``bof4s-fit`` is BOF4-S optimized on this very weight (data-driven).
    Codebooks are built before the timed packs.
    """
    weight = example_weight()
    books: list[Codebook] = [codebook(name, block_size) for name in available_codebooks()]
    books.append(
        optimize_codebook(
            block_size, normalization="signed_absmax", data=weight, name="bof4s-fit"
        )
    )
    lines = [
        f"bofrs demo: {tuple(weight.shape)} {weight.dtype} weight, block size {block_size}",
        f"{'codebook':<10}{'bits/w':>8}{'rel. MSE':>12}{'SQNR dB':>9}{'pack ms':>9}{'unpack ms':>11}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for book in books:
            name = book.name
            start = time.perf_counter()
            packed = pack(weight, book, block_size)
            pack_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            packed.dequantize()
            unpack_ms = 1e3 * (time.perf_counter() - start)
            path = os.path.join(tmp, f"{name}.safetensors")
            save_file({"weight": packed}, path)
            loaded = load_file(path)["weight"]
            assert torch.equal(loaded.dequantize(), packed.dequantize()), "file round trip"
            err = quantization_error(weight, packed)
            lines.append(
                f"{name:<10}{packed.bits_per_weight:>8.3f}{err['relative_mse']:>12.3e}"
                f"{err['sqnr_db']:>9.2f}{pack_ms:>9.1f}{unpack_ms:>11.1f}"
            )
    lines.append("every format round-tripped through a safetensors file bit-exactly")
    return "\n".join(lines)
