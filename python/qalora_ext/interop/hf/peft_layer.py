"""PEFT's LoRA on our ``QuantLinear`` layers: ``get_peft_model``, training, ``merge_and_unload``.

PEFT picks a layer class per target module; for layer types it does not know
it consults a mapping set on the ``LoraConfig`` (``_register_custom_module``),
which is not saved with the adapter. So two functions of ours prepare it:

* :func:`prepare_lora_config` -- before ``get_peft_model(model, config)`` or
  ``SFTTrainer(..., peft_config=config)``;
* :func:`load_peft_adapter` -- instead of ``PeftModel.from_pretrained``.

The layer, :class:`QALoRAPeftLinear`, is a PEFT ``LoraLayer``: PEFT's
parameter names (``lora_A.<adapter>.weight`` ...), adapter management
(``set_adapter``, ``disable_adapter``, several adapters), saving and loading.

With ``use_qalora=True`` it keeps PEFT's convention (PEFT 0.21.2,
``QALoraLinearVariant``): ``lora_A`` has shape ``(r, L)`` with
``L = in_features / qalora_group_size``, and the adapter's input is
``mean(x over each group) * L``. So its files are PEFT's own, and
``A_ours = L * A_peft`` (SPEC) is what our fused kernel receives. Two
differences from PEFT's own QA-LoRA layer:

* ``qalora_group_size`` must equal the layer's quantization group size (the
  pooling groups ARE the quantization groups, SPEC); anything else is refused,
  naming both.
* Dropout acts on the POOLED vector (SPEC, as the official QA-LoRA code),
  where PEFT drops input channels before pooling. Inference is identical; in
  training the noise differs (a pooled entry is dropped whole, scaled by
  ``1/(1-p)``), so a run with ``lora_dropout > 0`` is not bit-reproducible
  against PEFT's layer.

``merge`` folds the adapter into the zeros exactly (SPEC "Merge", through
``QALoRALinear.merge``): ``merge_and_unload()`` returns a model whose layers
are ``QuantLinear`` of the same bits with the same codes and scales. A plain
LoRA (``use_qalora=False``) trains on these layers, but its full-rank update
``B A`` cannot be written into INT-b codes, so its merge raises; unmerging
after a merge raises too (the merged zeros are rounded once; reload the
unmerged model instead).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.variants import QALoraLinearVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ... import ops
from ...nn import QALoRALinear, QuantLinear

__all__ = ["QALoRAPeftLinear", "prepare_lora_config", "load_peft_adapter", "DROPOUT_NOTE"]

DROPOUT_NOTE = ("qalora_ext applies lora_dropout to the pooled vector (SPEC), PEFT's use_qalora layer to the input "
                "channels before pooling: identical at inference, different noise in training")


class _QALoRAVariant(QALoraLinearVariant):
    """PEFT's QA-LoRA set-up (``lora_A`` of shape (r, L), ``qalora_group_size`` recorded); the forward and
    merge are :class:`QALoRAPeftLinear`'s own."""


class QALoRAPeftLinear(nn.Module, LoraLayer):
    """A PEFT LoRA layer over a :class:`~qalora_ext.nn.QuantLinear` (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if not isinstance(base, QuantLinear):
            raise TypeError(f"QALoRAPeftLinear wraps a qalora_ext QuantLinear; got {type(base).__name__}")
        _check_config(config, base)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    # -- PEFT hooks ----------------------------------------------------------

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # The adapter's master copy is float32 on the base's device (SPEC), whatever the activations are.
        return base_layer.packed.device, torch.float32

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return _QALoRAVariant() if config.use_qalora else None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        _check_config(config, self.get_base_layer())
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- helpers ---------------------------------------------------------------

    def _is_qalora(self, adapter: str) -> bool:
        return isinstance(self.lora_variant.get(adapter), QALoraLinearVariant)

    def _ours_A(self, adapter: str) -> torch.Tensor:
        """``A_ours = L * A_peft`` in float32 (differentiable: the gradient reaches PEFT's parameter)."""
        base = self.get_base_layer()
        groups = base.in_features // base.group_size
        return self.lora_A[adapter].weight.float() * groups

    def _pool_mask(self, adapter: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        drop = self.lora_dropout[adapter]
        p = float(getattr(drop, "p", 0.0))
        if not self.training or p <= 0.0:
            return None
        base = self.get_base_layer()
        keep = 1.0 - p
        mask = torch.empty((*x.shape[:-1], base.in_features // base.group_size), device=x.device,
                           dtype=torch.float32).bernoulli_(keep)
        return mask.div_(keep)

    # -- forward -------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("adapter_names (PEFT's mixed-batch inference) is not supported on qalora_ext layers; "
                             "use set_adapter")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged:
            return base(x)
        active = [a for a in self.active_adapters if a in self.lora_A]
        pooled = [a for a in active if self._is_qalora(a)]
        plain = [a for a in active if not self._is_qalora(a)]
        if pooled:
            # The first QA-LoRA adapter runs inside the fused kernel (SPEC's pooled epilogue).
            a = pooled[0]
            adapter = ops.PooledAdapter(self._ours_A(a), self.lora_B[a].weight.float(), float(self.scaling[a]),
                                        self._pool_mask(a, x))
            result = base(x, adapter=adapter)
        else:
            result = base(x)
        out_dtype = result.dtype
        for a in pooled[1:]:
            p = x.float().unflatten(-1, (-1, base.group_size)).mean(-1)
            mask = self._pool_mask(a, x)
            if mask is not None:
                p = p * mask
            result = result + ((p @ self._ours_A(a).t()) @ self.lora_B[a].weight.float().t()) * self.scaling[a]
        for a in plain:
            A, B = self.lora_A[a], self.lora_B[a]
            h = self.lora_dropout[a](x.to(A.weight.dtype))
            result = result + B(A(h)) * self.scaling[a]
        return result.to(out_dtype)

    # -- merge ---------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold QA-LoRA adapters into the base's zeros (SPEC "Merge"): same codes and scales, new zeros.

        ``safe_merge`` additionally checks the merged zeros are finite. A plain
        LoRA adapter (``use_qalora=False``) is refused: ``B A`` is a full-rank
        change of every weight, which INT-b codes cannot hold.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        plain = [a for a in adapter_names if a in self.lora_A and not self._is_qalora(a)]
        if plain:
            raise ValueError(f"cannot merge LoRA adapter(s) {plain} into a qalora_ext INT-"
                             f"{self.get_base_layer().bits} layer: they were created with use_qalora=False, a "
                             f"full-rank update that the quantized codes cannot hold. Train with "
                             f"LoraConfig(use_qalora=True, qalora_group_size=<the layer's group size>) to merge "
                             f"exactly, or keep the adapter unmerged")
        base = self.get_base_layer()
        for a in adapter_names:
            if a not in self.lora_A:
                continue
            B = self.lora_B[a]
            if getattr(B, "bias", None) is not None:
                raise ValueError(f"adapter {a!r} has lora_bias=True, which qalora_ext does not merge")
            rank = self.r[a]
            tmp = QALoRALinear(base, rank, alpha=float(self.scaling[a]) * rank, dropout=0.0, use_rslora=False)
            tmp.lora_A.copy_(self._ours_A(a))
            tmp.lora_B.copy_(B.weight.float())
            merged = tmp.merge()  # warns when more than 1% of the adapter is lost to the zeros' storage dtype
            if safe_merge and not bool(torch.isfinite(merged.zero).all()):
                raise ValueError(f"NaNs or infinities in the merged zeros of adapter {a!r}; the adapter seems broken")
            merged.int8_activations = base.int8_activations
            self.base_layer = merged
            base = merged
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        if not self.merged:
            return
        raise ValueError("cannot unmerge a QA-LoRA adapter merged into a qalora_ext layer: the merged zeros were "
                         "rounded once to their storage dtype and the previous ones are not kept. Reload the "
                         "unmerged model (or the adapter onto the original quantized model) instead")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The float32 change of the dequantized weight ``W~`` (N, K) the adapter makes."""
        base = self.get_base_layer()
        if self._is_qalora(adapter):
            delta = (self.scaling[adapter] * (self.lora_B[adapter].weight.double() @ self._ours_A(adapter).double())
                     / base.group_size)
            return delta.repeat_interleave(base.group_size, dim=1).float()
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight).float() * self.scaling[adapter]

    def _apply(self, fn, recurse=True):
        return super()._apply(fn, recurse)

    def __repr__(self) -> str:
        return "qalora_ext." + super().__repr__()


def _check_config(config: LoraConfig, base: QuantLinear) -> None:
    problems = []
    if config.use_dora:
        problems.append("use_dora=True")
    if config.lora_bias:
        problems.append("lora_bias=True")
    if getattr(config, "velora_config", None) is not None:
        problems.append("velora_config")
    if problems:
        raise ValueError(f"LoraConfig: {', '.join(problems)} is not supported on qalora_ext layers")
    if config.use_qalora and config.qalora_group_size != base.group_size:
        raise ValueError(f"LoraConfig.qalora_group_size={config.qalora_group_size} but the layer is quantized with "
                         f"group_size={base.group_size}: the QA-LoRA pooling groups must be the quantization "
                         f"groups (SPEC); set qalora_group_size={base.group_size}")


def prepare_lora_config(config: LoraConfig) -> LoraConfig:
    """Make ``config`` put :class:`QALoRAPeftLinear` on qalora_ext ``QuantLinear`` layers; returns it.

    Call it on every ``LoraConfig`` used with a qalora_ext model, before
    ``get_peft_model`` / ``SFTTrainer(peft_config=...)`` (PEFT keeps this
    mapping per config and does not save it). ``use_qalora=True`` with
    ``qalora_group_size`` equal to the layers' quantization group size gives
    an exactly mergeable adapter; ``use_qalora=False`` trains a plain LoRA
    that cannot be merged into the INT-b layers.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig; got {type(config).__name__}")
    if config.use_qalora:
        g = config.qalora_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"LoraConfig.qalora_group_size must be a positive int; got {g!r}")
    config._register_custom_module({QuantLinear: QALoRAPeftLinear})
    return config


def load_peft_adapter(model: nn.Module, adapter_dir: os.PathLike, adapter_name: str = "default",
                      is_trainable: bool = False, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` for a qalora_ext model: reads the adapter's config, prepares it
    (:func:`prepare_lora_config`) and loads. Other keyword arguments go to ``PeftModel.from_pretrained``."""
    config = PeftConfig.from_pretrained(os.fspath(adapter_dir))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{adapter_dir}: a {type(config).__name__} adapter; only LoRA adapters load onto "
                         f"qalora_ext layers")
    config.inference_mode = not is_trainable
    prepare_lora_config(config)
    return PeftModel.from_pretrained(model, os.fspath(adapter_dir), adapter_name=adapter_name,
                                     is_trainable=is_trainable, config=config, **kwargs)
