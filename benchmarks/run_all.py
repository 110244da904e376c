"""Run every benchmark and print its table; `--quick` keeps the whole run to a few minutes on 2 CPU cores.

    python benchmarks/run_all.py [--quick]

Written so far: the flow recipes side by side (flow_bench.py), the CPU FLOP/s of an update step
(cpu_flops.py) and the shared-prefix forward against the plain one (prefix_bench.py). The LLM
comparisons against TRL (issue 7) are not written yet.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import cpu_flops, flow_bench, prefix_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    header = f"Benchmarks of {datetime.date.today().isoformat()} on {machine}" + (" (--quick)" if args.quick else "")
    print(header)
    flops = cpu_flops.main()
    flow_bench.main(["--quick"] if args.quick else [])
    prefix_bench.main(["--quick"] if args.quick else [])
    flow_table = (ROOT / "benchmarks" / "out" / "flow_bench.md").read_text()
    prefix_table = (ROOT / "benchmarks" / "out" / "prefix_bench.md").read_text()
    results = f"{header}\n\n{flops['table']}\n\n{flow_table}\n\n{prefix_table}"
    (ROOT / "benchmarks" / "out" / "RESULTS.md").write_text(results)
    print(f"\n{results}")


if __name__ == "__main__":
    main()
