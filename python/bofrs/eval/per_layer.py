"""The per-layer study: KL divergence to the unquantized model when a single layer alone is
quantized, beside that layer's weight error and its *output* error.

The weight error ``t^2 = ||dW||^2 / ||W||^2`` counts every weight alike; what the next layer
sees is ``dW x``. With ``S = E[x x^T]`` the second moment of the layer's inputs (measured on
the same windows), the relative output error is ``tr(dW S dW^T) / tr(W S W^T)``: when a few
input channels carry most of the energy (Gemma-3's normalization weights reach the hundreds),
the error on those channels' columns decides, and two formats with the same ``t^2`` can differ
a lot in it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from bofrs.eval.linearity import selected_layers
from bofrs.eval.quantized import parse_formats, quantized
from bofrs.eval.fake import swapped
from bofrs.eval.forward import next_token_logits
from bofrs.eval.scoring import score_window
from bofrs.eval.progress import Progress
from bofrs.formats.format import Format


class InputMoments:
    """``E[x x^T]`` of the inputs of Linear layers over forward passes, one float64 matrix
    per distinct input (layers fed the same tensor, like q/k/v, share one)."""

    def __init__(self, layers: Mapping[str, nn.Linear]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        # id(input) -> (input, first layer fed it): holding the input keeps its id unique.
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = [
            layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers.items()
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if id(x) in self._seen and self._seen[id(x)][0] is x:
                self.alias[name] = self._seen[id(x)][1]
                return
            self._seen[id(x)] = (x, name)
            self.alias[name] = name
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            product = (flat.T @ flat).double().cpu()
            if name in self.sums:
                self.sums[name] += product
            else:
                self.sums[name] = product
            self.count[name] = self.count.get(name, 0) + flat.shape[0]

        return hook

    def new_pass(self) -> None:
        """Call before each forward pass (input identities are per pass)."""
        self._seen.clear()

    def moment(self, name: str) -> torch.Tensor:
        """``E[x x^T]`` of layer ``name``'s inputs (float64)."""
        source = self.alias[name]
        return self.sums[source] / self.count[source]

    def remove(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()


def output_error(weight: torch.Tensor, decoded: torch.Tensor, moment: torch.Tensor) -> float:
    """``tr(dW S dW^T) / tr(W S W^T)`` with ``dW = decoded - weight``, ``S = moment``."""
    w = weight.detach().double().cpu()
    d = decoded.detach().double().cpu() - w
    den = float(((w @ moment) * w).sum())
    return float(((d @ moment) * d).sum()) / den if den > 0 else 0.0


def _blocks(model: nn.Module, targets: Sequence[str]) -> tuple[list[nn.Module], dict[str, int]]:
    """The model's stack of blocks (the longest ``nn.ModuleList`` holding target layers) and
    the block index of each target layer in it (targets outside it are not listed)."""
    best: tuple[list[nn.Module], dict[str, int]] = ([], {})
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefix = f"{name}." if name else ""
        index = {}
        for layer in targets:
            head = layer[len(prefix):].split(".", 1)[0] if layer.startswith(prefix) else ""
            if head.isdigit() and int(head) < len(module):
                index[layer] = int(head)
        if len(index) > len(best[1]):
            best = (list(module), index)
    return best


@contextmanager
def _cached_prefix(blocks: Sequence[nn.Module], outputs: Sequence[Any], upto: int) -> Iterator[None]:
    """Blocks ``0..upto-1`` return their recorded ``outputs`` instead of running: the part of
    the model before a quantized layer's block is the reference's, computed once."""
    patched = []
    try:
        for j in range(upto):
            blocks[j].forward = lambda *args, _out=outputs[j], **kwargs: _out
            patched.append(blocks[j])
        yield
    finally:
        for block in patched:
            del block.forward


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def per_layer_study(
    model: nn.Module,
    formats: Sequence[str | Format],
    tokens: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    skip: Sequence[str] = ("lm_head",),
    stride: int = 1,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """For every Linear layer (or the named ``layers``) and format: the mean KL divergence
    (nats/token) to the unquantized model on ``tokens`` ((windows, length) ids) with only that
    layer quantized, its ``t^2`` and its relative output error (see the module doc), plus how
    concentrated its input energy is (the largest diagonal entry of ``E[x x^T]`` over the mean
    one). Returns ``{"layers": {name: record}, "sum_kl": {format: sum over layers}, ...}``.

    Cheaper than :func:`bofrs.evaluate_formats` per layer: KL is taken at every ``stride``-th
    position only (a transformers model then projects only those onto its vocabulary), the
    reference is kept in memory (float16), and with ``reuse_prefix`` the blocks before the
    quantized layer's block (the model's longest ``ModuleList``) return the reference's
    outputs instead of running again (the same values: the part before is unchanged)."""
    targets = selected_layers(model, skip, layers, "study")
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError("tokens must be (windows, length) ids with length >= 2")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < tokens.shape[1]:
        raise ValueError(f"stride must be an int in 1..{tokens.shape[1] - 1}, got {stride!r}")
    specs = [str(f) if not isinstance(f, str) else f for f in formats]
    parsed = parse_formats(list(formats))
    length = tokens.shape[1]
    positions = torch.arange(stride - 1, length - 1, stride)
    blocks, block_of = _blocks(model, list(targets)) if reuse_prefix else ([], {})
    bar = Progress(tokens.shape[0] * (1 + len(targets) * len(specs)), progress, desc="bofrs per-layer")
    start = time.perf_counter()
    moments = InputMoments(targets)
    outputs: list[list[Any]] = []
    reference: list[tuple[torch.Tensor, torch.Tensor]] = []
    current: list[Any] = []
    handles = [b.register_forward_hook(lambda m, a, out: current.append(_detached(out))) for b in blocks]
    try:
        bar.label("unquantized (reference, input moments)")
        with torch.no_grad():
            for i in range(tokens.shape[0]):
                moments.new_pass()
                current.clear()
                logits = next_token_logits(model, tokens[i], positions)
                logp = torch.log_softmax(logits.float(), dim=-1)
                reference.append((logp.half().cpu(), logp.argmax(-1).cpu()))
                outputs.append(list(current))
                bar.step()
    finally:
        for handle in handles:
            handle.remove()
        moments.new_pass()
        moments.remove()
    if blocks and any(len(o) != len(blocks) for o in outputs):
        blocks, block_of = [], {}  # blocks not run once each in order: no reuse
    records: dict[str, dict[str, Any]] = {}
    try:
        for name, layer in targets.items():
            moment = moments.moment(name)
            diag = torch.diagonal(moment)
            record: dict[str, Any] = {
                "numel": layer.weight.numel(), "in_features": layer.weight.shape[1],
                "input_energy_max_over_mean": float(diag.max() / diag.mean()) if diag.mean() > 0 else 0.0,
                "t2": {}, "output_error": {}, "bits": {}, "kl": {},
            }  # fmt: skip
            upto = block_of.get(name, 0)
            for spec, fmt in zip(specs, parsed):
                bar.label(f"{name} {spec}")
                bits, t2, back = quantized(layer.weight, fmt)
                decoded = back.to(dtype=layer.weight.dtype, device=layer.weight.device)
                record["bits"][spec], record["t2"][spec] = bits, t2
                record["output_error"][spec] = output_error(layer.weight, back, moment)
                kl = []
                with swapped({name: layer}, {name: decoded}):
                    for i in range(tokens.shape[0]):
                        with _cached_prefix(blocks, outputs[i], upto):
                            logits = next_token_logits(model, tokens[i], positions)
                        ref, top1 = reference[i]
                        targets_i = tokens[i, 1:][positions]
                        kl.append(score_window(logits, ref, targets_i, top1).kl)
                        bar.step()
                record["kl"][spec] = float(np.concatenate(kl).mean())
            records[name] = record
    finally:
        bar.close()
    return {
        "formats": specs,
        "tokens": {"windows": int(tokens.shape[0]), "length": int(length), "stride": stride,
                   "scored": int(tokens.shape[0] * positions.numel())},  # fmt: skip
        "prefix_reused": bool(blocks),
        "layers": records,
        "sum_kl": {s: sum(r["kl"][s] for r in records.values()) for s in specs},
        "seconds": time.perf_counter() - start,
    }


def per_layer_table(study: dict[str, Any], top: int | None = None) -> str:
    """A Markdown table of :func:`per_layer_study`: per layer and format, KL (nats/token,
    x1000), ``t^2`` and output error (both x1000), layers by decreasing KL of the first format
    (``top`` of them when given), and the sums over layers."""
    specs: list[str] = study["formats"]
    head = "| layer | in max/mean |" + "".join(f" KL {s} | t2 {s} | out {s} |" for s in specs)
    rows = [head, "|---|---|" + "---|---|---|" * len(specs)]
    order = sorted(study["layers"], key=lambda n: -study["layers"][n]["kl"][specs[0]])
    for name in order[:top] if top else order:
        r = study["layers"][name]
        cells = "".join(
            f" {1e3 * r['kl'][s]:.3f} | {1e3 * r['t2'][s]:.2f} | {1e3 * r['output_error'][s]:.2f} |"
            for s in specs
        )
        rows.append(f"| {name} | {r['input_energy_max_over_mean']:.0f} |{cells}")
    sums = "".join(f" {1e3 * study['sum_kl'][s]:.3f} | | |" for s in specs)
    rows.append(f"| sum over layers | |{sums}")
    return "\n".join(rows)


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 0..n-1 of ``values`` (ties averaged)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    for value in np.unique(v):
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (0 when either is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else 0.0


def per_layer_summary(study: dict[str, Any], pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """What the per-layer KL follows, from a :func:`per_layer_study` result.

    Per format: the sum of the single-layer KLs, the size-weighted mean ``t^2`` and output
    error, and over the layers the rank correlation of KL with ``t^2`` and with the output
    error. Per pair ``(a, b)`` of formats (default: every pair): the ratio of their KL sums,
    the fraction of layers where the format with the larger KL also has the larger ``t^2``,
    the same for the output error, and the layers adding most to ``sum KL(a) - sum KL(b)``."""
    specs: list[str] = study["formats"]
    records: dict[str, dict[str, Any]] = study["layers"]
    names = list(records)
    if not names:
        raise ValueError("study: no layers")
    sizes = np.array([records[n]["numel"] for n in names], dtype=np.float64)

    def column(key: str, spec: str) -> np.ndarray:
        return np.array([records[n][key][spec] for n in names], dtype=np.float64)

    formats = {}
    for s in specs:
        kl, t2, out = column("kl", s), column("t2", s), column("output_error", s)
        formats[s] = {
            "sum_kl": float(kl.sum()),
            "mean_t2": float((t2 * sizes).sum() / sizes.sum()),
            "mean_output_error": float((out * sizes).sum() / sizes.sum()),
            "spearman_kl_t2": spearman(kl, t2),
            "spearman_kl_output_error": spearman(kl, out),
        }
    chosen = list(pairs) if pairs is not None else [(a, b) for i, a in enumerate(specs) for b in specs[i + 1 :]]
    compared = []
    for a, b in chosen:
        if a not in specs or b not in specs:
            raise ValueError(f"pairs: ({a!r}, {b!r}) names a format the study does not have")
        dkl = column("kl", a) - column("kl", b)
        dt2 = column("t2", a) - column("t2", b)
        dout = column("output_error", a) - column("output_error", b)
        worst = np.argsort(-dkl, kind="stable")[:5]
        compared.append({
            "a": a, "b": b,
            "kl_ratio": formats[a]["sum_kl"] / formats[b]["sum_kl"] if formats[b]["sum_kl"] > 0 else None,
            "t2_agrees": float(np.mean(np.sign(dkl) == np.sign(dt2))),
            "output_error_agrees": float(np.mean(np.sign(dkl) == np.sign(dout))),
            "top_layers": [{"layer": names[i], "kl_diff": float(dkl[i])} for i in worst],
        })  # fmt: skip
    return {"formats": formats, "pairs": compared, "layers": len(names)}


def per_layer_summary_table(summary: dict[str, Any]) -> str:
    """Markdown of :func:`per_layer_summary`: one table per format, one per pair."""
    rows = ["| format | sum KL (x1000) | mean t2 (x1000) | mean out (x1000) | rank corr. KL~t2 | rank corr. KL~out |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for s, f in summary["formats"].items():
        rows.append(f"| {s} | {1e3 * f['sum_kl']:.2f} | {1e3 * f['mean_t2']:.3f} | {1e3 * f['mean_output_error']:.3f} "
                    f"| {f['spearman_kl_t2']:.2f} | {f['spearman_kl_output_error']:.2f} |")  # fmt: skip
    rows += ["", f"| a vs b | sum KL a / b | larger KL has larger t2 | larger KL has larger out "
             f"(of {summary['layers']} layers) | layers adding most to KL(a) - KL(b) (x1000) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for p in summary["pairs"]:
        ratio = "" if p["kl_ratio"] is None else f"{p['kl_ratio']:.3f}"
        top = ", ".join(f"{t['layer']} {1e3 * t['kl_diff']:+.2f}" for t in p["top_layers"][:3])
        rows.append(f"| {p['a']} vs {p['b']} | {ratio} | {100 * p['t2_agrees']:.0f} % | "
                    f"{100 * p['output_error_agrees']:.0f} % | {top} |")  # fmt: skip
    return "\n".join(rows)
