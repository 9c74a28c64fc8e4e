"""What a sweep trial costs beyond its training steps: `localcap sweep --demo` on a small grid of trials
that take 1 step and 60 steps, so that the difference is the steps and the rest is the trial's fixed cost
(the training task's worker process, the model build, the probe, the checkpoint).

    python benchmarks/sweep.py [--out DIR]

Ends with `BENCH trial_fixed_s=<s>` (a 1-step trial, run alone), `BENCH step_ms=<ms>` (each further
step of 8 images at 64 px, xs model) and `BENCH trial_s_two_at_once=<s>` (the mean trial of a 4-trial grid
of 20-step trials, 2 at a time on this machine's cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

LOCALCAP = str(Path(sys.executable).with_name("localcap"))


def sweep(out: Path, name: str, steps: int, concurrent: int, images: list[int]) -> tuple[list[dict], float]:
    sets = [f"name={name}", "epochs=null", f"train.steps={steps}", f"max_concurrent_trials={concurrent}",
            f"grid.images={images}", "grid.resolution=[64]", "grid.model=[xs]", "fit.bootstrap=0"]
    started = time.perf_counter()
    subprocess.run([LOCALCAP, "sweep", "--demo", "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                   check=True, capture_output=True, text=True)
    rows = pq.read_table(out / "sweeps" / name / "results.parquet").to_pylist()
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Folder for the demo dataset and sweeps (default: a temporary one).")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="localcap-bench-sweep-"))
    one, _ = sweep(out, "one-step", 1, 1, [6])
    sixty, _ = sweep(out, "sixty-steps", 60, 1, [6])
    four, seconds = sweep(out, "four", 20, 2, [6, 12, 18, 24])
    fixed = one[0]["seconds"]
    step_ms = (sixty[0]["seconds"] - fixed) / 59 * 1000
    trial_seconds = [r["seconds"] for r in four]
    print(f"1-step trial {fixed:.1f} s, 60-step trial {sixty[0]['seconds']:.1f} s; "
          f"4 trials of 20 steps, 2 at a time: {', '.join(f'{s:.1f}' for s in trial_seconds)} s each, "
          f"{seconds:.0f} s for the command (dataset build and Prefect included)")
    print(f"BENCH trial_fixed_s={fixed:.1f}")
    print(f"BENCH step_ms={step_ms:.0f}")
    print(f"BENCH trial_s_two_at_once={sum(trial_seconds) / len(trial_seconds):.1f}")


if __name__ == "__main__":
    main()
