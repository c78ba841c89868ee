"""``qalora export``: a qalora_ext folder as one GGUF file (llama.cpp) or an MLX folder (mlx-lm).

The folder is loaded here and the exporters get the model: they write
models, the command line reads folders. The checks on the folder (a
qalora_ext checkpoint, not the output itself, with or without a tokenizer)
are the command's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import common

NAME = "export"
HELP = "write a merged model for llama.cpp (GGUF) or MLX"
DESCRIPTION = ("gguf: one .gguf file (llama family; the packed layers as Q4_1, exact at 4 bits / group 32). mlx: an "
               "mlx-lm folder (every bits and group size). GGUF stores float16 zeros, MLX float16 unless "
               "--scale-dtype float32: the export reports the fraction of the adapter lost to that rounding and "
               "warns above 1%.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=("gguf", "mlx"))
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a qalora_ext folder (merged, or with adapters, which are folded in on the way)")
    common.add_adapter_arg(p, "an adapter folder to fold in on the way")
    p.add_argument("--out", required=True, metavar="PATH", help="the .gguf file (gguf) or output folder (mlx)")
    g = p.add_argument_group("gguf")
    g.add_argument("--allow-larger", action="store_true",
                   help="write bits/group sizes other than 4/32 exactly as Q4_1, at 5 bits per weight")
    g.add_argument("--lossy", action="store_true",
                   help="round scales that are not float16 numbers instead of refusing (the error is reported)")
    g.add_argument("--float-type", choices=("f32", "f16"), default=None,
                   help="embeddings and unquantized layers (default f32: exact)")
    g.add_argument("--tokenizer-pre", metavar="NAME", default=None,
                   help="llama.cpp's pre-tokenizer name (default: detected from tokenizer.json; e.g. smollm)")
    g = p.add_argument_group("mlx")
    g.add_argument("--scale-dtype", choices=common.DTYPES, default=None,
                   help="scales and biases (default float16; float32 keeps a merged adapter whole)")


def run(args: argparse.Namespace) -> int:
    common.refuse_other_format(args.format, {
        "--allow-larger": ("gguf", args.allow_larger), "--lossy": ("gguf", args.lossy),
        "--float-type": ("gguf", args.float_type), "--tokenizer-pre": ("gguf", args.tokenizer_pre),
        "--scale-dtype": ("mlx", args.scale_dtype)})
    common.refuse_overwriting_input(args.out, args.model, args.adapter)
    if args.format == "gguf":
        report = _export_gguf(args.model, args.out, args.adapter, allow_larger=args.allow_larger, lossy=args.lossy,
                              float_type=args.float_type or "f32", tokenizer_pre=args.tokenizer_pre)
    else:
        report = _export_mlx(args.model, args.out, args.adapter, scale_dtype=args.scale_dtype or "float16")
    print(f"[qalora] {report.summary()}")
    return 0


def _export_gguf(model_dir: str, out: str, adapter, **options):
    """GGUF wants the tokenizer object (its vocabulary goes into the file) and float32 float parts."""
    import torch

    from .. import loading
    from ..checkpoint import load_adapter
    from ..interop.gguf_export import export_gguf

    folder = loading.resolve_model(model_dir)
    if not loading.is_quantized_checkpoint(folder):
        raise ValueError(f"{folder} is not a qalora_ext quantized checkpoint; the GGUF exporter writes quantized "
                         f"(merged) models: quantize it first")
    lm, tokenizer, _ = loading.load_model(folder, dtype=torch.float32)
    if adapter is not None:
        load_adapter(lm, adapter)
    return export_gguf(lm, out, tokenizer, name=folder.name, progress=True, **options)


def _export_mlx(model_dir: str, out: str, adapter, scale_dtype: str):
    """MLX copies the tokenizer files of the folder; a folder without them exports with a warning."""
    from .. import loading
    from ..checkpoint import load_adapter, load_quantized
    from ..interop.mlx_export import export_mlx

    src = Path(os.path.realpath(os.fspath(model_dir)))
    if not src.is_dir():
        raise FileNotFoundError(f"export_mlx: {src}: no such model folder")
    if not loading.is_quantized_checkpoint(src):
        raise ValueError(f"export_mlx: {src} is not a qalora_ext checkpoint (no quantization_config with "
                         f"quant_method 'qalora_ext'); quantize it first (qalora quantize)")
    lm = load_quantized(src)
    if adapter is not None:
        load_adapter(lm, adapter)
    # tokenizer=None: export_mlx copies the tokenizer files of the folder the model names, and warns when there
    # are none. Name this folder, not the float model the checkpoint was made from (config.json may record it).
    lm.config._name_or_path = str(src)
    return export_mlx(lm, out, tokenizer=None, scale_dtype=scale_dtype, progress=True)
