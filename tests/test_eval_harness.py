"""bofrs.evaluate_formats on a tiny causal language model: KL, perplexity and top-1 against a
float64 brute force, the reference stream, pairing, restoration and the per-layer study."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bofrs
from bofrs.eval.linearity import dequantized, linear_layers
from bofrs.eval import (
    DecodedFormat, InputMoments, ReferenceLogProbs, compare, evaluate_formats, format_table,
    output_error, per_layer_study, per_layer_summary, per_layer_summary_table, per_layer_table, ranking,
    score_window, spearman, token_windows,
)  # fmt: skip
from tiny_models import tiny_llama


class TinyLM(nn.Module):
    """Embedding, a causal running mean (context), two residual MLP blocks, a head; ``gate`` and
    ``up`` read the same tensor (as q/k/v do in a transformer)."""

    def __init__(self, vocab: int = 61, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 128)
        self.up = nn.Linear(hidden, 128)
        self.down = nn.Linear(128, hidden)
        self.lm_head = nn.Linear(hidden, vocab)
        with torch.no_grad():
            for layer in (self.mix, self.gate, self.up, self.down, self.lm_head):
                layer.weight.mul_(3.0)  # sharper distributions: quantization shows in KL

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = torch.cumsum(h, 1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        h = h + self.mix(h)
        x = torch.nn.functional.layer_norm(h, h.shape[-1:])
        h = h + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        out: torch.Tensor = self.lm_head(h)
        return out


@pytest.fixture
def model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 61, (7, 29), generator=torch.Generator().manual_seed(1))


def _exact(model: nn.Module, tokens: torch.Tensor, reference: list[torch.Tensor]) -> tuple[float, float, float]:
    """Mean KL, perplexity and top-1 agreement in float64 from full logits."""
    kl = nll = agree = 0.0
    with torch.no_grad():
        for window, ref in zip(tokens, reference):
            q = torch.log_softmax(model(window[None])[0, :-1].double(), -1)
            kl += float((ref.exp() * (ref - q)).sum())
            nll -= float(q.gather(1, window[1:, None]).sum())
            agree += float((q.argmax(-1) == ref.argmax(-1)).sum())
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return kl / n, math.exp(nll / n), agree / n


def test_scores_match_a_float64_brute_force(model: TinyLM, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        reference = [torch.log_softmax(model(w[None])[0, :-1].double(), -1) for w in tokens]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate_formats(model, ["bof4s", ("mixed", {"mix": "nf4", "gate": "bof4s", "up": "af4",
                                                          "down": "bf16"})], tokens, progress=False)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored exactly
    assert list(result["formats"]) == ["nf4", "bof4s", "mixed"]  # the baseline comes first
    ref_ppl = math.exp(-sum(float(r.gather(1, w[1:, None]).sum()) for r, w in zip(reference, tokens))
                       / (7 * 28))  # fmt: skip
    assert result["baseline_perplexity"] == pytest.approx(ref_ppl, rel=1e-6)
    for label in ("nf4", "bof4s"):
        with bofrs.fake_quantized(model, label):
            kl, ppl, agree = _exact(model, tokens, reference)
        entry = result["formats"][label]
        assert kl > 1e-3  # the test model is sensitive enough to see the formats
        assert entry["kl"]["value"] == pytest.approx(kl, rel=2e-3)  # float16 reference storage
        assert entry["perplexity"] == pytest.approx(ppl, rel=1e-6)
        assert entry["top1"]["value"] == pytest.approx(agree, abs=1.5 / (7 * 28))
        for key in ("kl", "kl_p99", "top1"):
            assert entry[key]["ci"][0] <= entry[key]["value"] <= entry[key]["ci"][1]
        assert entry["perplexity_ci"][0] <= entry["perplexity"] <= entry["perplexity_ci"][1]
        assert sum(entry["per_window"]["kl"]) / (7 * 28) == pytest.approx(entry["kl"]["value"])
    nf4 = result["formats"]["nf4"]["vs_baseline"]
    assert nf4["kl_diff"] == {"value": 0.0, "ci": [0.0, 0.0]}
    diff = result["formats"]["bof4s"]["vs_baseline"]["kl_diff"]
    assert diff["value"] == pytest.approx(result["formats"]["bof4s"]["kl"]["value"] - result["formats"]["nf4"]["kl"]["value"])
    again = compare(result, "bof4s", "nf4")
    assert again.value == pytest.approx(diff["value"]) and [again.low, again.high] == pytest.approx(diff["ci"])
    assert result["formats"]["mixed"]["choices"]["down"] == "bf16"
    quantized = sum(m.weight.numel() for m in linear_layers(model).values())
    total = sum(p.numel() for p in model.parameters())
    assert result["parameters"] == {"quantized": quantized, "total": total,
                                    "quantized_share": quantized / total, "tied": {}}  # fmt: skip
    assert result["tokens"] == {"windows": 7, "length": 29, "scored": 196, "first_token": int(tokens[0, 0])}
    table = format_table(result)
    assert "| unquantized |" in table and "| mixed |" in table and "KL - nf4" in table
    assert len(ranking(result)) == 2
    assert "unreliable below 10" in table  # 7 windows


def test_unchanged_weights_give_zero_kl_and_the_reference_perplexity(model: TinyLM, tokens: torch.Tensor) -> None:
    same = DecodedFormat("same", {n: m.weight.detach().clone() for n, m in linear_layers(model).items()},
                         {n: 32.0 for n in linear_layers(model)})  # fmt: skip
    result = evaluate_formats(model, [same], tokens, baseline=None, progress=False)
    entry = result["formats"]["same"]
    assert 0 <= entry["kl"]["value"] < 1e-6  # only the float16 rounding of the stored reference
    assert entry["perplexity"] == pytest.approx(result["baseline_perplexity"], rel=1e-12)
    assert entry["top1"]["value"] == 1.0 and entry["mean_t2"] == 0.0 and entry["bits_per_weight"] == 32.0
    assert "vs_baseline" not in entry and result["baseline"] is None


def test_weight_errors_without_text_and_bad_formats(model: TinyLM, tokens: torch.Tensor) -> None:
    result = evaluate_formats(model, ["nf4", "bof4s+opq"], progress=False)
    assert "reference" not in result and "kl" not in result["formats"]["nf4"]
    assert result["formats"]["nf4"]["bits_per_weight"] == 4.25
    assert result["formats"]["bof4s+opq"]["mean_t2"] < result["formats"]["nf4"]["mean_t2"]
    assert "| nf4 | 4.2500 |" in format_table(result)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {n: m.weight.detach().clone() for n, m in linear_layers(model).items()}
    bits = {n: 4.0 for n in weights}
    broken = dict(weights, down=torch.full_like(weights["down"], float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_formats(model, ["nf4", DecodedFormat("nan", broken, bits)], tokens, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="shape"):
        evaluate_formats(model, [DecodedFormat("t", dict(weights, mix=weights["mix"].T[:, :3]), bits)],
                         progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="exactly the evaluated layers"):
        evaluate_formats(model, [DecodedFormat("t", {"mix": weights["mix"]}, {"mix": 4.0})], progress=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate_formats(model, ["nf4", "nf4"], progress=False)
    with pytest.raises(ValueError, match="every evaluated layer"):
        evaluate_formats(model, [("m", {"mix": "nf4"})], progress=False)
    with pytest.raises(ValueError, match="unit"):
        evaluate_formats(model, ["nf4"], tokens, unit="sentence", progress=False)
    with pytest.raises(ValueError, match="tokens"):
        evaluate_formats(model, ["nf4"], tokens[0], progress=False)


def test_bad_specs_fail_before_the_reference_pass(
    model: TinyLM, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reference(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference pass ran before the formats were checked")

    monkeypatch.setattr(ReferenceLogProbs, "compute", no_reference)
    layers = list(linear_layers(model))
    with pytest.raises(ValueError, match="formats: .*unknown codebook 'nf5'"):
        evaluate_formats(model, ["nf4", "nf5"], tokens, progress=False)
    with pytest.raises(ValueError, match="formats: 'm': .*bogus"):
        evaluate_formats(model, [("m", dict.fromkeys(layers, "nf4+bogus"))], tokens, progress=False)
    with pytest.raises(ValueError, match="baseline: .*'nf9'"):
        evaluate_formats(model, ["bof4s"], tokens, baseline="nf9", progress=False)
    with pytest.raises(TypeError, match="formats: a spec string"):
        evaluate_formats(model, [4], tokens, progress=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="formats: .*'nf5'"):
        per_layer_study(model, ["nf5"], tokens, progress=False)
    # a Format value works wherever a spec string does
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bofrs.fake_quantized(model, bofrs.Format.parse("bof4s@32")):
        assert torch.equal(model.mix.weight, dequantized(before["mix.weight"], "bof4s@32"))
    with bofrs.fake_quantized(model, {"mix": bofrs.Format.parse("nf4"), "up": "bf16"}):
        assert torch.equal(model.up.weight, before["up.weight"].bfloat16().float())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reference_is_reused_only_for_the_same_model_and_tokens(
    model: TinyLM, tokens: torch.Tensor, tmp_path: Path
) -> None:
    first = evaluate_formats(model, ["bof4s"], tokens, reference=tmp_path, progress=False)
    with ReferenceLogProbs.compute(model, tokens, tmp_path) as ref:
        assert ref.reused and ref.windows == 7 and ref.vocab == 61
        assert ref.logprobs(0).dtype == torch.float16 and ref.logprobs(0).shape == (28, 61)
    assert not first["formats"]["bof4s"]["scores_reused"]
    second = evaluate_formats(model, ["bof4s", "bof4"], tokens, reference=tmp_path, progress=False)
    assert second["formats"]["bof4s"]["scores_reused"] and not second["formats"]["bof4"]["scores_reused"]
    assert second["formats"]["nf4"]["scores_reused"]
    assert second["formats"]["bof4s"]["kl"] == first["formats"]["bof4s"]["kl"]
    assert second["formats"]["bof4s"]["vs_baseline"] == first["formats"]["bof4s"]["vs_baseline"]
    assert second["reference"]["fingerprint"] == first["reference"]["fingerprint"] is not None
    fresh = evaluate_formats(model, ["bof4s"], tokens, progress=False)  # temporary reference
    assert fresh["formats"]["bof4s"]["kl"] == first["formats"]["bof4s"]["kl"]
    assert fresh["reference"]["fingerprint"] is None
    with torch.no_grad():
        model.lm_head.bias.add_(0.5)
    with ReferenceLogProbs.compute(model, tokens, tmp_path) as ref:
        assert not ref.reused  # another model: recomputed
    third = evaluate_formats(model, ["bof4s"], tokens, reference=tmp_path, progress=False)
    assert not third["formats"]["bof4s"]["scores_reused"]
    with ReferenceLogProbs.compute(model, tokens[:3], tmp_path) as ref:
        assert not ref.reused and ref.windows == 3  # other tokens: recomputed


def test_score_window_handles_impossible_tokens() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(70, 33, generator=gen) * 4
    ref_logits = torch.randn(70, 33, generator=gen) * 4
    ref_logits[:, :5] = float("-inf")  # tokens the reference rules out
    ref = torch.log_softmax(ref_logits.double(), -1)
    targets = torch.randint(5, 33, (70,), generator=gen)
    scores = score_window(logits, ref.half(), targets, ref.argmax(-1), chunk=16)
    q = torch.log_softmax(logits.double(), -1)
    p = ref.exp()
    exact = torch.where(p > 0, p * (ref - q), torch.zeros(()).double()).sum(-1)
    assert np.all(np.isfinite(scores.kl))
    np.testing.assert_allclose(scores.kl, exact.numpy(), rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(scores.nll, -q.gather(1, targets[:, None])[:, 0].numpy(), rtol=1e-6)
    assert np.array_equal(scores.agree, (q.argmax(-1) == ref.argmax(-1)).numpy())
    with pytest.raises(ValueError, match="reference"):
        score_window(logits, ref[:3], targets, ref.argmax(-1))


def test_windows_start_with_bos_when_the_model_wants_it() -> None:
    ids = torch.arange(1, 24)
    plain = token_windows(ids, 5)
    assert plain.tolist()[:2] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]] and plain.shape == (4, 5)
    with_bos = token_windows(torch.cat([torch.tensor([0]), ids]), 5, bos=0)  # a leading BOS is dropped
    assert with_bos.shape == (5, 5) and with_bos[:, 0].tolist() == [0] * 5
    assert with_bos[:, 1:].reshape(-1).tolist() == list(range(1, 21))  # each text token once
    assert token_windows(ids, 5, bos=0, max_windows=2).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(ids[:3], 5)
    with pytest.raises(ValueError, match="length"):
        token_windows(ids, 1)


def test_input_moments_and_output_error_match_brute_force(model: TinyLM, tokens: torch.Tensor) -> None:
    layers = linear_layers(model)
    moments = InputMoments(layers)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: captured[n].append(a[0].detach()))
             for n, m in layers.items()]  # fmt: skip
    try:
        with torch.no_grad():
            for w in tokens[:3]:
                moments.new_pass()
                model(w[None])
    finally:
        moments.new_pass()
        moments.remove()
        for h in hooks:
            h.remove()
    assert moments.alias["up"] == "gate" and set(moments.sums) == {"mix", "gate", "down"}
    for name, layer in layers.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[name]]).double()
        decoded = dequantized(layer.weight, "nf4")
        d = (decoded - layer.weight).detach().double()
        exact = float((x @ d.T).pow(2).sum() / (x @ layer.weight.detach().double().T).pow(2).sum())
        assert output_error(layer.weight, decoded, moments.moment(name)) == pytest.approx(exact, rel=1e-6)
    eye = torch.eye(64, dtype=torch.float64)
    w = layers["mix"].weight.detach()
    t2 = float((dequantized(w, "nf4") - w).pow(2).sum() / w.pow(2).sum())
    assert output_error(w, dequantized(w, "nf4"), eye) == pytest.approx(t2, rel=1e-5)


def test_per_layer_study(model: TinyLM, tokens: torch.Tensor) -> None:
    study = per_layer_study(model, ["nf4", "bf16"], tokens[:2], progress=False)
    assert list(study["layers"]) == ["mix", "gate", "up", "down"]
    for record in study["layers"].values():
        assert record["kl"]["nf4"] > 0 and record["kl"]["bf16"] < record["kl"]["nf4"]
        assert record["t2"]["nf4"] > 0 and record["output_error"]["nf4"] > 0
        assert record["bits"]["nf4"] == 4.25 and record["input_energy_max_over_mean"] >= 1
    one = per_layer_study(model, ["nf4"], tokens[:2], layers=["mix"], progress=False)
    assert list(one["layers"]) == ["mix"]
    assert one["sum_kl"]["nf4"] == pytest.approx(study["layers"]["mix"]["kl"]["nf4"])
    # the same as evaluate_formats with only that layer's weights changed
    weights = {n: m.weight.detach().clone() for n, m in linear_layers(model).items()}
    weights["mix"] = dequantized(model.mix.weight, "nf4")
    alone = DecodedFormat("mix alone", weights, {n: 4.25 for n in weights})
    result = evaluate_formats(model, [alone], tokens[:2], baseline=None, progress=False)
    assert result["formats"]["mix alone"]["kl"]["value"] == pytest.approx(study["layers"]["mix"]["kl"]["nf4"], rel=1e-9)
    table = per_layer_table(study)
    assert table.startswith("| layer |") and "sum over layers" in table
    with pytest.raises(ValueError, match="layers"):
        per_layer_study(model, ["nf4"], tokens, layers=["nothing"], progress=False)


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 6, 17).astype(float)  # many ties
        y = x + rng.normal(0, 2, 17)
        assert spearman(x, y) == pytest.approx(float(spearmanr(x, y)[0]), abs=1e-12)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_per_layer_summary_counts_agreements() -> None:
    def layer(numel: int, kl: tuple[float, float], t2: tuple[float, float], out: tuple[float, float]) -> dict:
        return {"numel": numel, "kl": dict(zip("ab", kl)), "t2": dict(zip("ab", t2)),
                "output_error": dict(zip("ab", out))}  # fmt: skip

    study = {"formats": ["a", "b"], "layers": {
        "x": layer(1, (3.0, 1.0), (1.0, 2.0), (5.0, 1.0)),   # KL follows out, not t2
        "y": layer(3, (1.0, 2.0), (1.0, 2.0), (1.0, 2.0)),   # both agree
        "z": layer(4, (4.0, 1.0), (1.0, 1.5), (3.0, 2.0)),   # KL follows out, not t2
    }}  # fmt: skip
    summary = per_layer_summary(study)
    a = summary["formats"]["a"]
    assert a["sum_kl"] == 8.0 and a["mean_t2"] == pytest.approx(1.0)
    assert a["mean_output_error"] == pytest.approx((5 + 3 + 12) / 8)
    (pair,) = summary["pairs"]
    assert pair["kl_ratio"] == pytest.approx(8.0 / 4.0)
    assert pair["t2_agrees"] == pytest.approx(1 / 3) and pair["output_error_agrees"] == 1.0
    assert [t["layer"] for t in pair["top_layers"]] == ["z", "x", "y"]
    assert pair["top_layers"][0]["kl_diff"] == 3.0
    table = per_layer_summary_table(summary)
    assert "| a vs b | 2.000 | 33 % | 100 % |" in table
    with pytest.raises(ValueError, match="pairs"):
        per_layer_summary(study, [("a", "c")])


def test_tied_weights_are_reported(model: TinyLM) -> None:
    model.lm_head.weight = model.embed.weight  # tied, as Gemma-3's
    result = evaluate_formats(model, ["nf4"], skip=(), progress=False)
    assert result["parameters"]["tied"] == {"lm_head": ["embed.weight"]}


@pytest.mark.parametrize("cols", [640, 576])  # Gemma-3's and SmolLM2's row lengths
def test_fake_quantization_equals_the_quantized_modules(cols: int) -> None:
    import copy

    torch.manual_seed(cols)
    layer = nn.Linear(cols, 48, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(cols) * 5)  # columns of very different size
        layer.weight[3, 7] = 2.5
    x = torch.randn(5, cols)
    for spec in ["nf4", "af4", "bof4s+opq", "bof4s+rot", "bof4s+dq8", "higgs4p2", "int4@32"]:
        quantized = copy.deepcopy(nn.Sequential(layer))
        config = bofrs.QuantConfig.from_allocation({"0": spec}, {"0": cols}, skip=())
        bofrs.quantize_model(quantized, config, progress=False)
        with torch.no_grad():
            expected = quantized(x)
            fake = x @ dequantized(layer.weight, spec).T
        torch.testing.assert_close(fake, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_per_layer_shortcuts_give_the_same_kl() -> None:
    model = tiny_llama(vocab_size=80, intermediate_size=96, num_hidden_layers=3).eval()
    with torch.no_grad():
        for layer in linear_layers(model).values():
            layer.weight.mul_(4.0)
    tokens = torch.randint(0, 80, (2, 25), generator=torch.Generator().manual_seed(3))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    slow = per_layer_study(model, ["nf4"], tokens, layers=names, reuse_prefix=False, progress=False)
    fast = per_layer_study(model, ["nf4"], tokens, layers=names, progress=False)
    assert fast["prefix_reused"] and not slow["prefix_reused"]
    for name in names:
        assert fast["layers"][name]["kl"]["nf4"] > 1e-6
        assert fast["layers"][name]["kl"]["nf4"] == pytest.approx(slow["layers"][name]["kl"]["nf4"], rel=1e-5)
    # every third position: the same per-token KL as scoring them all, subsampled
    strided = per_layer_study(model, ["nf4"], tokens, layers=names[1:], stride=3, progress=False)
    assert strided["tokens"]["scored"] == 2 * 8
    weights = {n: m.weight.detach().clone() for n, m in linear_layers(model).items()}
    weights[names[1]] = dequantized(model.get_submodule(names[1]).weight, "nf4")
    from bofrs.eval.harness import score_model

    with ReferenceLogProbs.compute(model, tokens) as ref:
        layers = linear_layers(model)
        from bofrs.eval import swapped

        with swapped(layers, weights):
            scores = score_model(model, tokens, ref)
    picked = scores.kl.reshape(2, 24)[:, 2::3]
    assert strided["layers"][names[1]]["kl"]["nf4"] == pytest.approx(float(picked.mean()), rel=1e-4)
    with pytest.raises(ValueError, match="stride"):
        per_layer_study(model, ["nf4"], tokens, stride=0, progress=False)
