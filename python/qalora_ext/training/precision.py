"""The precision a fine-tune runs in when the user does not say: the one place that decides.

bfloat16 autocast (``finetune(autocast=torch.bfloat16)``) pays off where the
hardware multiplies bfloat16 natively: every CUDA GPU this project builds
for, and x86 CPUs with AVX512-BF16 or AMX-BF16 units. Elsewhere bfloat16 is
emulated through float32 and is slower than float32 itself, so the default
there is float32. ``qalora finetune --autocast`` and :func:`qalora_ext.demo.run_demo`
take their defaults from :func:`resolve_autocast`; ``"none"`` always forces
the model's own dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["AUTOCAST_CHOICES", "BF16_CPU_FLAGS", "cpu_has_bf16", "default_autocast", "resolve_autocast"]

AUTOCAST_CHOICES = ("auto", "none", "bf16")
"""What a user may ask for: ``auto`` (bf16 where the hardware has bf16 units), ``none`` (float32), ``bf16``."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features that count as bfloat16 units (the /proc/cpuinfo names; torch's cpuinfo uses the same keys)."""


def _torch_cpu_features() -> Optional[dict]:
    # torch's own cpuinfo (private, but present since 2.3); None when this torch lacks it.
    get = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if get is None:
        return None
    try:
        features = get()
    except (RuntimeError, TypeError):
        return None
    return features if isinstance(features, dict) else None


def _proc_cpuinfo_flags() -> Optional[set]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 units: AVX512-BF16 or AMX-BF16.

    Asks torch's cpuinfo first (it works on every OS torch runs on and says
    what the OS has enabled), then Linux's /proc/cpuinfo; a CPU neither can
    describe counts as having none (float32 is the safe default).
    """
    features = _torch_cpu_features()
    if features is not None and all(flag in features for flag in BF16_CPU_FLAGS):
        return any(bool(features[flag]) for flag in BF16_CPU_FLAGS)
    flags = _proc_cpuinfo_flags()
    return flags is not None and any(flag in flags for flag in BF16_CPU_FLAGS)


def default_autocast(device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """``torch.bfloat16`` on CUDA, and on a CPU with bfloat16 units (:func:`cpu_has_bf16`); else None (float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def resolve_autocast(choice: Union[str, torch.dtype, None], device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The ``autocast`` argument of ``finetune`` for a user's choice.

    ``"auto"`` -> :func:`default_autocast`; ``"none"`` or None -> None (the
    model's dtype); ``"bf16"`` or ``torch.bfloat16`` -> ``torch.bfloat16``.
    Anything else is a ValueError naming the choices.
    """
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        return default_autocast(device)
    if choice == "bf16" or choice is torch.bfloat16:
        return torch.bfloat16
    raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)} (or torch.bfloat16); got {choice!r}"
                     + (" (float16 would need loss scaling)" if choice in ("fp16", "float16", torch.float16) else ""))
