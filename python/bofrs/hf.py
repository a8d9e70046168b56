"""transformers plug-in: ``BofrsConfig`` and its quantizer, registered under ``quant_method="bofrs"``.

Importing this module (or touching ``bofrs.BofrsConfig``) registers both with transformers'
public hooks (``register_quantization_config`` / ``register_quantizer``). Then

- ``AutoModelForCausalLM.from_pretrained(path, quantization_config=BofrsConfig(...))``
  quantizes every Linear layer on load (``lm_head`` and transformers' default skips excepted),
- ``save_pretrained`` writes the packed buffers (``*.codes``, ``*.scales``) and the
  ``quantization_config``,
- ``from_pretrained`` of that directory rebuilds the same QuantLinear layers, bit for bit (import
  ``bofrs.hf`` first, so transformers knows ``quant_method="bofrs"``).

Needs the ``hf`` extra (transformers, accelerate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bofrs._dtypes import SCALE_DTYPES
from bofrs.formats.blockwise.codebooks import Codebook, resolve
from bofrs.formats.blockwise.packed import PackedTensor
from bofrs.formats.format import BlockwiseFormat
from bofrs.formats.pack import pack
from bofrs.nn.linear import FUSED_MAX_TOKENS, QuantLinear
from bofrs.nn.quantize import QuantConfig, linear_layers, matches

METHOD = "bofrs"


class BofrsConfig(QuantizationConfigMixin):
    """transformers ``quantization_config`` for bofrs (the options of :class:`bofrs.QuantConfig`).

    ``codebook`` is a built-in name or a codebook dict (``Codebook.to_dict()``); ``skip`` lists
    module-name patterns kept in full precision; ``overrides`` maps patterns to per-layer options.
    """

    def __init__(
        self,
        codebook: str | dict[str, Any] = "nf4",
        block_size: int = 64,
        scale_dtype: str = "bfloat16",
        skip: list[str] | tuple[str, ...] = ("lm_head",),
        overrides: dict[str, dict[str, Any]] | None = None,
        fused_max_tokens: int = FUSED_MAX_TOKENS,
        **kwargs: Any,
    ) -> None:
        self.quant_method = METHOD  # type: ignore[assignment]  # a registered custom method
        if isinstance(codebook, Codebook):
            codebook = codebook.to_dict()
        self.codebook = codebook
        self.block_size = block_size
        self.scale_dtype = scale_dtype
        self.skip = list(skip)
        self.overrides = dict(overrides or {})
        self.fused_max_tokens = fused_max_tokens
        self.quant_config()  # validates

    def quant_config(self) -> QuantConfig:
        """The equivalent :class:`bofrs.QuantConfig`."""
        return QuantConfig.from_dict(
            {
                "codebook": self.codebook,
                "block_size": self.block_size,
                "scale_dtype": self.scale_dtype,
                "skip": self.skip,
                "overrides": self.overrides,
                "fused_max_tokens": self.fused_max_tokens,
            }
        )


def _placeholder(layer: nn.Linear, config: QuantConfig, name: str) -> QuantLinear:
    """A QuantLinear with empty (meta) buffers shaped for ``layer`` and the options of ``name``."""
    spec = config.spec_for(name)
    assert spec is not None
    if not isinstance(spec, BlockwiseFormat) or spec.opq is not None or spec.rotation is not None or spec.scale_dtype == "dq8":
        raise ValueError(
            f"{name}: the transformers plug-in stores plain block-wise formats (no OPQ, rotation, dq8 "
            f"or HIGGS), got {spec}; use bofrs.quantize_model and bofrs.save_quantized for those"
        )
    out_features, in_features = layer.out_features, layer.in_features
    numel = out_features * in_features
    device = torch.device("meta")
    packed = PackedTensor(
        torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device),
        torch.empty(-(-numel // spec.block_size), dtype=SCALE_DTYPES[spec.scale_dtype], device=device),
        (out_features, in_features),
        layer.weight.dtype,
        spec.block_size,
        resolve(spec.codebook, spec.block_size),
    )
    bias = None if layer.bias is None else torch.empty(out_features, dtype=layer.bias.dtype, device=device)
    return QuantLinear(packed, bias, fused_max_tokens=config.fused_max_tokens)


class BofrsQuantize(ConversionOps):
    """Load-time op: a float ``<layer>.weight`` from the checkpoint becomes ``codes`` + ``scales``."""

    def __init__(self, hf_quantizer: BofrsHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(  # type: ignore[override]
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        assert model is not None and full_layer_name is not None
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)  # consumed: it becomes codes + scales
        _, value = next(iter(input_dict.items()))
        if isinstance(value, (list, tuple)):
            value = value[0]
        layer_name = full_layer_name.removesuffix(".weight")
        layer = model.get_submodule(layer_name)
        assert isinstance(layer, QuantLinear)
        packed = pack(
            value,
            layer.codebook,
            layer.block_size,
            scale_dtype=str(layer.scales.dtype).removeprefix("torch."),
        )
        return {f"{layer_name}.codes": packed.codes, f"{layer_name}.scales": packed.scales}


class BofrsHfQuantizer(HfQuantizer):
    """Replaces Linear layers by QuantLinear before loading; packs float weights as they load."""

    requires_calibration = False
    quantization_config: BofrsConfig

    @property
    def quantized_element_size(self) -> float | None:
        return 0.5

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        config = self.quantization_config.quant_config()
        keep = self.get_modules_to_not_convert(
            model,
            list(config.skip),
            getattr(model, "_keep_in_fp32_modules", None),
            add_default_skips=True,
        )
        for name, parent, attr, layer in list(linear_layers(model)):
            if any(matches(name, p) for p in keep) or config.spec_for(name) is None:
                continue
            quant = _placeholder(layer, config, name)
            if not self.pre_quantized:
                # The checkpoint's float weight lands here, then BofrsQuantize packs it.
                quant.weight = nn.Parameter(
                    torch.empty(layer.weight.shape, dtype=layer.weight.dtype, device="meta"),
                    requires_grad=False,
                )
            setattr(parent, attr, quant)

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        layer_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(layer_name)
        except AttributeError:
            return False
        return isinstance(module, QuantLinear) and tensor_name == "weight"

    def get_quantize_ops(self) -> BofrsQuantize:
        return BofrsQuantize(self)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module._parameters.pop("weight", None)
                if module.codes.device.type == "meta" or module.scales.device.type == "meta":
                    raise ValueError("bofrs: a quantized layer received no weights from the checkpoint")
                module.invalidate_caches()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Registers ``BofrsConfig`` and the quantizer with transformers (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(BofrsConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(BofrsHfQuantizer)


register()

__all__ = ["BofrsConfig", "BofrsHfQuantizer", "register"]
