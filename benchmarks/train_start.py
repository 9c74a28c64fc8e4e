"""A training's fixed cost on local Ray: a loop that does nothing, run a few times on Ray Train with the
controller's default health-check interval (2 s), with the one `run_training` sets, and on one Ray task
(what a single-worker training runs on).

Ray Train's time until the loop starts is its actors' start (TrainController, PlacementGroupCleaner,
PreemptionWatcher, RayTrainWorker: a Python process each) and torch's process group; the time after
the loop's report is mostly the wait for the controller's next poll. The task runs in a fresh worker
process each time (max_calls=1), which imports the loop's module (torch) as a real run does. Prints one
line per run, then `BENCH train_start_default_s=`, `BENCH train_start_s=` (Ray Train) and
`BENCH train_start_task_s=` (medians).

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


def _task_loop(t0: float) -> float:
    import pipeline.train.loop  # noqa: F401  (torch and the model code, as train_task imports them)

    return time.time() - t0


def task_seconds() -> tuple[float, float]:
    """(seconds of the whole run, seconds until the loop started) on one fresh Ray task."""
    import ray

    t0 = time.time()
    started = ray.get(ray.remote(num_cpus=1, max_calls=1)(_task_loop).remote(t0))
    return time.time() - t0, started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=3, help="fits per setting (alternating)")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="train-start-")
    times: dict[str, list[float]] = {"default": [], HEALTH_CHECK_INTERVAL_S: [], "task": []}
    for i in range(args.fits):
        for setting in times:
            if setting == "task":
                total, started = task_seconds()
                label = "one Ray task"
            else:
                total, started = fit_seconds(None if setting == "default" else setting, storage, f"fit-{i}-{setting}")
                label = f"Ray Train, health check {setting}"
            times[setting].append(total)
            print(f"run {i} {label:>28}: {total:5.2f} s, loop started after {started:5.2f} s", flush=True)
    ray.shutdown()
    print(f"BENCH train_start_default_s={statistics.median(times['default']):.2f}")
    print(f"BENCH train_start_s={statistics.median(times[HEALTH_CHECK_INTERVAL_S]):.2f}")
    print(f"BENCH train_start_task_s={statistics.median(times['task']):.2f}")


if __name__ == "__main__":
    main()
