"""Linearity theorem tooling on a small torch language model: perplexity, sensitivities, menus."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import bofrs


class TinyLM(nn.Module):
    """A causal-LM-shaped model: (batch, seq) ids -> (batch, seq, vocab) logits."""

    def __init__(self, vocab: int = 64, dim: int = 64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 128)
        self.down = nn.Linear(128, dim)
        self.lm_head = nn.Linear(dim, vocab)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.15

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h)


def tokens() -> torch.Tensor:
    """Sequences of a noisy rule (next = 5 * token + 1 mod 64, one time in five random)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.empty(8, 64, dtype=torch.long)
    ids[:, 0] = torch.randint(0, 64, (8,), generator=gen)
    for i in range(1, 64):
        rule = (5 * ids[:, i - 1] + 1) % 64
        noise = torch.randint(0, 64, (8,), generator=gen)
        ids[:, i] = torch.where(torch.rand(8, generator=gen) < 0.2, noise, rule)
    return ids


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    """A TinyLM trained on :func:`tokens`: near a minimum, where the theorem applies."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention
    model, ids = TinyLM(), tokens()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits = model(ids)[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained() -> TinyLM:
    model = TinyLM()
    model.load_state_dict(_trained_state())
    return model


def test_perplexity_is_exp_mean_cross_entropy() -> None:
    model, ids = TinyLM(), tokens()
    with torch.no_grad():
        logits = model(ids)[:, :-1]
    ce = nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert bofrs.perplexity(model, ids) == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert bofrs.perplexity(model, ids, batch_size=2) == pytest.approx(math.exp(float(ce)), rel=1e-5)


@pytest.mark.parametrize("with_tokens", [False, True])
def test_sensitivity_predicts_the_loss_increase(with_tokens: bool) -> None:
    model = trained()
    ids = tokens() if with_tokens else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alphas = bofrs.estimate_sensitivity(
        model, ids, noise_levels=(0.02, 0.04), draws=8, progress=False
    )
    assert set(alphas) == {"up", "down"}  # lm_head skipped by default
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), "weights restored exactly"
    # Noise at another level (mean of 8 draws): the increase is alpha * t^2 within 20 %.
    t = 0.03
    measured = sum(increase(model, ids, t, seed) for seed in range(8)) / 8
    predicted = alphas["up"] * t * t
    assert predicted > 0
    assert abs(measured - predicted) < 0.2 * abs(predicted), (measured, predicted)


def increase(model: TinyLM, ids: torch.Tensor | None, t: float, seed: int) -> float:
    weight = model.up.weight
    original = weight.detach().clone()
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        if ids is not None:
            base = bofrs.perplexity(model, ids)
            weight.add_(noise * (t * original.norm() / noise.norm()))
            measured = bofrs.perplexity(model, ids) - base
        else:
            probe = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(0))
            ref = torch.log_softmax(model(probe), -1)
            weight.add_(noise * (t * original.norm() / noise.norm()))
            now = torch.log_softmax(model(probe), -1)
            measured = float((ref.exp() * (ref - now)).sum()) / probe.numel()
        weight.copy_(original)
    return measured


def test_layer_errors_menu_and_allocation() -> None:
    model = TinyLM()
    formats = ["nf4", "bof4s@32", "higgs4p2", "higgs2p1@64", "bf16"]
    errors = bofrs.layer_errors(model, formats)
    assert set(errors) == {"up", "down"}
    for name, row in errors.items():
        assert row["bf16"][0] == 16.0 and row["bf16"][1] < 1e-4
        assert row["nf4"][0] == 4.25 and 0 < row["nf4"][1] < 0.02
        assert row["higgs2p1@64"][1] > row["higgs4p2"][1]
        assert row["bof4s@32"][0] == 4.5
    names, menu = bofrs.build_menu(errors)
    alphas = bofrs.estimate_sensitivity(model, noise_levels=(0.02,), progress=False)
    sizes = [dict(model.named_modules())[n].weight.numel() for n in names]
    plan = bofrs.allocate([alphas[n] for n in names], sizes, menu, 6.0)
    assert plan.average_bits <= 6.0 and len(plan.choices) == 2
    cheap = bofrs.allocate([alphas[n] for n in names], sizes, menu, 2.5)
    assert cheap.predicted_increase >= plan.predicted_increase


def test_bad_input() -> None:
    model = TinyLM()
    with pytest.raises(ValueError, match="noise_levels"):
        bofrs.estimate_sensitivity(model, noise_levels=(), progress=False)
    with pytest.raises(ValueError, match="layers"):
        bofrs.estimate_sensitivity(model, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="tokens"):
        bofrs.perplexity(model, torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        bofrs.perplexity(model, torch.zeros(5, dtype=torch.float32))
    with pytest.raises(ValueError, match="format"):
        bofrs.layer_errors(model, ["nf4 @ 64"])
