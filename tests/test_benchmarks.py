"""Tests of the GPU benchmarks (benchmarks/bench_apo_step.py, benchmarks/bench_generation.py) on the CPU.

The scripts run with --tiny as subprocesses and must report well-formed numbers (never timings
checked). In process: the benchmark's usual implementation and apo.py's step (with its cached
reference) give the same losses and gradients, so the benchmark compares equal computations; the
FLOP count that MFU divides by is exact against torch's own FLOP counter and apo.py's mask; and
the padding lever holds. The other levers have their tests already: chunked log-probs = full
log_softmax (test_apo.py), shared prompt = separate forwards and checkpointing = none
(test_apo_stage.py).
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import preferences, shared_prompt  # noqa: E402
import bench_apo_step as bench  # noqa: E402
import bench_generation  # noqa: E402
from common import training  # noqa: E402
from common.modeling import Encoded  # noqa: E402


def run_script(name, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, f"benchmarks/{name}", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def finite(x, low=0.0):
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= low


def test_apo_step_tiny_run_reports_every_variant_and_shape(tmp_path):
    out = tmp_path / "apo_step.json"
    # Two variants (two processes) keep this short; the in-process tests below cover the others.
    proc = run_script("bench_apo_step.py", "--tiny", "--variants", "usual,apo-ckpt", "--json", out)
    result = json.loads(out.read_text())
    assert result["targets"] == {"speedup": 1.5, "memory_ratio": 0.5, "mfu": 0.5}
    assert result["anchor"]["512+512"] == {"tokens_per_s": 25000.0, "peak_gib": 26.2}
    assert finite(result["matmul_flops_per_s"], low=1e6)
    rows = result["results"]
    assert [(r["model"], r["prompt"], r["response"]) for r in rows] == [
        ("tiny", 32, 32), ("tiny", 64, 64), ("tiny-wide (7B stand-in)", 32, 32), ("tiny-wide (7B stand-in)", 64, 64)]
    for row in rows:
        assert set(row["variants"]) == {"usual", "apo-ckpt"}
        for name, v in row["variants"].items():
            assert finite(v["tokens_per_s"], low=1e-9) and finite(v["step_s"], low=1e-9), (row, name)
            assert finite(v["peak_gib"]) and 0 < v["mfu"] and finite(v["mfu"]) and v["hfu"] >= v["mfu"], (row, name)
            assert finite(v["speedup"], low=1e-9) and finite(v["memory_ratio"]), (row, name)
            # fp32 and the policy IS the reference: exactly log(1 + K) for every variant.
            assert v["loss"] == pytest.approx(math.log(8), abs=1e-5) and v["loss_spread"] < 1e-5, (row, name)
        assert row["variants"]["usual"]["speedup"] == 1.0 and row["variants"]["usual"]["memory_ratio"] == 1.0
        assert finite(row["variants"]["apo-ckpt"]["tokens_per_s_with_reference_pass"], low=1e-9)
        # Same tokens per step for both: tokens/s ratios are step-time ratios.
        steps = [c["models"][row["model"]] for c in result["children"].values()]
        assert len({s[0]["tokens_per_step"] for s in steps}) == 1
    assert set(result["verdicts"]["apo-ckpt"].values()) <= {"PASS", "FAIL"}
    assert "25.0k tok/s at 26.2 GiB" in proc.stdout and "apo-ckpt" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_apo_step: 2 variants x 2 shape(s)")


def test_generation_tiny_run_reports_the_speedup(tmp_path):
    out = tmp_path / "generation.json"
    proc = run_script("bench_generation.py", "--tiny", "--prompts", 16, "--sequential", 4, "--json", out)
    r = json.loads(out.read_text())
    assert (r["prompts"], r["batch_size"], r["max_new_tokens"], r["sequential_timed_prompts"]) == (16, 64, 8, 4)
    for key in ("batched_s", "sequential_s", "batched_tokens_per_s", "sequential_tokens_per_s", "speedup"):
        assert finite(r[key], low=1e-9), key
    assert r["speedup"] == pytest.approx(r["sequential_s"] / r["batched_s"])
    assert r["batched_tokens_per_s"] == pytest.approx(16 * 8 / r["batched_s"])
    assert r["prompt_tokens_max"] >= r["prompt_tokens_mean"] > 50  # the simulator's studies, not stubs
    assert 0 <= r["same_answers"] <= 4 and r["verdict"] in ("PASS", "FAIL")
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_generation: batched is ")


# ---------------------------------------------------------------------------------------------
# The benchmark compares equal computations


def tiny_policy(seed=0):
    return bench.build_model(dict(bench.TINY, vocab_size=300), torch.float32, torch.device("cpu"), seed).train()


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("share_prompt", [True, False])
def test_apo_step_with_cached_reference_equals_the_usual_step(share_prompt):
    """apo.py's step (cached reference, chunked log-probs, shared prompt) = the usual step (a live
    reference model, full fp32 logits), values and gradients, with the policy moved off the reference."""
    k, beta = 3, 0.5
    items = bench.synthetic_instances(2, 6, 5, k, 300, seed=1)
    initial = tiny_policy()
    reference = copy.deepcopy(initial).eval().requires_grad_(False)

    policy = copy.deepcopy(initial)
    module = bench.apo_module(policy, share_prompt, chunk_size=7)
    cache = bench.apo_reference(module, items, share_prompt, torch.device("cpu"))  # from the initial weights
    with torch.no_grad():  # then the policy moves: rewards are no longer 0
        for p in list(policy.parameters()) + list(initial.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ours = bench.apo_step_loss(module, items, cache, share_prompt, beta, torch.device("cpu"))
    ours.sum().backward()

    usual = bench.usual_step_loss(initial, reference, items, k, beta, torch.device("cpu"))
    usual.sum().backward()

    assert ours.shape == usual.shape == (2,)
    assert (usual - math.log(1 + k)).abs().min() > 1e-3  # the rewards really differ from 0
    torch.testing.assert_close(ours, usual, atol=1e-5, rtol=1e-5)
    g_ours, g_usual = grads_of(policy), grads_of(initial)
    assert g_ours.keys() == g_usual.keys() and g_ours
    for name in g_usual:
        torch.testing.assert_close(g_ours[name], g_usual[name], atol=1e-5, rtol=1e-4, msg=name)


def test_forward_flops_equal_torch_flop_counter():
    """Dense layers, attention and output projection counted as torch counts them (eager attention
    computes all L x L pairs); a backward is exactly twice the forward."""
    from torch.utils.flop_counter import FlopCounterMode

    sizes = dict(bench.TINY, vocab_size=300)
    model = tiny_policy()
    model.set_attn_implementation("eager")
    rows, length = 3, 10
    ids = torch.randint(0, 300, (rows, length))
    expected = bench.forward_flops(sizes, rows * length, rows * length * length, rows * length)
    with FlopCounterMode(display=False) as forward:
        logits = model(input_ids=ids, use_cache=False).logits
    assert forward.get_total_flops() == expected
    with FlopCounterMode(display=False) as backward:
        logits.float().logsumexp(-1).sum().backward()
    assert backward.get_total_flops() == 2 * expected


def test_shared_prompt_pairs_are_what_apo_attention_mask_allows():
    k, prompt, response = 7, 9, 4
    items = bench.synthetic_instances(2, prompt, response, k, 300, seed=0)
    packed = shared_prompt.pack_shared_prompt(items, bench.PAD_ID)
    allowed = shared_prompt.block_causal_mask(packed["segments"], "sdpa", torch.float32)
    pairs = 2 * (bench.causal_pairs(prompt) + (1 + k) * (response * prompt + bench.causal_pairs(response)))
    assert int(allowed.sum()) == pairs
    sizes = bench.TINY
    model_flops, _ = bench.step_flops(sizes, "apo", prompt, response, k, 2)
    tokens, head = 2 * (prompt + (1 + k) * response), 2 * (1 + k) * response
    assert model_flops == 3 * bench.forward_flops(sizes, tokens, pairs, head)
    # The usual: 8 full rows, logits everywhere, plus the reference forward; checkpointing only adds HFU.
    usual, usual_hardware = bench.step_flops(sizes, "usual", prompt, response, k, 2)
    full = bench.forward_flops(sizes, 16 * (prompt + response), 16 * bench.causal_pairs(prompt + response),
                               16 * (prompt + response))
    assert usual == 4 * full and usual_hardware > usual


def test_no_padding_waste():
    """The padding lever: a packed shared-prompt row holds no padding (its length is what
    preferences.forward_length counts and batches by), and training.batch_order makes batches of
    neighbouring lengths, so a batch pads only up to its own longest."""
    item = Encoded(list(range(1, 8)), [[5] * n for n in (3, 9, 1, 4)])  # prompt 7, responses of 3, 9, 1, 4 tokens
    packed = shared_prompt.pack_shared_prompt([item], bench.PAD_ID)
    assert packed["input_ids"].shape == (1, 7 + 17) and (packed["segments"] >= 0).all()
    assert preferences.forward_length(item, share_prompt=True) == 24
    assert preferences.forward_length(item, share_prompt=False) == 4 * 7 + 17

    lengths = torch.randint(10, 1000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = training.batch_order(lengths, 8, seed=3, epoch=0)
    assert len(batches) == 25 and all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(200))
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    # Batches are consecutive runs of the sorted lengths: their ranges never overlap.
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--shapes", "512x512"])
    assert e.value.code == 2 and "--shapes: '512x512' is not PROMPT+RESPONSE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--variants", "usual,fast"])
    assert e.value.code == 2 and "unknown variant 'fast'" in capsys.readouterr().err
    (tmp_path / "file").touch()
    with pytest.raises(SystemExit) as e:  # refused before minutes of measuring, not after
        bench.main(["--tiny", "--json", str(tmp_path / "file" / "out.json")])
    assert e.value.code == 2 and "--json: cannot create" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bench.main([])
        assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_generation.main(["--tiny", "--model", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path}: not a model folder (no config.json)\n"


# ---------------------------------------------------------------------------------------------
# benchmarks/structure.py: the layout figures, on a repository whose figures follow by hand

TINY_REPO = {
    "README.md": "# Tiny\n\nOne line.\n",
    ".hidden": "not an entry\n",
    "apo.py": '''"""A stage."""
import shared


def step_loss(x):
    return shared.double(x)


def train(args):
    lock = shared.claim(args)
    for step in range(args.steps):
        loss = step_loss(step)
        shared.log_metrics(loss)
    return lock


def main(argv=None):
    args = shared.parse_args(argv)
    shared.run_stage(train, args)
''',
    "collect.py": '''"""Another stage.

Its docstring is not code."""
import shared


def work(args):
    # a comment is not code
    print(args)


def main(argv=None):
    args = shared.parse_args(argv)
    with shared.OutputLock(args):
        shared.run_stage(lambda a: work(a), args)
    shared.report(args)
''',
    "shared.py": '''def double(x):
    return 2 * x


def claim(args):
    return args


def log_metrics(loss):
    print(loss)


def parse_args(argv):
    return argv


def run_stage(stage, args):
    stage(args)


def report(args):
    import collect

    collect.work(args)


class OutputLock:
    def __init__(self, args):
        self.args = args

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
''',
    "tests/test_x.py": "import apo\nimport shared\n",
    "benchmarks/b.py": "import apo\n",
}


def test_structure_figures_of_a_tiny_repository(tmp_path):
    for name, text in TINY_REPO.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "benchmarks/structure.py", str(tmp_path), "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    # README.md, apo.py, collect.py, shared.py, tests/, benchmarks/ (.hidden is not seen).
    assert (r["top_level"]["entries"], r["top_level"]["py_files"], r["top_level"]["folders"]) == (6, 3, 2)
    assert r["readme"] == {"bytes": 18, "lines": 3}
    # The loop (3 lines) + step_loss, shared.double, shared.log_metrics (2 lines each).
    step = r["apo_step"]
    assert (step["lines"], step["definitions"], step["files"]) == (9, 4, 2)
    assert step["file_names"] == ["apo.py", "shared.py"]
    # apo.py: 12 code lines (not the docstring); `lock = shared.claim(...)`, `shared.log_metrics(...)` and
    # `return lock` (bound by a plumbing statement) are plumbing. collect.py: 8 code lines, the
    # `with shared.OutputLock(...)` header plumbing, its body not.
    assert r["plumbing"] == {"apo": {"code_lines": 12, "plumbing_lines": 3, "share": 0.25},
                             "collect": {"code_lines": 8, "plumbing_lines": 1, "share": 0.125}}
    s = r["structure"]
    # Product files apo, collect, shared; arrows apo -> shared, collect -> shared, shared -> collect.
    assert (s["product_files"], s["import_arrows"]) == (3, 3)
    apo, collect = s["stages"]["apo"], s["stages"]["collect"]
    # apo: run_stage(train, args) calls train back; args crosses into shared at run_stage and claim.
    assert (apo["files_entered"], apo["args_passes_back_up"], apo["passes_back_up"], apo["args_cross_file_calls"]) \
        == (2, 1, 1, 2)
    # collect: the lambda handed to run_stage and report's collect.work(args); args crosses at
    # OutputLock, run_stage, report and collect.work.
    assert (collect["files_entered"], collect["args_passes_back_up"], collect["passes_back_up"],
            collect["args_cross_file_calls"]) == (2, 2, 2, 4)
    assert "6 entries, 3 .py" in proc.stdout
