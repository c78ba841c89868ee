"""The Hugging Face stack: transformers' ``from_pretrained`` / ``save_pretrained``, PEFT, TRL.

``transformers_quantizer``  ``quant_method: "qalora_ext"`` registered with
                            transformers (config + quantizer)
``peft_layer``              PEFT's LoRA layer over our ``QuantLinear``
                            (``use_qalora=True``: exact ``merge_and_unload``),
                            :func:`prepare_lora_config`, :func:`load_peft_adapter`

Registration is lazy: ``import qalora_ext`` calls :func:`install`, which
registers at once when transformers' quantizer registry is already imported,
and otherwise registers the moment it is (an import hook on
``transformers.quantizers.auto``, removed after it fires). Importing that
registry costs about 4 s on a cold start, which ``import qalora_ext`` would
otherwise pay even for users who never touch transformers; with the hook it
costs nothing until transformers loads a model, and then nothing extra.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

__all__ = ["install", "register_transformers", "prepare_lora_config", "load_peft_adapter"]

_TARGET = "transformers.quantizers.auto"
_QUANTIZER_MODULE = __name__ + ".transformers_quantizer"
_lock = threading.Lock()


def register_transformers() -> None:
    """Register ``quant_method: "qalora_ext"`` with transformers now (idempotent)."""
    from .transformers_quantizer import register

    register()


def _register_quietly() -> None:
    if _QUANTIZER_MODULE in sys.modules:
        # Being imported right now (its own import of transformers' registry fired the hook): it registers
        # itself when its body completes.
        return
    try:
        register_transformers()
    except Exception as e:  # never break the user's import of transformers
        warnings.warn(f"qalora_ext: could not register the 'qalora_ext' quantization method with transformers "
                      f"({type(e).__name__}: {e}); from_pretrained will not read qalora_ext folders",
                      stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _uninstall_hook()
        _register_quietly()

    def __getattr__(self, name):  # get_source, get_filename ... of the real loader
        return getattr(self._inner, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


_hook = _RegisterOnImport()


def _uninstall_hook() -> None:
    with _lock:
        if _hook in sys.meta_path:
            sys.meta_path.remove(_hook)


def install() -> None:
    """Register with transformers now if its quantizer registry is loaded, else when it loads."""
    if _TARGET in sys.modules:
        _register_quietly()
        return
    with _lock:
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)


def prepare_lora_config(config, *args, **kwargs):
    """See :func:`qalora_ext.interop.hf.peft_layer.prepare_lora_config` (imports PEFT)."""
    from .peft_layer import prepare_lora_config as impl

    return impl(config, *args, **kwargs)


def load_peft_adapter(model, adapter_dir, *args, **kwargs):
    """See :func:`qalora_ext.interop.hf.peft_layer.load_peft_adapter` (imports PEFT)."""
    from .peft_layer import load_peft_adapter as impl

    return impl(model, adapter_dir, *args, **kwargs)
