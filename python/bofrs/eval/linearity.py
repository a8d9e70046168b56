"""The linearity theorem: per-layer sensitivities by noise injection, and per-layer errors.

For moderate bit widths the loss increase of a quantized model is close to
``sum_l alpha_l * t_l^2`` with ``t_l^2 = ||W^_l - W_l||^2 / ||W_l||^2`` (HIGGS, Malinovskii et
al. 2024). :func:`estimate_sensitivity` measures ``alpha_l`` by adding Gaussian noise of
relative size ``t`` to one layer at a time; :func:`layer_errors` measures ``t^2`` of each
format on each layer; :func:`bofrs.allocate` then picks a format per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from bofrs.eval.quantized import quantized
from bofrs.formats.format import Format


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise TypeError("model(input_ids) must return logits of shape (batch, seq, vocab)")
    return out.float()


def _batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError("tokens must be an integer tensor of shape (seq,) or (batch, seq)")
    if tokens.shape[1] < 2:
        raise ValueError("tokens need at least 2 positions per sequence")
    return list(torch.split(tokens.long(), batch_size))


@torch.no_grad()
def cross_entropy(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1) -> float:
    """The mean next-token cross-entropy (nats) of ``model`` on ``tokens`` ((batch, seq))."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in _batches(tokens, batch_size):
        batch = batch.to(device)
        logits = _logits(model, batch)[:, :-1]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


def perplexity(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1) -> float:
    """exp of the mean next-token cross-entropy of ``model`` on ``tokens`` ((batch, seq))."""
    return math.exp(cross_entropy(model, tokens, batch_size=batch_size))


def linear_layers(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules by name, without those matching a ``skip`` pattern."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(re.search(p, name) for p in skip)
    }


def selected_layers(
    model: nn.Module, skip: Sequence[str], layers: Sequence[str] | None, purpose: str
) -> dict[str, nn.Linear]:
    """:func:`linear_layers` (without ``skip``), only the named ``layers`` when given;
    ValueError for an unknown name or when none is left (``model has no Linear layer to
    {purpose}``)."""
    targets = linear_layers(model, skip)
    if layers is not None:
        unknown = [n for n in layers if n not in targets]
        if unknown:
            raise ValueError(f"layers: no Linear layer named {unknown[0]!r}")
        targets = {n: targets[n] for n in layers}
    if not targets:
        raise ValueError(f"model has no Linear layer to {purpose}")
    return targets


#: The losses :func:`estimate_sensitivity` can measure.
METRICS = ("perplexity", "cross_entropy", "kl")


def _metric(
    model: nn.Module, metric: str, tokens: torch.Tensor | None, num_sequences: int, seq_len: int,
    seed: int, batch_size: int,
) -> Callable[[], float]:
    """A function measuring the model now: perplexity or mean cross-entropy on ``tokens``, or
    the KL divergence (per token) to the model as it is now, on ``tokens`` or, without them,
    on random tokens (data-free)."""
    if metric == "perplexity":
        assert tokens is not None
        return lambda: perplexity(model, tokens, batch_size=batch_size)
    if metric == "cross_entropy":
        assert tokens is not None
        return lambda: cross_entropy(model, tokens, batch_size=batch_size)
    device = next(model.parameters()).device
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, _vocab_size(model), (num_sequences, seq_len), generator=gen)
        batches = list(torch.split(ids.to(device), batch_size))
    else:
        batches = [b.to(device) for b in _batches(tokens, batch_size)]
    with torch.no_grad():
        reference = [torch.log_softmax(_logits(model, b), -1) for b in batches]
    positions = sum(b.numel() for b in batches)

    @torch.no_grad()
    def kl() -> float:
        total = 0.0
        for batch, ref in zip(batches, reference):
            now = torch.log_softmax(_logits(model, batch), -1)
            total += float((ref.exp() * (ref - now)).sum())
        return total / positions

    return kl


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise ValueError("cannot tell the vocabulary size: pass tokens")
    return int(embeddings[0].num_embeddings)


def _progress(items: list[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, desc="sensitivity", unit="layer")  # type: ignore[no-any-return]


@torch.no_grad()
def estimate_sensitivity(
    model: nn.Module,
    tokens: torch.Tensor | None = None,
    *,
    metric: str | None = None,
    noise_levels: Sequence[float] = (0.05, 0.1),
    draws: int = 1,
    antithetic: bool | None = None,
    layers: Sequence[str] | None = None,
    skip: Sequence[str] = ("lm_head",),
    num_sequences: int = 4,
    seq_len: int = 128,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """``alpha_l`` for every Linear layer: the slope, through the origin, of the loss increase
    against ``t^2`` when Gaussian noise of relative norm ``t`` (each of ``noise_levels``) is
    added to that layer alone (averaged over ``draws`` noise draws per level; large layers
    need few, the increase concentrates around its mean).

    ``metric`` is the loss: ``"perplexity"`` (the default with ``tokens``, (batch, seq) ids),
    ``"cross_entropy"`` (mean nats per token on ``tokens``; a perplexity increase is then
    ``PPL * (exp(sum alpha t^2) - 1)``, which stays right for large increases) or ``"kl"``: the
    KL divergence per token to the unperturbed model, on ``tokens`` or, without them (the
    data-free default), on ``num_sequences`` random sequences of ``seq_len`` tokens.

    ``antithetic`` (default: on for perplexity and cross-entropy, off for KL) measures every
    draw with ``+noise`` and ``-noise`` and averages the two: the first-order term (the
    gradient times the noise), which dominates single draws near a non-minimum and makes
    estimates from few tokens negative, cancels exactly; each draw then costs two passes. KL
    has no first-order term. Weights are restored exactly after each measurement. A layer the
    loss hardly depends on can still come out slightly negative; clamp such values to 0 before
    :func:`bofrs.allocate`.
    """
    levels = [float(t) for t in noise_levels]
    if not levels or any(not (0 < t < 10) for t in levels):
        raise ValueError(f"noise_levels must be positive, got {noise_levels}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    if metric is None:
        metric = "kl" if tokens is None else "perplexity"
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if tokens is None and metric != "kl":
        raise ValueError(f"tokens: metric={metric!r} needs tokens (only 'kl' is data-free)")
    if antithetic is None:
        antithetic = metric != "kl"
    signs = (1.0, -1.0) if antithetic else (1.0,)
    targets = selected_layers(model, skip, layers, "measure")
    measure = _metric(model, metric, tokens, num_sequences, seq_len, seed, batch_size)
    base = measure() if metric != "kl" else 0.0
    gen = torch.Generator().manual_seed(seed)
    alphas = {}
    for name in _progress(list(targets), progress):
        weight = targets[name].weight
        original = weight.detach().clone()
        norm = float(original.float().norm())
        numerator = denominator = 0.0
        for t in levels:
            for _ in range(draws):
                noise = torch.randn(original.shape, generator=gen).to(weight.device)
                noise *= t * norm / float(noise.norm())
                increase = 0.0
                for sign in signs:
                    weight.copy_((original.float() + sign * noise).to(weight.dtype))
                    increase += (measure() - base) / len(signs)
                weight.copy_(original)
                numerator += t * t * increase
                denominator += t**4
        alphas[name] = numerator / denominator
    return alphas


def spec_options(spec: str, in_features: int) -> dict[str, Any]:
    """The :class:`bofrs.QuantConfig` options of a format spec (:class:`bofrs.Format`) for a
    layer with rows of ``in_features`` values: ``{"skip": True}`` for ``"bf16"`` / ``"fp16"``
    (kept in full precision), else the options of the format made concrete for the row length
    (:meth:`bofrs.Format.resolved`), exactly as :func:`layer_errors` measures them."""
    return Format.parse(spec).resolved(in_features).options()


def dequantized(weight: torch.Tensor, spec: str | Format) -> torch.Tensor:
    """``weight`` quantized in format ``spec`` (a :class:`bofrs.Format` or its spec string) and
    decoded again, in the weight's dtype and device: fake quantization for evaluations."""
    return Format.parse(spec).fake_quantize(weight)


def _format_error(weight: torch.Tensor, spec: str) -> tuple[float, float]:
    """(bits per weight, relative squared error) of one format on one weight."""
    bits, t2, _ = quantized(weight, spec)
    return bits, t2


def layer_errors(
    model: nn.Module, formats: Sequence[str], *, skip: Sequence[str] = ("lm_head",)
) -> dict[str, dict[str, tuple[float, float]]]:
    """For each Linear layer and format: ``(bits_per_weight, t^2)`` measured on the layer.

    Formats: a block-wise codebook name with an optional block size and options (``"nf4"``,
    ``"bof4s@128"``, ``"bof4s+opq"`` for OPQ at q = 0.95, ``+rot`` for the Hadamard rotation,
    ``+dq8`` for double-quantized scales), HIGGS as ``"higgs{bits}p{p}"`` with an optional group size
    (``"higgs4p2@1024"``; default: the largest power of two dividing the row length, at most
    1024), or ``"bf16"`` / ``"fp16"``.
    """
    return {
        name: {spec: _format_error(module.weight, spec) for spec in formats}
        for name, module in linear_layers(model, skip).items()
    }


def build_menu(
    errors: dict[str, dict[str, tuple[float, float]]],
) -> tuple[list[str], dict[str, tuple[list[float], list[float]]]]:
    """Layer names and the :func:`bofrs.allocate` menu (per-layer bits and errors) from
    :func:`layer_errors`."""
    names = list(errors)
    if not names:
        raise ValueError("errors is empty")
    formats = list(errors[names[0]])
    menu = {
        spec: ([errors[n][spec][0] for n in names], [errors[n][spec][1] for n in names])
        for spec in formats
    }
    return names, menu
