"""qalora_ext: QA-LoRA on packed INT2/3/4 weights.

Quantize linear layers to 2, 3 or 4 bits with float scales and zeros, train a
small adapter on group-pooled inputs, then fold the adapter into the zeros so
the fine-tuned model stays INT2/3/4. The numeric contract is SPEC.md.
"""

from __future__ import annotations

from . import _C, ops, reference  # noqa: F401  (_C registers the torch ops)
from .checkpoint import load_adapter, load_quantized, save_adapter, save_quantized
from .format import LAYOUT_CANONICAL
from .model import add_adapters, merge_adapters, quantize_model, set_int8_activations
from .interop import hf as _hf
from .interop.hf import load_peft_adapter, prepare_lora_config
from .nn import QALoRALinear, QuantLinear

__version__ = _C.__version__

__all__ = [
    "QuantLinear",
    "QALoRALinear",
    "quantize_model",
    "add_adapters",
    "merge_adapters",
    "set_int8_activations",
    "save_quantized",
    "load_quantized",
    "save_adapter",
    "load_adapter",
    "build_info",
    "set_cpu_isa",
    "LAYOUT_CANONICAL",
    "prepare_lora_config",
    "load_peft_adapter",
]

# transformers: `quant_method: "qalora_ext"` folders load with from_pretrained. Lazy: registers when
# transformers' quantizer registry is imported (or now, if it already is); see interop/hf/__init__.py.
_hf.install()


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels of one instruction set: 'scalar', 'avx2', 'avx512', 'avx512vnni', 'neon' or 'auto'.

    Only the sets compiled into this build (``build_info()["cpu_isas_compiled"]``)
    and supported by this CPU are accepted; 'auto' picks the best one again.
    """
    _C.set_cpu_isa(name)


def build_info() -> dict:
    """What this build contains and what runs on this machine."""
    import torch

    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_kernels": bool(_C.WITH_CUDA),
        "cpu_isas_compiled": _C.compiled_cpu_isas(),
        "cpu_isa_active": _C.get_cpu_isa(),
        # What bfloat16 activations multiply with at large M: "onednn-brgemm-amx", or "off: <why>" (float32 GEMM).
        "cpu_bf16_gemm": _C.cpu_bf16_gemm(),
        "packed_layout": LAYOUT_CANONICAL,
    }
