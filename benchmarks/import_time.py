"""Import time of the lean runtime, each statement in a fresh interpreter (median of N).

    python benchmarks/import_time.py --json benchmarks/results/import_time_cpu.json

The target: `import sdrt.runtime` under 0.5 s. `from sdrt.runtime import Pipeline` is measured too: it pulls
numpy, tokenizers and pillow (onnxruntime loads when a backend is created).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from report import command, machine, write_json  # benchmarks/ is on sys.path when a script runs

STATEMENTS = ("import sdrt.runtime", "from sdrt.runtime import Pipeline", "import sdrt.runtime.cli")
TARGET_S = 0.5


def import_seconds(statement: str, repeats: int) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(repeats)]
    return statistics.median(runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="fresh interpreters per statement")
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    args = p.parse_args()
    results = {s: import_seconds(s, args.repeats) for s in STATEMENTS}
    report = {
        "benchmark": "import_time",
        "median_s": results,
        "repeats": args.repeats,
        "target_s": TARGET_S,
        "meets_target": results["import sdrt.runtime"] < TARGET_S,
        "machine": machine(),
        "command": command(),
    }
    write_json(args.json, report)
    for s, t in results.items():
        print(f"{t * 1e3:8.1f} ms  {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
