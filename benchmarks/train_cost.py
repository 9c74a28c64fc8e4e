"""Cost of a local-contrastive training step as the high-res side grows, with a fixed patch budget
(PS3's selective encoding) beside a baseline that encodes every high-res patch.

Both models are the same LocalContrastiveModel; the baseline's budget is the whole high-res grid. A
step is forward, backward and optimizer step on random pixels and boxes (data loading excluded: it is
the trainer's cost that should not grow with the pixel count). Timed after warm-up steps, median of
`--steps`. Prints a table, then `BENCH selective_4k_over_1k=` and `BENCH baseline_4k_over_1k=`.

  python benchmarks/train_cost.py                  # CPU-sized model (this repo's CI machine: 2 cores)
  python benchmarks/train_cost.py --device cuda --hidden 768 --layers 12 --heads 12 --patch 16 --budget 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.train.model import LocalContrastiveModel
from schemas.train import ModelOptions


def make_model(args, high: int, budget: int) -> LocalContrastiveModel:
    opts = ModelOptions(patch_size=args.patch, low_res=args.low_res, high_res=high, patch_budget=budget, hidden_size=args.hidden,
                        layers=args.layers, heads=args.heads, mlp_size=args.hidden * 4, text_hidden_size=args.hidden,
                        text_layers=2, text_heads=args.heads, text_mlp_size=args.hidden * 4, max_text_len=16, vocab_size=1000,
                        embed_dim=args.hidden)
    return LocalContrastiveModel(opts, 1000).to(args.device)


def batch(args, high: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    b, grid = args.batch, high // args.patch
    box_map = torch.zeros(b, grid, grid, dtype=torch.bool)
    side = max(1, grid // 5)  # PS3's box: a fifth of the short side
    for i in range(b):
        y, x = torch.randint(0, grid - side + 1, (2,), generator=g).tolist()
        box_map[i, y:y + side, x:x + side] = True
    dev = args.device
    return (torch.randn(b, 3, args.low_res, args.low_res, generator=g).to(dev), torch.randn(b, 3, high, high, generator=g).to(dev),
            box_map.to(dev), torch.zeros(b, dtype=torch.bool, device=dev), torch.randint(3, 1000, (b, 16), generator=g).to(dev))


def step_seconds(args, high: int, budget: int) -> float:
    torch.manual_seed(0)
    model = make_model(args, high, budget)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = batch(args, high)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            parts = model(*inputs)
        loss = parts["contrastive"] + parts["selection"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sides", default="1024,2048,4096", help="High-res sides to time (1K, 2K, 4K).")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--low-res", type=int, default=256)
    p.add_argument("--budget", type=int, default=256, help="Selected high-res patches per image.")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = [int(s) for s in args.sides.split(",")]
    print(f"device {args.device}, patch {args.patch}, low-res {args.low_res}, budget {args.budget} patches, hidden {args.hidden}, "
          f"{args.layers} layers, batch {args.batch}")
    print(f"{'high-res':>9} {'patches':>8} {'selective s/step':>17} {'baseline s/step':>16}")
    sel, base = {}, {}
    for side in sides:
        grid = (side // args.patch) ** 2
        sel[side] = step_seconds(args, side, args.budget)
        base[side] = step_seconds(args, side, grid)
        print(f"{side:>9} {grid:>8} {sel[side]:>17.3f} {base[side]:>16.3f}", flush=True)
    lo, hi = sides[0], sides[-1]
    print(f"BENCH selective_4k_over_1k={sel[hi] / sel[lo]:.2f}")
    print(f"BENCH baseline_4k_over_1k={base[hi] / base[lo]:.2f}")


if __name__ == "__main__":
    main()
