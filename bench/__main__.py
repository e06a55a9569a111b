"""``python -m bench [name…]``: run the benchmark scripts, then print every result as one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import RESULTS, print_table

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s.stem for a in argv)]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        rc = subprocess.run([sys.executable, "-m", f"bench.{script.stem}"], cwd=HERE.parent).returncode
        if rc != 0:
            failed.append(script.stem)
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    print("\n== all results (ratios against baselines measured in the same run)")
    print_table(results)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
