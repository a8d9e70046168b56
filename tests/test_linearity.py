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


def test_cross_entropy_alphas_predict_the_cross_entropy_increase() -> None:
    model, ids = trained(), tokens()
    alphas = bofrs.estimate_sensitivity(
        model, ids, metric="cross_entropy", noise_levels=(0.02, 0.04), draws=4, progress=False
    )
    assert bofrs.cross_entropy(model, ids) == pytest.approx(math.log(bofrs.perplexity(model, ids)))
    t = 0.03
    measured = 0.0
    for seed in range(8):
        before = bofrs.cross_entropy(model, ids)
        ppl = increase(model, ids, t, seed)  # perplexity increase of one draw
        measured += (math.log(math.exp(before) + ppl) - before) / 8
    predicted = alphas["up"] * t * t
    assert predicted > 0
    assert abs(measured - predicted) < 0.2 * predicted, (measured, predicted)


def test_antithetic_draws_cancel_the_first_order_term() -> None:
    """Far from a minimum (an untrained model) the gradient term dominates single draws; +/-
    pairs cancel it, so their estimates spread far less."""
    model, ids = TinyLM(), tokens()

    def spread(antithetic: bool) -> float:
        values = [
            bofrs.estimate_sensitivity(
                model, ids, metric="cross_entropy", noise_levels=(0.05,), antithetic=antithetic,
                seed=seed, progress=False,
            )["up"]
            for seed in range(6)
        ]  # fmt: skip
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

    assert spread(True) * 5 < spread(False)


def test_kl_on_given_tokens_is_second_order() -> None:
    model, ids = trained(), tokens()
    small, large = (
        bofrs.estimate_sensitivity(model, ids, metric="kl", noise_levels=(t,), draws=4, progress=False)
        for t in (0.01, 0.04)
    )
    for name in ("up", "down"):
        assert small[name] > 0 and large[name] > 0
        # The same slope at both levels: the increase grows as t^2.
        assert small[name] == pytest.approx(large[name], rel=0.3)


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
    with pytest.raises(ValueError, match="metric"):
        bofrs.estimate_sensitivity(model, tokens(), metric="mse", progress=False)
    with pytest.raises(ValueError, match="tokens"):
        bofrs.estimate_sensitivity(model, metric="cross_entropy", progress=False)
    with pytest.raises(ValueError, match="tokens"):
        bofrs.perplexity(model, torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        bofrs.perplexity(model, torch.zeros(5, dtype=torch.float32))
    with pytest.raises(ValueError, match="format"):
        bofrs.layer_errors(model, ["nf4 @ 64"])


def test_fake_quantized_swaps_weights_and_restores_them_exactly() -> None:
    model, ids = trained(), tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bofrs.fake_quantized(model, "nf4"):
        for name in ("up", "down"):
            weight = getattr(model, name).weight
            want = bofrs.pack(before[f"{name}.weight"], "nf4").dequantize(torch.float32)
            assert torch.equal(weight, want)
        assert torch.equal(model.lm_head.weight, before["lm_head.weight"])  # skipped
        quantized = bofrs.perplexity(model, ids)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(RuntimeError, match="inside"):
        with bofrs.fake_quantized(model, {"up": "higgs2p1@64"}):
            assert not torch.equal(model.up.weight, before["up.weight"])
            raise RuntimeError("inside")
    assert torch.equal(model.up.weight, before["up.weight"])
    with pytest.raises(ValueError, match="choice"):
        with bofrs.fake_quantized(model, {"nope": "nf4"}):
            pass
    result = bofrs.evaluate_formats(
        model, ["nf4", ("mixed", {"up": "nf4", "down": "bf16"})], ids, progress=False
    )
    assert result["formats"]["nf4"]["perplexity"] == pytest.approx(quantized, rel=1e-6)
    with bofrs.fake_quantized(model, {"up": "nf4", "down": "bf16"}):
        mixed = bofrs.perplexity(model, ids)
    assert result["formats"]["mixed"]["perplexity"] == pytest.approx(mixed, rel=1e-6)
    assert result["formats"]["mixed"]["choices"] == {"up": "nf4", "down": "bf16"}
    with pytest.raises(ValueError, match="every"):
        bofrs.evaluate_formats(model, [("half", {"up": "nf4"})], ids, progress=False)


def test_allocate_model_spends_bits_where_alphas_are_large() -> None:
    model = trained()
    errors = bofrs.layer_errors(model, ["higgs2p1@64", "nf4", "bf16"])
    sizes = {n: dict(model.named_modules())[n].weight.numel() for n in errors}
    budget = (4.25 * sizes["up"] + 16 * sizes["down"]) / sum(sizes.values())
    choice, plan = bofrs.allocate_model(model, {"up": 1e-6, "down": 5.0}, errors, budget)
    assert choice["down"] == "bf16" and choice["up"] != "bf16"
    assert plan.average_bits <= budget + 1e-9
    flipped, _ = bofrs.allocate_model(model, {"up": 5.0, "down": -1.0}, errors, budget)
    assert flipped["up"] == "bf16" and flipped["down"] != "bf16"  # negative alpha counts as 0
    only, _ = bofrs.allocate_model(model, {"up": 1.0, "down": 1.0}, errors, 3.0, formats=["higgs2p1@64"])
    assert set(only.values()) == {"higgs2p1@64"}
    with pytest.raises(ValueError, match="alphas"):
        bofrs.allocate_model(model, {"up": 1.0}, errors, 4.25)


def test_quant_config_from_allocation_reproduces_the_measured_errors() -> None:
    model = trained()
    choice = {"up": "higgs3p2", "down": "bof4s@32+rot"}
    errors = bofrs.layer_errors(model, ["higgs3p2", "bof4s@32+rot"])
    shapes = {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = bofrs.QuantConfig.from_allocation(choice, shapes, codebook="nf4")
    originals = {n: getattr(model, n).weight.detach().clone() for n in choice}
    bofrs.quantize_model(model, config, progress=False)
    assert isinstance(model.up, bofrs.nn.HiggsLinear) and isinstance(model.down, bofrs.nn.QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)
    for name, spec in choice.items():
        w = originals[name]
        back = getattr(model, name).packed.dequantize(torch.float32)
        t2 = float(((back - w) ** 2).sum() / (w**2).sum())
        assert t2 == pytest.approx(errors[name][spec][1], rel=1e-6)
    kept = bofrs.QuantConfig.from_allocation({"up": "bf16"}, shapes)
    assert kept.spec_for("up") is None and kept.spec_for("down") is not None
    with pytest.raises(ValueError, match="in_features"):
        bofrs.QuantConfig.from_allocation({"nope": "nf4"}, shapes)
    with pytest.raises(ValueError, match="spec"):
        bofrs.QuantConfig.from_allocation({"up": "nf4 @ 64"}, shapes)


@pytest.mark.parametrize("specs", [("higgs5p1", "higgs6p1@64"), ("higgs6p1", "higgs5p1@16")])
def test_five_and_six_bit_scalar_higgs_specs_work_end_to_end(specs: tuple[str, str]) -> None:
    model = trained()
    errors = bofrs.layer_errors(model, ["higgs4p1", *specs])
    for name, row in errors.items():
        width = getattr(model, name).in_features
        for spec in specs:
            bits = int(spec[5])
            group = int(spec.split("@")[1]) if "@" in spec else bofrs.eval.linearity.spec_options(spec, width)["group_size"]
            assert row[spec][0] == pytest.approx(bits + 16 / group)
            # The relative error is about the grid's MSE (Lloyd-Max: 0.0025 at 5 bits, 0.00064 at 6).
            assert row[spec][1] < row["higgs4p1"][1]
            assert row[spec][1] == pytest.approx(bofrs.higgs_grid(bits, 1).mse, rel=0.5)
    choice = dict(zip(("up", "down"), specs))
    shapes = {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = bofrs.QuantConfig.from_allocation(choice, shapes)
    assert bofrs.QuantConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    originals = {n: getattr(model, n).weight.detach().clone() for n in choice}
    bofrs.quantize_model(model, config, progress=False)
    for name, spec in choice.items():
        layer = getattr(model, name)
        assert isinstance(layer, bofrs.nn.HiggsLinear) and layer.packed.grid.n == 2 ** int(spec[5])
        back = layer.packed.dequantize(torch.float32)
        t2 = float(((back - originals[name]) ** 2).sum() / (originals[name] ** 2).sum())
        assert t2 == pytest.approx(errors[name][spec][1], rel=1e-6)


def test_calibrate_errors_scales_each_format_to_its_measured_increase() -> None:
    model, ids = trained(), tokens()
    alphas = bofrs.estimate_sensitivity(model, ids, metric="cross_entropy", noise_levels=(0.05,), draws=2, progress=False)
    errors = bofrs.layer_errors(model, ["nf4", "higgs2p1@64", "bf16"])
    scaled, factors = bofrs.calibrate_errors(model, ids, alphas, errors)
    assert factors["bf16"] == 1.0  # predicted change under 1e-4: left alone
    base = bofrs.cross_entropy(model, ids)
    for spec in ("nf4", "higgs2p1@64"):
        with bofrs.fake_quantized(model, spec):
            measured = bofrs.cross_entropy(model, ids) - base
        predicted = sum(alphas[n] * errors[n][spec][1] for n in errors)
        assert factors[spec] == pytest.approx(measured / predicted, rel=1e-6)
        assert sum(alphas[n] * scaled[n][spec][1] for n in errors) == pytest.approx(measured, rel=1e-6)
        assert all(scaled[n][spec][0] == errors[n][spec][0] for n in errors)  # bits unchanged
    with pytest.raises(ValueError, match="metric"):
        bofrs.calibrate_errors(model, ids, alphas, errors, metric="perplexity")
    with pytest.raises(ValueError, match="alphas"):
        bofrs.calibrate_errors(model, ids, {"up": 1.0}, errors)
