"""evaluate_formats: per-layer weight error and, on text, KL divergence to the unquantized
model, perplexity and top-1 agreement, with paired bootstrap intervals."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from bofrs.eval.linearity import linear_layers
from bofrs.eval.quantized import parse_formats, quantized
from bofrs.eval.fake import DecodedFormat, swapped
from bofrs.eval.forward import next_token_logits
from bofrs.eval.progress import Progress
from bofrs.eval.reference import ReferenceLogProbs
from bofrs.eval.scoring import TokenScores, score_window
from bofrs.eval.stats import UNITS, Bootstrap, Interval, unit_of_token
from bofrs.formats.format import Format

#: A format to evaluate: a spec string, ``(name, {layer: spec})`` (an allocation), or decoded
#: weights (:class:`DecodedFormat`).
FormatEntry = Union[str, tuple[str, Mapping[str, str]], DecodedFormat]

#: Fewer bootstrap units than this make the intervals unreliable (a warning is recorded).
MIN_UNITS = 10

#: The upper quantile of per-token KL reported beside the mean.
KL_QUANTILE = 0.99


def _label(entry: FormatEntry) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, DecodedFormat):
        return entry.name
    return entry[0]


def _decode(
    entry: FormatEntry, layers: Mapping[str, nn.Linear], keep: bool
) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor], dict[str, Any]]:
    """(bits, t^2, decoded weights (if ``keep``), extra record fields) of one format."""
    bits: dict[str, float] = {}
    t2: dict[str, float] = {}
    decoded: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    if isinstance(entry, DecodedFormat):
        if set(entry.weights) != set(layers):
            missing = sorted(set(layers) ^ set(entry.weights))[0]
            raise ValueError(f"formats: {entry.name!r} must give exactly the evaluated layers ({missing!r})")
        for name, layer in layers.items():
            w = layer.weight.detach().float().cpu()
            back = entry.weights[name].detach().float().cpu()
            if back.shape != w.shape:
                raise ValueError(f"formats: {entry.name!r} gives {name} shape {tuple(back.shape)}, not {tuple(w.shape)}")
            if not torch.isfinite(back).all():
                raise ValueError(f"formats: {entry.name!r} gives {name} a non-finite value")
            norm2 = float((w.double() ** 2).sum())
            t2[name] = float(((back - w).double() ** 2).sum()) / norm2 if norm2 else 0.0
            bits[name] = float(entry.bits[name])
            if keep:
                decoded[name] = back.to(dtype=layer.weight.dtype, device=layer.weight.device)
        extra.update(dict(entry.info))
        return bits, t2, decoded, extra
    if isinstance(entry, str):
        plan = dict.fromkeys(layers, Format.parse(entry))
    else:
        extra["choices"] = dict(entry[1])
        plan = dict(zip(entry[1], parse_formats(list(entry[1].values()), f"formats: {entry[0]!r}")))
    for name, layer in layers.items():
        bits[name], t2[name], back = quantized(layer.weight, plan[name])
        if keep:
            decoded[name] = back.to(dtype=layer.weight.dtype, device=layer.weight.device)
    return bits, t2, decoded, extra


def _check_entries(entries: Sequence[FormatEntry], layers: Mapping[str, nn.Linear]) -> None:
    """Every spec parsed and every allocation checked before the (slow) reference pass."""
    for entry in entries:
        if isinstance(entry, str):
            parse_formats([entry])
        elif isinstance(entry, tuple):
            label, plan = entry
            if set(plan) != set(layers):
                raise ValueError(f"formats: allocation {label!r} must name every evaluated layer")
            parse_formats(list(plan.values()), f"formats: {label!r}")
        elif not isinstance(entry, DecodedFormat):
            raise TypeError(f"formats: a spec string, (name, {{layer: spec}}) or DecodedFormat, got {type(entry).__name__}")


def _coverage(model: nn.Module, layers: Mapping[str, nn.Linear]) -> dict[str, Any]:
    """How much of the model the evaluated layers are: their weights' share of all (distinct)
    parameters, and any evaluated weight that is tied to another parameter (quantizing it
    changes that one too, e.g. an lm_head tied to the embeddings)."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    distinct = {id(p): p.numel() for p in model.parameters()}
    tied = {}
    for layer_name, layer in layers.items():
        others = [n for n in names_of.get(id(layer.weight), []) if n != f"{layer_name}.weight"]
        if others:
            tied[layer_name] = others
    quantized = sum(layer.weight.numel() for layer in layers.values())
    return {"quantized": quantized, "total": sum(distinct.values()),
            "quantized_share": quantized / max(1, sum(distinct.values())), "tied": tied}  # fmt: skip


def score_model(
    model: nn.Module, tokens: torch.Tensor, reference: ReferenceLogProbs, progress: Progress | None = None
) -> TokenScores:
    """Per-token scores of ``model`` as it is now on every window, against ``reference``."""
    parts = []
    for i in range(tokens.shape[0]):
        logits = next_token_logits(model, tokens[i])
        parts.append(score_window(
            logits, reference.logprobs(i), tokens[i, 1:], torch.from_numpy(reference.top1[i]),
        ))  # fmt: skip
        del logits
        if progress is not None:
            progress.step()
    return TokenScores.concatenate(parts)


def _stat(interval: Interval) -> dict[str, Any]:
    return {"value": interval.value, "ci": interval.to_list()}


def summarize(
    scores: Mapping[str, TokenScores],
    reference_nll: np.ndarray,
    tokens_per_window: Sequence[int],
    *,
    baseline: str | None,
    unit: str = "window",
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Point estimates and paired bootstrap intervals: (reference record, {format: record})
    with mean KL, its 99th percentile, top-1 agreement, perplexity, and the differences of
    mean KL and perplexity to ``baseline`` (one of ``scores``), all on the same resamples."""
    boot = Bootstrap(unit_of_token(tokens_per_window, unit), resamples=resamples, seed=seed,
                     confidence=confidence)  # fmt: skip
    ref_nll, ref_nll_samples = boot.mean_samples(reference_nll)
    reference = {
        "perplexity": _stat(boot.interval(float(np.exp(ref_nll)), np.exp(ref_nll_samples))),
        "nll": _stat(boot.interval(ref_nll, ref_nll_samples)),
    }
    samples: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    for label, s in scores.items():
        kl, kl_s = boot.mean_samples(s.kl)
        nll, nll_s = boot.mean_samples(s.nll)
        top1, top1_s = boot.mean_samples(s.agree.astype(np.float64))
        p99, p99_s = boot.quantile_samples(s.kl, KL_QUANTILE)
        dnll_s = nll_s - ref_nll_samples
        samples[label] = {"kl": (kl, kl_s), "ppl": (float(np.exp(nll)), np.exp(nll_s))}
        records[label] = {
            "kl": _stat(boot.interval(kl, kl_s)),
            "kl_p99": _stat(boot.interval(p99, p99_s)),
            "top1": _stat(boot.interval(top1, top1_s)),
            "perplexity": float(np.exp(nll)),
            "perplexity_ci": boot.interval(float(np.exp(nll)), np.exp(nll_s)).to_list(),
            "nll_increase": _stat(boot.interval(nll - ref_nll, dnll_s)),
        }
    if baseline is not None:
        if baseline not in scores:
            raise ValueError(f"baseline: {baseline!r} is not among the formats")
        base_kl, base_kl_s = samples[baseline]["kl"]
        base_ppl, base_ppl_s = samples[baseline]["ppl"]
        for label, record in records.items():
            kl, kl_s = samples[label]["kl"]
            ppl, ppl_s = samples[label]["ppl"]
            record["vs_baseline"] = {
                "kl_diff": _stat(boot.interval(kl - base_kl, kl_s - base_kl_s)),
                "kl_ratio": _stat(boot.interval(kl / base_kl, kl_s / base_kl_s))
                if base_kl > 0 and np.all(base_kl_s > 0) else None,
                "perplexity_diff": _stat(boot.interval(ppl - base_ppl, ppl_s - base_ppl_s)),
            }  # fmt: skip
    reference["bootstrap"] = {"unit": unit, **boot.describe()}
    if boot.units < MIN_UNITS:
        reference["bootstrap"]["warning"] = (
            f"only {boot.units} {unit}s: bootstrap intervals are unreliable below {MIN_UNITS}"
        )
    return reference, records


def evaluate_formats(
    model: nn.Module,
    formats: Sequence[FormatEntry],
    tokens: torch.Tensor | None = None,
    *,
    skip: Sequence[str] = ("lm_head",),
    baseline: str | None = "nf4",
    reference: str | Path | ReferenceLogProbs | None = None,
    unit: str = "window",
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates formats on ``model``'s Linear layers (all but those matching ``skip``).

    ``formats``: spec strings (as :func:`bofrs.layer_errors`), ``(name, {layer: spec})`` for a
    per-layer allocation, or :class:`bofrs.eval.DecodedFormat` (a peer's decoded weights).
    Every entry gets its bits per weight and relative squared error ``t^2``, per layer and
    size-weighted.

    With ``tokens`` ((windows, length) ids, e.g. from :func:`bofrs.eval.tokenize_windows`)
    each format is also scored against the unquantized model on the same tokens, every layer
    fake-quantized (weights decoded in place, restored afterwards): mean KL divergence
    (nats/token) to the unquantized next-token distributions, its 99th percentile, top-1
    agreement, perplexity, and the paired differences of mean KL and perplexity to
    ``baseline`` (a spec or name; added first when not among ``formats``; None: no
    comparison). Intervals: seeded percentile bootstrap (``resamples`` draws, ``confidence``)
    over ``unit`` = ``"window"`` (default: windows are independent contexts, tokens within one
    are not) or ``"token"``, the same draws for every format (paired). Positions 1..length-1 of
    each window are scored.

    The reference distributions are computed once and streamed from a float16 memmap
    (:class:`bofrs.eval.ReferenceLogProbs`): in a temporary folder (``reference=None``), in a
    folder kept and reused across runs (a path), or one already computed. In a kept folder
    each format's per-token scores are stored too, keyed by a hash of its decoded weights: a
    later run recomputes only formats whose decoding changed or that are new."""
    layers = linear_layers(model, skip)
    if not layers:
        raise ValueError("model has no Linear layer to quantize")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    entries = list(formats)
    _check_entries(entries, layers)
    labels = [_label(e) for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"formats: a name appears twice in {labels}")
    if tokens is not None and baseline is not None and baseline not in labels:
        entries.insert(0, baseline)
        labels.insert(0, baseline)
        parse_formats([baseline], "baseline")
    sizes = {n: layer.weight.numel() for n, layer in layers.items()}
    total = sum(sizes.values())
    result: dict[str, Any] = {"layers": {n: {"numel": s} for n, s in sizes.items()}, "formats": {}}
    result["parameters"] = _coverage(model, layers)
    bar = None
    own_reference = None
    scores: dict[str, TokenScores] = {}
    try:
        if tokens is not None:
            if tokens.dim() != 2 or tokens.shape[1] < 2:
                raise ValueError("tokens must be (windows, length) ids with length >= 2")
            bar = Progress(tokens.shape[0] * (len(entries) + (not isinstance(reference, ReferenceLogProbs))),
                           progress)  # fmt: skip
            if isinstance(reference, ReferenceLogProbs):
                ref = reference
                if ref.windows != tokens.shape[0]:
                    raise ValueError("reference: computed for other windows")
            else:
                bar.label("unquantized (reference)")
                ref = own_reference = ReferenceLogProbs.compute(model, tokens, reference, step=bar.step)
        for entry, label in zip(entries, labels):
            start = time.perf_counter()
            if bar is not None:
                bar.label(label)
            bits, t2, decoded, extra = _decode(entry, layers, keep=tokens is not None)
            record: dict[str, Any] = {
                "bits_per_weight": sum(bits[n] * sizes[n] for n in layers) / total,
                "mean_t2": sum(t2[n] * sizes[n] for n in layers) / total,
                "per_layer_t2": t2,
                "per_layer_bits": bits,
                **extra,
            }
            if tokens is not None:
                key = ref.scores_key(decoded) if ref.persistent else ""
                cached = ref.load_scores(key) if key else None
                if cached is not None:
                    scores[label] = cached
                    for _ in range(tokens.shape[0] if bar is not None else 0):
                        bar.step()  # type: ignore[union-attr]
                else:
                    with swapped(layers, decoded):
                        scores[label] = score_model(model, tokens, ref, bar)
                    if key:
                        ref.save_scores(key, scores[label])
                record["scores_reused"] = cached is not None
                del decoded
                s = scores[label]
                per = tokens.shape[1] - 1
                record["per_window"] = {
                    "kl": s.kl.reshape(-1, per).sum(1).tolist(),
                    "nll": s.nll.reshape(-1, per).sum(1).tolist(),
                    "agree": s.agree.reshape(-1, per).sum(1).tolist(),
                }
            record["seconds"] = time.perf_counter() - start
            result["formats"][label] = record
        if tokens is not None:
            per = tokens.shape[1] - 1
            ref_record, stats = summarize(
                scores, ref.nll.reshape(-1), [per] * tokens.shape[0], baseline=baseline, unit=unit,
                resamples=resamples, seed=seed, confidence=confidence,
            )  # fmt: skip
            for label, values in stats.items():
                result["formats"][label].update(values)
            result["reference"] = {**ref_record, "storage": "float16 log-probabilities (memmap)",
                                   "fingerprint": ref.meta.get("fingerprint") or None}
            result["baseline_perplexity"] = ref_record["perplexity"]["value"]
            result["baseline"] = baseline
            result["tokens"] = {
                "windows": int(tokens.shape[0]), "length": int(tokens.shape[1]),
                "scored": int(tokens.shape[0] * per), "first_token": int(tokens[0, 0]),
            }  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
        if own_reference is not None:
            own_reference.close()
    return result
