"""Ray Train's fixed cost: a training whose loop does nothing, fitted a few times on local Ray, with
the controller's default health-check interval (2 s) and with the one `run_training` sets.

The time until the loop starts is the actors' start (TrainController, PlacementGroupCleaner,
PreemptionWatcher, RayTrainWorker: a Python process each) and torch's process group; the time after
the loop's report is mostly the wait for the controller's next poll. Prints one line per fit, then
`BENCH train_start_default_s=` and `BENCH train_start_s=` (medians).

  python benchmarks/train_start.py --fits 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from pipeline.train.runner import HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S


def _loop(config: dict) -> None:
    # Ray Train's result keeps metrics only beside a checkpoint: the start time goes to a file instead.
    with open(config["mark"], "w") as out:
        out.write(str(time.time() - config["t0"]))


def fit_seconds(interval: str | None, storage: str, name: str) -> tuple[float, float]:
    """(seconds of the whole fit, seconds until the loop started) with the given interval (None: Ray's default)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if interval is None:
        os.environ.pop(HEALTH_CHECK_ENV, None)
    else:
        os.environ[HEALTH_CHECK_ENV] = interval
    mark = os.path.join(storage, name + ".started")
    t0 = time.time()
    TorchTrainer(_loop, train_loop_config={"t0": t0, "mark": mark}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name=name, storage_path=storage)).fit()
    total = time.time() - t0
    with open(mark) as found:
        return total, float(found.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=3, help="fits per setting (alternating)")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="train-start-")
    times: dict[str, list[float]] = {"default": [], HEALTH_CHECK_INTERVAL_S: []}
    for i in range(args.fits):
        for setting in times:
            total, started = fit_seconds(None if setting == "default" else setting, storage, f"fit-{i}-{setting}")
            times[setting].append(total)
            print(f"fit {i} health check {setting:>7}: {total:5.2f} s, loop started after {started:5.2f} s", flush=True)
    ray.shutdown()
    print(f"BENCH train_start_default_s={statistics.median(times['default']):.2f}")
    print(f"BENCH train_start_s={statistics.median(times[HEALTH_CHECK_INTERVAL_S]):.2f}")


if __name__ == "__main__":
    main()
