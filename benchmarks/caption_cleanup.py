"""Caption clean-up on a labelled set of VLM outputs (benchmarks/captions/cleanup_set.json): how many
junk captions of each family get through, and how many good captions are kept as they should be.

A junk caption passes when clean_caption keeps it. A good caption counts as kept when clean_caption
returns exactly its expected text (the raw text itself, or 'kept' where an opening about the prompt's
pictures is to be removed).

    python benchmarks/caption_cleanup.py [--set FILE]     # also: --set benchmarks/captions/holdout_set.json (written blind)

Last lines, machine-readable:
    BENCH junk_passed=...        (of all junk captions; 0 is the goal)
    BENCH good_kept=...          (share of good captions kept as expected; 1.0 is the goal)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioners.cleanup import clean_caption  # noqa: E402

DEFAULT_SET = Path(__file__).resolve().parent / "captions" / "cleanup_set.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", type=Path, default=DEFAULT_SET)
    spec = json.loads(ap.parse_args().set.read_text())
    passed_total = junk_total = 0
    for family, texts in spec["junk"].items():
        passed = [(t, clean_caption(t)[0]) for t in texts if clean_caption(t)[0] is not None]
        passed_total += len(passed)
        junk_total += len(texts)
        print(f"junk {family:16s} {len(texts) - len(passed):3d}/{len(texts)} rejected")
        for raw, kept in passed:
            print(f"    passed: {raw!r} -> {kept!r}")
    good = spec["good"]
    wrong = [(g["raw"], clean_caption(g["raw"])) for g in good if clean_caption(g["raw"])[0] != g.get("kept", g["raw"])]
    print(f"good captions    {len(good) - len(wrong):3d}/{len(good)} kept as expected")
    for raw, got in wrong:
        print(f"    {raw!r} -> {got[0]!r} ({got[1].value if got[1] else 'kept'})")
    print(f"BENCH junk_passed={passed_total}")
    print(f"BENCH good_kept={(len(good) - len(wrong)) / len(good):.3f}")


if __name__ == "__main__":
    main()
