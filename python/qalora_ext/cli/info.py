"""``qalora info``: the build (version, CPU kernels, CUDA)."""

from __future__ import annotations

import argparse

NAME = "info"
HELP = "the build: version, CPU kernels, CUDA"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from .. import build_info

    for k, v in build_info().items():
        print(f"{k}: {v}")
    return 0
