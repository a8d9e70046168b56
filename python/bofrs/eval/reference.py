"""The unquantized model's next-token distributions, computed once and streamed from disk.

A 262k vocabulary makes full float32 logits of 30k tokens 31 GB, more than the memory of the
machines this runs on. :class:`ReferenceLogProbs` runs the reference model once over every
window and keeps its log-probabilities as float16 in a memory-mapped file (2 bytes per vocab
entry, read back one window at a time and renormalized in float32), beside the reference's
exact per-token NLL (from float32) and top-1 tokens. Given a ``directory``, the file is kept
and reused by a later evaluation of the same model on the same windows (a fingerprint of the
weights and tokens must match); otherwise it lives in a temporary folder removed on
:meth:`close`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from bofrs.eval.forward import next_token_logits
from bofrs.eval.scoring import TokenScores

_META = "reference.json"
_DATA = "logprobs.f16"
_SCORES = "scores"


def fingerprint(model: nn.Module, windows: torch.Tensor) -> str:
    """SHA-256 over the windows' token ids and every parameter and buffer of ``model``
    (names, shapes, dtypes, bytes): a stored reference belongs to exactly this pair."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(windows.cpu().numpy().astype(np.int64)).tobytes())
    for name, tensor in list(model.state_dict(keep_vars=False).items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        data = tensor.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class ReferenceLogProbs:
    """Reference log-probabilities of ``windows`` ((count, length) token ids): for window ``i``,
    :meth:`logprobs` is the (length - 1, vocab) float16 view of the distributions predicting
    tokens 1..length-1; :attr:`nll` and :attr:`top1` are (count, length - 1) arrays."""

    def __init__(self, directory: Path, meta: dict[str, Any], owned: tempfile.TemporaryDirectory[str] | None):
        self.directory = directory
        self.meta = meta
        self._owned = owned
        shape = (meta["windows"], meta["positions"], meta["vocab"])
        self._data: np.memmap[Any, np.dtype[np.float16]] | None = np.memmap(
            directory / _DATA, dtype=np.float16, mode="r", shape=shape
        )
        self.nll: npt.NDArray[np.float64] = np.asarray(meta["nll"], dtype=np.float64)
        self.top1: npt.NDArray[np.int64] = np.asarray(meta["top1"], dtype=np.int64)

    @property
    def windows(self) -> int:
        """Number of windows."""
        return int(self.meta["windows"])

    @property
    def vocab(self) -> int:
        """Vocabulary size of the stored distributions."""
        return int(self.meta["vocab"])

    @property
    def reused(self) -> bool:
        """Whether the log-probabilities came from an earlier run's directory."""
        return bool(self.meta.get("reused", False))

    def logprobs(self, index: int) -> torch.Tensor:
        """Window ``index``'s stored log-probabilities, (length - 1, vocab) float16."""
        if self._data is None:
            raise ValueError("reference: already closed")
        return torch.from_numpy(np.array(self._data[index]))

    @property
    def persistent(self) -> bool:
        """Whether the reference lives in a caller's directory (kept between runs)."""
        return self._owned is None and bool(self.meta.get("fingerprint"))

    def scores_key(self, weights: Mapping[str, torch.Tensor]) -> str:
        """A key for the scores of the model with these decoded ``weights`` on this reference:
        SHA-256 over the reference's fingerprint and the weights' names and bytes (any change
        of a format's decoding gives another key)."""
        digest = hashlib.sha256(str(self.meta.get("fingerprint", "")).encode())
        for name in sorted(weights):
            data = weights[name].detach().float().cpu().contiguous()
            digest.update(f"{name}|{tuple(data.shape)}".encode())
            digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def load_scores(self, key: str) -> TokenScores | None:
        """Scores stored by :meth:`save_scores` under ``key``, or None."""
        path = self.directory / _SCORES / f"{key}.npz"
        if not self.persistent or not path.exists():
            return None
        try:
            with np.load(path) as data:
                scores = TokenScores(data["kl"], data["nll"], data["agree"])
        except (OSError, ValueError, KeyError):
            return None
        expected = self.windows * int(self.meta["positions"])
        return scores if scores.kl.shape == scores.nll.shape == scores.agree.shape == (expected,) else None

    def save_scores(self, key: str, scores: TokenScores) -> None:
        """Keeps a format's per-token scores beside a persistent reference (a later run with
        the same decoded weights reuses them); does nothing for a temporary one."""
        if not self.persistent:
            return
        folder = self.directory / _SCORES
        folder.mkdir(exist_ok=True)
        partial = folder / f"{key}.partial.npz"
        np.savez(partial, kl=scores.kl, nll=scores.nll, agree=scores.agree)
        partial.replace(folder / f"{key}.npz")

    def close(self) -> None:
        """Releases the file; removes it unless it lives in a caller's directory."""
        self._data = None
        if self._owned is not None:
            self._owned.cleanup()
            self._owned = None

    def __enter__(self) -> ReferenceLogProbs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        model: nn.Module,
        windows: torch.Tensor,
        directory: str | Path | None = None,
        *,
        step: Callable[[], None] | None = None,
    ) -> ReferenceLogProbs:
        """Runs ``model`` (the unquantized reference) over every window, or reuses the file in
        ``directory`` when it was written for the same model and windows. ``step`` is called
        after each window (progress)."""
        if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
            raise ValueError("tokens must be (windows, length) ids with length >= 2")
        owned = None
        if directory is None:
            owned = tempfile.TemporaryDirectory(prefix="bofrs-reference-")
            folder = Path(owned.name)
            key = ""
        else:
            folder = Path(directory)
            folder.mkdir(parents=True, exist_ok=True)
            key = fingerprint(model, windows)
            meta_path = folder / _META
            if meta_path.exists() and (folder / _DATA).exists():
                try:
                    meta = json.loads(meta_path.read_text())
                except ValueError:
                    meta = {}
                if meta.get("fingerprint") == key and meta.get("complete"):
                    meta["reused"] = True
                    if step is not None:
                        for _ in range(windows.shape[0]):
                            step()
                    return cls(folder, meta, None)
        try:
            return cls(folder, cls._write(model, windows, folder, key, step), owned)
        except BaseException:
            if owned is not None:
                owned.cleanup()
            raise

    @staticmethod
    def _write(
        model: nn.Module, windows: torch.Tensor, folder: Path, key: str,
        step: Callable[[], None] | None,
    ) -> dict[str, Any]:  # fmt: skip
        count, length = int(windows.shape[0]), int(windows.shape[1])
        (folder / _META).unlink(missing_ok=True)
        data: np.memmap[Any, np.dtype[np.float16]] | None = None
        nll = np.empty((count, length - 1))
        top1 = np.empty((count, length - 1), dtype=np.int64)
        vocab = 0
        for i in range(count):
            logits = next_token_logits(model, windows[i])
            if data is None:
                vocab = int(logits.shape[-1])
                if (folder / _DATA).exists():
                    (folder / _DATA).unlink()
                data = np.memmap(folder / _DATA, dtype=np.float16, mode="w+", shape=(count, length - 1, vocab))
            targets = windows[i, 1:].to(logits.device)
            for first in range(0, length - 1, 64):
                rows = slice(first, min(length - 1, first + 64))
                logp = torch.log_softmax(logits[rows].float(), dim=-1)
                data[i, rows] = logp.cpu().to(torch.float16).numpy()
                nll[i, rows] = -logp.gather(1, targets[rows, None].long())[:, 0].double().cpu().numpy()
                top1[i, rows] = logp.argmax(-1).cpu().numpy()
            del logits
            if step is not None:
                step()
        assert data is not None
        data.flush()
        del data
        meta = {
            "fingerprint": key, "windows": count, "positions": length - 1, "vocab": vocab,
            "dtype": "float16", "nll": nll.tolist(), "top1": top1.tolist(), "complete": True,
        }  # fmt: skip
        (folder / _META).write_text(json.dumps(meta))
        return meta
