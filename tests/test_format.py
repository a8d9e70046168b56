"""The Format value: spec strings both ways, pack options, file manifests, the packed tensor's
own format, QuantConfig overrides by format, and clear errors for bad specs."""

from __future__ import annotations

import bofrs
import numpy as np
import pytest
import torch
from bofrs import BlockwiseFormat, Format, HiggsFormat, KeepFormat

SPECS = [
    "nf4", "af4@32", "bof4s@128+opq", "bof4s+opq=0.99", "bof4s+rot", "nf4+rot=256", "nf4+dq8",
    "bof4-mae+scales=float16", "bof4s+opq+outliers=float16", "int4@4096+scales=float32",
    "higgs4p2", "higgs3p2@1024", "higgs2p1+scales=bfloat16", "bf16", "fp16",
]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
def test_canonical_specs_round_trip(spec: str) -> None:
    fmt = Format.parse(spec)
    assert str(fmt) == spec
    assert Format.parse(str(fmt)) == fmt
    assert hash(Format.parse(spec)) == hash(fmt)


def test_spec_options_in_any_order_and_legacy_forms() -> None:
    a = Format.parse("bof4s@64+dq8+rot+opq")
    assert a == BlockwiseFormat("bof4s", 64, "dq8", 0.95, "bfloat16", "hadamard")
    assert str(a) == "bof4s+opq+rot+dq8"
    assert Format.parse("higgs4p2@256") == HiggsFormat(4, 2, 256, "float16")
    assert Format.parse("fp16") == KeepFormat("float16")


@pytest.mark.parametrize("bad,match", [
    ("nf5", "unknown codebook"), ("nf4@48", "block_size"), ("nf4+opq=2", "opq"),
    ("nf4+opq=x", "takes a number"), ("nf4+fast", "unknown option"), ("nf4+opq+opq", "twice"),
    ("nf4+dq8+scales=float16", "both set"), ("nf4+scales=int8", "scale_dtype"),
    ("higgs7p2", "HIGGS grid|no HIGGS|bits"), ("higgs4p2+opq", "unknown option"), ("", "unknown format"),
    ("nf4+rot=100", "group_size"),
])  # fmt: skip
def test_bad_specs_raise_naming_the_problem(bad: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Format.parse(bad)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="format spec"):
        Format.parse(3)  # type: ignore[arg-type]


def test_options_make_the_same_format_and_the_same_pack() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 512, generator=g)
    for spec in ("bof4s@128+opq", "nf4+rot+dq8", "af4@32+scales=float16", "higgs4p2@256", "higgs3p1@512"):
        fmt = Format.parse(spec)
        options = fmt.options()
        assert Format.from_options(**options) == (fmt if isinstance(fmt, BlockwiseFormat) else fmt.resolved(512))
        direct = bofrs.pack(w, **options)
        by_spec = bofrs.pack(w, spec)
        by_format = fmt.pack(w)
        for other in (by_spec, by_format):
            assert torch.equal(other.codes, direct.codes) and torch.equal(other.scales, direct.scales)
        assert by_format.format == fmt.resolved(512) or isinstance(fmt, BlockwiseFormat) and fmt.rotation == "hadamard"


def test_packed_tensors_report_their_format_and_it_packs_the_same() -> None:
    w = torch.randn(16, 1024)
    packed = bofrs.pack(w, "bof4s", 128, opq=0.99, outlier_dtype="float16", rotation="hadamard")
    fmt = packed.format
    assert isinstance(fmt, BlockwiseFormat)
    assert (fmt.block_size, fmt.opq, fmt.outlier_dtype, fmt.rotation) == (128, 0.99, "float16", 1024)
    again = fmt.pack(w)
    assert torch.equal(again.codes, packed.codes) and torch.equal(again.dequantize(), packed.dequantize())
    h = bofrs.pack_higgs(w, 3, 2, 256, scale_dtype="bfloat16")
    assert h.format == HiggsFormat(3, 2, 256, "bfloat16")
    assert torch.equal(h.format.pack(w).codes, h.codes)


def test_manifest_round_trip_and_files_agree(tmp_path: object) -> None:
    w = torch.randn(8, 256)
    for spec in ("nf4+opq", "bof4s@32+dq8+rot=128", "higgs4p2@256"):
        packed = Format.parse(spec).pack(w)
        entry = packed.manifest()
        assert Format.from_manifest(entry) == packed.format
        for key, value in packed.format.manifest().items():
            if key == "outliers":
                assert {k: entry[key][k] for k in value} == value
            else:
                assert entry[key] == value, key


def test_resolved_picks_natural_groups_and_drops_impossible_rotations() -> None:
    assert Format.parse("higgs4p2").resolved(576).group_size == 64
    assert Format.parse("higgs4p2").resolved(4096).group_size == 1024
    assert Format.parse("higgs4p2").resolved(7).group_size == 16
    assert Format.parse("nf4+rot").resolved(40).rotation is None  # 40 = 8 x 5: no group of 16
    assert Format.parse("nf4+rot").resolved(576).rotation == "hadamard"


def test_keep_format_fake_quantizes_to_16_bits_and_refuses_to_pack() -> None:
    w = torch.randn(4, 64, dtype=torch.float32)
    assert torch.equal(KeepFormat("bfloat16").fake_quantize(w), w.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="nothing to pack"):
        KeepFormat().pack(w)
    assert KeepFormat().options() == {"skip": True}


def test_fake_quantize_equals_pack_then_dequantize() -> None:
    w = torch.randn(24, 576, dtype=torch.bfloat16)
    for spec in ("nf4", "bof4s+opq+rot", "higgs4p2"):
        fmt = Format.parse(spec)
        want = fmt.resolved(576).pack(w.float()).dequantize(torch.float32).to(torch.bfloat16)
        got = fmt.fake_quantize(w)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), spec


def test_quant_config_takes_formats_as_overrides() -> None:
    config = bofrs.QuantConfig(
        overrides={"mlp.*": "higgs4p2@256", "attn.q": Format.parse("bof4s@128+opq"), "head": "bf16"}
    )
    assert config.spec_for("layers.0.mlp.up") == HiggsFormat(4, 2, 256, "float16")
    assert config.spec_for("layers.0.attn.q") == Format.parse("bof4s@128+opq")
    assert config.spec_for("x.head") is None
    assert config.spec_for("other") == Format.parse("nf4")
    again = bofrs.QuantConfig.from_dict(config.to_dict())
    assert again.spec_for("layers.0.mlp.up") == config.spec_for("layers.0.mlp.up")
    whole = bofrs.QuantConfig.from_format("af4@32+dq8", skip=())
    assert whole.spec_for("lm_head") == Format.parse("af4@32+dq8")
    with pytest.raises(ValueError, match="16 bits"):
        bofrs.QuantConfig.from_format("bf16")
    with pytest.raises(TypeError, match=r"overrides\['x'\]"):
        bofrs.QuantConfig(overrides={"x": 3})  # type: ignore[dict-item]


def test_quantize_model_packs_each_layer_in_its_format() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 256))
    bofrs.quantize_model(model, bofrs.QuantConfig(overrides={"1": "higgs4p1@64"}), progress=False)
    assert isinstance(model[0], bofrs.nn.QuantLinear) and str(model[0].packed.format) == "nf4"
    assert isinstance(model[1], bofrs.nn.HiggsLinear) and str(model[1].packed.format) == "higgs4p1@64"


def test_pack_refuses_a_spec_with_options_given_twice() -> None:
    with pytest.raises(ValueError, match="do not also pass"):
        bofrs.pack(torch.randn(4, 64), "nf4+opq", opq=0.9)
    with pytest.raises(ValueError, match="unknown option"):
        bofrs.pack(torch.randn(4, 64), "nf4+opqq")
    assert bofrs.pack(np.ones((2, 64), dtype=np.float32), "higgs4p2@64").format.group_size == 64
