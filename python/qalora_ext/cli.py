"""The `qalora` command line (grows with the real-model issue)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qalora", description="QA-LoRA on packed INT2/3/4 weights")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print the build: version, CPU kernels, CUDA")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        from . import build_info

        for k, v in build_info().items():
            print(f"{k}: {v}")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
