"""Per-token scores of a model against the reference: KL divergence, NLL, top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

#: Positions scored at once (bounds the float32 temporaries at ``CHUNK x vocab``).
CHUNK = 64


@dataclass
class TokenScores:
    """Scores of every scored token, windows concatenated in order."""

    kl: npt.NDArray[np.float64]
    nll: npt.NDArray[np.float64]
    agree: npt.NDArray[np.bool_]

    @classmethod
    def concatenate(cls, parts: list[TokenScores]) -> TokenScores:
        """The scores of several windows, in order."""
        return cls(
            np.concatenate([p.kl for p in parts]),
            np.concatenate([p.nll for p in parts]),
            np.concatenate([p.agree for p in parts]),
        )


@torch.no_grad()
def score_window(
    logits: torch.Tensor,
    reference: torch.Tensor,
    targets: torch.Tensor,
    reference_top1: torch.Tensor,
    *,
    chunk: int = CHUNK,
) -> TokenScores:
    """Scores of one window. ``logits`` (positions, vocab): the model's next-token logits;
    ``reference`` (positions, vocab): the reference log-probabilities (any float dtype; they
    are renormalized in float32, so float16 storage still gives a proper distribution);
    ``targets``: the next tokens; ``reference_top1``: the reference's most likely tokens.

    KL is ``sum_v p_v (log p_v - log q_v)`` with ``p`` the reference and ``q`` the model
    (nats per token), NLL is ``-log q(target)``, agreement is ``argmax q == reference_top1``
    (the reference's own top-1, taken from its float32 logits)."""
    positions, vocab = logits.shape
    if reference.shape != (positions, vocab):
        raise ValueError(f"reference: shape {tuple(reference.shape)}, expected {(positions, vocab)}")
    if targets.shape != (positions,) or reference_top1.shape != (positions,):
        raise ValueError("targets and reference_top1 need one entry per position")
    kl = torch.empty(positions, dtype=torch.float64)
    nll = torch.empty(positions, dtype=torch.float64)
    agree = torch.empty(positions, dtype=torch.bool)
    for first in range(0, positions, chunk):
        rows = slice(first, min(positions, first + chunk))
        q = torch.log_softmax(logits[rows].float(), dim=-1)
        r = torch.log_softmax(reference[rows].to(q.device).float(), dim=-1)
        p = r.exp()
        # 0 * log 0 = 0: a token the reference rules out (-inf) adds nothing.
        kl[rows] = torch.where(p > 0, p * (r - q), 0.0).sum(-1).double().cpu()
        nll[rows] = -q.gather(1, targets[rows, None].to(q.device).long())[:, 0].double().cpu()
        agree[rows] = q.argmax(-1).cpu() == reference_top1[rows].cpu()
    return TokenScores(kl.numpy(), nll.numpy(), agree.numpy())
