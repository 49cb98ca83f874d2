"""Speed of the drift simulator: instances plus every default source's trajectories.

    python benchmarks/bench_simulator.py                 # 2,000 train + 500 test, 7 sources
    python benchmarks/bench_simulator.py --train 200 --test 50 --repeat 1

Single process, so it measures one core. The target (DESIGN / collect.py `sim:all`): the default
stream of 2,000 + 500 instances with seven sources in under 10 s. Parsing the texts back
(answers.parse_answer, which collect and consensus do too) is timed separately.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.answers import parse_answer  # noqa: E402
from common.simulator import PROFILES, make_instances, simulate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=2000, help="train instances")
    ap.add_argument("--test", type=int, default=500, help="test instances")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    ap.add_argument("--seed", type=int, default=0, help="simulator seed")
    args = ap.parse_args()
    best = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        recs = make_instances(args.train, args.test, args.seed)
        t1 = time.perf_counter()
        n = len(recs)
        texts = [simulate(p, r, i / max(1, n - 1), args.seed) for p in PROFILES.values() for i, r in enumerate(recs)]
        t2 = time.perf_counter()
        for t in texts:
            parse_answer(t)
        t3 = time.perf_counter()
        run = (t1 - t0, t2 - t1, t3 - t2)
        best = run if best is None or sum(run[:2]) < sum(best[:2]) else best
    inst, sim, parse = best
    print(f"{n} instances x {len(PROFILES)} sources = {len(texts)} trajectories "
          f"(mean {sum(map(len, texts)) / len(texts):.0f} chars)")
    print(f"make_instances {inst:.2f} s, simulate {sim:.2f} s ({sim / len(texts) * 1e6:.0f} us each), "
          f"total {inst + sim:.2f} s (target < 10 s); parse_answer {parse:.2f} s "
          f"({parse / len(texts) * 1e6:.0f} us each)")


if __name__ == "__main__":
    main()
