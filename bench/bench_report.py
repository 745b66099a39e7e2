"""The report's wall time, by section, with the default settings (scaled to the model):

    .venv/bin/python bench/bench_report.py [--thorough] [--models builtin:shapes-vit ...] [--command]

Random weights for timm models (the cost is the same as pretrained). Target (issue 15):
timm:vit_base_patch16_224 in <= 60 s on a quiet 2-core CPU, <= 15 s on a GPU. In one process
the imports are paid once (by the first model); `--command` also times the command itself,
`prisma-ext report --model timm:vit_base_patch16_224 --random-weights`, in a fresh process
(imports, start-up and writing included), which is what the target is about.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("builtin:shapes-vit", "timm:vit_small_patch16_224", "timm:vit_base_patch16_224")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--thorough", action="store_true")
    parser.add_argument("--command", action="store_true", help="also time the command in a fresh process")
    args = parser.parse_args()
    from prisma_ext.report import build_report

    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            start = time.perf_counter()
            report = build_report(name, out=Path(folder) / "r.html", pretrained=name.startswith("builtin:"),
                                  log=None, thorough=args.thorough)
            total = time.perf_counter() - start
            parts = ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items())
            print(f"{name}{' --thorough' if args.thorough else ''}: {total:.1f} s ({parts})")
        if args.command:
            cli = Path(sys.executable).with_name("prisma-ext")
            command = [str(cli), "report", "--model", "timm:vit_base_patch16_224", "--random-weights", "-q",
                       "--out", str(Path(folder) / "c.html"), *(["--thorough"] if args.thorough else [])]
            start = time.perf_counter()
            subprocess.run(command, check=True)
            print(f"command {' '.join(command[1:6])}: {time.perf_counter() - start:.1f} s wall (fresh process)")


if __name__ == "__main__":
    main()
