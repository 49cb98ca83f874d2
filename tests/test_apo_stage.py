"""Tests of apo.py, stage 4: training, the reference cache, exact resume, 2 processes, the VLM path,
bad input, the NaN guard and the shared-prompt forward.

Real runs of the script in subprocesses on tiny real models (conftest.py) and a hand-written
preference file. The runs the tests compare share module-scoped fixtures, so each runs once.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import apo
from common import shared_prompt
from common import modeling
import tiny_models
from apo_loss import LOSSES, apo_loss
from common.preferences import build_examples, make_batch, responses_of, select_negatives
from common.records import RecordError, file_hash, load_preferences
from common.reference import REFERENCE_FILE, REFERENCE_VERSION
from common.run import run_folder

ROOT = Path(__file__).resolve().parent.parent

# K = 1, 2, 3, 2 negatives; drift orders the negatives kept by --max-negatives.
PREFERENCES = [
    {"id": "a", "prompt": "The cardiac silhouette is enlarged. What do you see?",
     "chosen": "The heart is enlarged.\nAnswer: Cardiomegaly",
     "rejected": ["No acute findings.\nAnswer: No Finding"], "drift": [1.0]},
    {"id": "b", "prompt": "There is blunting of the costophrenic angle.", "system": "You are a careful radiologist.",
     "chosen": "Blunted angle means fluid.\nAnswer: Pleural Effusion",
     "rejected": ["Answer: Pneumothorax", "The lungs are clear.\nAnswer: No Finding"],
     "rejected_sources": ["s1", "s2"], "drift": [0.5, 1.0]},
    {"id": "c", "prompt": "A retrocardiac opacity is seen.", "chosen": "Opacity behind the heart.\nAnswer: Atelectasis",
     "rejected": ["Answer: Pneumonia", "Answer: Consolidation", "Answer: No Finding"], "drift": [0.3, 0.3, 1.0]},
    {"id": "d", "prompt": "No pneumothorax is seen. The cardiac silhouette is normal.",
     "chosen": "Normal study.\nAnswer: No Finding", "rejected": ["Answer: Pneumothorax", "Answer: Cardiomegaly"]},
]
# A prompt that leaves no room under --max-length 256: skipped and counted, never a crash.
TOO_LONG = {"id": "long", "prompt": "The cardiac silhouette is enlarged. " * 200, "chosen": "Answer: Cardiomegaly",
            "rejected": ["Answer: No Finding"]}
START_LOSS = sum(math.log(1 + len(p["rejected"])) for p in PREFERENCES) / len(PREFERENCES)

# One global micro-batch of 2 instances, 2 of them per step: every step sees all 4 instances.
TRAIN = ["--max-length", "256", "--grad-accum", "2", "--max-steps", "6", "--lr", "1e-3", "--schedule", "constant",
         "--warmup", "0", "--save-every", "3"]


def loss_settings(**changed):
    """apo_step_loss's settings as apo.py's parse_args gives them: the defaults, with changes."""
    return apo.parse_args(["--model", "m", "--data", "d", "--out", "o",
                           *(f"--{k.replace('_', '-')}" for k, v in changed.items() if v is True)])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env(**extra):
    # One thread per process: the CI box has 2 cores and the 2-process test runs two of us.
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.pop("ACCELERATE_USE_CPU", None)
    return dict(e, **extra)


def run_apo(*args, launcher=(), extra_env=None, check=True):
    proc = subprocess.run([*launcher, *([] if launcher else [sys.executable]), "apo.py", *map(str, args)], cwd=ROOT,
                          env=env(**(extra_env or {})), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"apo.py exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(out):
    return [json.loads(line) for line in (run_folder(out) / "metrics.jsonl").read_text().splitlines()]


# Two runs that differ only in the order of their fp32 sums (one process's local sum against gloo's
# all-reduce, a 2-row batch against two 1-row batches) see the same weights and data at step 1,
# before any update, so its loss and gradient norm agree to fp32 rounding: each of the few dozen
# operations between the weights and the loss adds a few ulps (2^-24, about 6e-8) of relative
# error, and 1e-5 is about 170 ulps. The 1e-6 absolute is for values near 0, where a relative bound
# says nothing: at step 1 the policy is the reference, so rewards and margins are 0 up to rounding.
STEP1_RTOL, STEP1_ATOL = 1e-5, 1e-6


def assert_same_first_step(a, b, keys=("loss", "rewards/margins", "grad_norm")):
    assert a["step"] == b["step"] == 1
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=STEP1_RTOL, abs=STEP1_ATOL), key


def adam_step_bound(t, beta1=0.9, beta2=0.999):
    """The most one bias-corrected AdamW step t can move a weight, in units of the lr, whatever the
    gradients: |m_t| <= sqrt(v_t) * (1-b1)/sqrt(1-b2) * sqrt(sum_k<t (b1^2/b2)^k) by Cauchy-Schwarz,
    divided by the bias corrections (1 at t = 1, about 1.02 at t = 6 for torch's default betas)."""
    ratio = beta1 ** 2 / beta2
    return ((1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2))
            * math.sqrt(sum(ratio ** k for k in range(t))))


def adam_divergence_bound(lr, steps):
    """How far two AdamW runs from the same start can end apart, per weight, with no weight decay and
    no step's lr above `lr`. After step 1 nothing tighter holds for any machine: Adam divides by the root of
    the second moment, so a gradient element near zero whose rounding differs between the runs
    takes a step-sized update in one and not the other."""
    return sum(2 * lr * adam_step_bound(t) for t in range(1, steps + 1))


def assert_same_weights(a, b, atol, rtol=1e-4):
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=rtol, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "preferences.jsonl", PREFERENCES + [TOO_LONG])


@pytest.fixture(scope="module")
def straight(tiny_text_model, data, tmp_path_factory):
    """6 uninterrupted steps in one process, 2 instances per micro-batch."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_apo("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", 2, *TRAIN)
    return out, proc


# ---------------------------------------------------------------------------------------------
# Training


def test_training_raises_margin_and_writes_a_loadable_model(tiny_text_model, data, straight):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, proc = straight
    assert "apo: 6 steps on 4 preferences (1 skipped: prompt too long" in proc.stdout
    assert "reference log-probs: computed" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) >= {"loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                            "logps/rejected", "learning_rate", "tokens_per_s", "grad_norm"}
    # Before the first update the policy IS the reference: every reward is 0, P = 1 / (1 + K).
    assert rows[0]["loss"] == pytest.approx(START_LOSS, abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5) and rows[0]["rewards/accuracies"] == 0
    assert rows[-1]["loss"] < rows[0]["loss"]

    # Re-measure the training batch: the final folder (plain from_pretrained) against the cache.
    final = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_text_model)
    processor = modeling.load_processor(tiny_text_model)
    examples = build_examples(load_preferences(data)[:4], None, data)
    batch = make_batch([modeling.encode(processor, ex.record, responses_of(ex), 256) for ex in examples],
                           modeling.tokenizer_of(processor).pad_token_id, share_prompt=False)
    with torch.no_grad():
        pc, pr, mask, _ = apo.concatenated_forward(modeling.ResponseLogps(final), batch, "cpu")
        rc, rr, _, _ = apo.concatenated_forward(modeling.ResponseLogps(initial), batch, "cpu")
    cache = load_file(str(run_folder(out) / REFERENCE_FILE))
    torch.testing.assert_close(cache["chosen"], rc, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cache["rejected"][mask], rr[mask], atol=1e-4, rtol=1e-5)
    assert cache["num_negatives"].tolist() == [1, 2, 3, 2] and cache["line"].tolist() == [1, 2, 3, 4]
    _, chosen_r, rejected_r = apo_loss(pc, pr, rc, rr, beta=0.1, rejected_mask=mask)
    margin = chosen_r - rejected_r.masked_fill(~mask, float("-inf")).max(1).values
    assert (margin > 0).all(), margin  # it was exactly 0 for every instance at the start
    assert margin.mean() > 0.05


def test_reference_cache_reused_and_recomputed(tiny_text_model, tmp_path):
    data = write_jsonl(tmp_path / "preferences.jsonl", PREFERENCES)
    out = tmp_path / "out"
    cache = run_folder(out) / REFERENCE_FILE
    common = ("--model", tiny_text_model, "--data", data, "--out", out, "--reference-only")

    assert "reference log-probs computed for 4 preferences" in run_apo(*common).stdout
    first = cache.stat().st_mtime_ns
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    assert meta["data_sha256"] == file_hash(data) and meta["max_length"] == "4096"
    assert meta["model"] == str(Path(tiny_text_model).resolve()) and meta["version"] == REFERENCE_VERSION

    assert "reference log-probs reused" in run_apo(*common).stdout
    assert cache.stat().st_mtime_ns == first  # not rewritten

    write_jsonl(data, PREFERENCES[:3] + [dict(PREFERENCES[3], chosen="Answer: No Finding")])
    assert "reference log-probs computed" in run_apo(*common).stdout
    with safe_open(str(cache), framework="pt") as f:
        assert f.metadata()["data_sha256"] == file_hash(data)


def test_sigkill_then_rerun_resumes_to_the_same_weights(tiny_text_model, data, straight, tmp_path):
    out = tmp_path / "killed"
    common = ("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", 2, *TRAIN)
    # Killed right after the first micro-batch of step 4 (global micro-batch 6), a checkpoint at step 3.
    killed = run_apo(*common, launcher=(sys.executable, "tests/launch_for_tests.py"),
                     extra_env={"APO_TEST_SIGKILL_AFTER_BACKWARD": "6"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in (run_folder(out) / "checkpoints").iterdir()] == ["step-3"]
    assert not (out / "model.safetensors").exists()
    cached = (run_folder(out) / REFERENCE_FILE).stat().st_mtime_ns

    resumed = run_apo(*common)
    assert "reference log-probs: reused" in resumed.stdout and "resuming from step 3" in resumed.stdout
    assert (run_folder(out) / REFERENCE_FILE).stat().st_mtime_ns == cached
    assert_same_weights(straight[0], out, atol=1e-6)
    straight_rows, resumed_rows = metrics(straight[0]), metrics(out)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight_rows, resumed_rows):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)

    # A rerun of the finished run does nothing: the model folder (and so its fingerprint) stays as it was.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    rerun = run_apo(*common)
    assert "apo: nothing to do" in rerun.stdout and "reference log-probs" not in rerun.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run_folder(out) / "training_summary.json").read_text())["steps"] == 6

    # Other data in the same folder is refused at once, before a reference pass could overwrite the cache.
    other = write_jsonl(tmp_path / "other.jsonl", PREFERENCES[:3])
    refused = run_apo("--model", tiny_text_model, "--data", other, "--out", out, "--batch-size", 2, *TRAIN,
                      check=False)
    assert refused.returncode == 2 and "saved by a run with other settings (data_sha256:" in refused.stderr
    assert (run_folder(out) / REFERENCE_FILE).stat().st_mtime_ns == cached


def test_two_processes_match_one(tiny_text_model, data, straight, tmp_path):
    out = tmp_path / "ddp"
    # `--cpu` alone makes accelerate launch run one process; --multi_gpu with ACCELERATE_USE_CPU
    # starts 2 processes that talk over gloo on the CPU.
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    # 1 instance per process x 2 processes: the same global micro-batch as the straight run's 2.
    proc = run_apo("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", 1, *TRAIN,
                   launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"})
    assert "(1 x 2 processes x 2 accumulation)" in proc.stdout
    one, two = metrics(straight[0]), metrics(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    assert_same_first_step(one[0], two[0])
    assert two[-1]["loss"] < two[0]["loss"]
    # The reference pass is sharded over the processes and summed: same cache as one process, to
    # fp32 rounding of sums of up to 256 token log-probs.
    ref1, ref2 = load_file(str(run_folder(straight[0]) / REFERENCE_FILE)), load_file(str(run_folder(out) / REFERENCE_FILE))
    for name in ref1:
        torch.testing.assert_close(ref2[name], ref1[name], atol=1e-4, rtol=1e-5)
    # TRAIN: 6 steps at a constant lr of 1e-3, no weight decay.
    assert_same_weights(straight[0], out, atol=adam_divergence_bound(1e-3, 6), rtol=0)


def test_data_shorter_than_one_step_and_a_warmup_of_the_whole_run_are_warned_with_the_numbers(tiny_text_model, data,
                                                                                         tmp_path):
    # 4 preferences, a global batch of 8 (the default 32 on 16 preferences, smaller)
    proc = run_apo("--model", tiny_text_model, "--data", data, "--out", tmp_path / "o", "--batch-size", 1,
                   "--global-batch", 8, "--max-length", 256)
    assert "apo: 1 steps on 4 preferences" in proc.stdout, proc.stdout
    assert ("warning: 4 examples x 1 epochs are less than one optimizer step of 8: running 1 step, which sees the "
            "data 2.0 times; lower --global-batch (or --grad-accum) to at most 4, or set --max-steps") in proc.stderr
    assert ("warning: --warmup 0.05 of 1 steps is 1 warmup steps: the run never reaches its lr 5e-07 (the first "
            "step is at lr 0); lower --warmup or train more steps") in proc.stderr
    assert metrics(tmp_path / "o")[0]["epoch"] == 2.0  # what the warning said


def test_dpo_pairs_loss_starts_at_log2_and_learns(tiny_text_model, data, straight, tmp_path):
    """--loss dpo-pairs: at the reference every pair is -log sigmoid(0) = log 2, whatever K is;
    the reference cache of the APO run is reused (it does not depend on the loss)."""
    out = tmp_path / "pairs"
    shutil.copy(run_folder(straight[0]) / REFERENCE_FILE, run_folder(out).mkdir() or run_folder(out) / REFERENCE_FILE)
    proc = run_apo("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", 2, "--loss", "dpo-pairs",
                   *TRAIN)
    assert "reference log-probs: reused" in proc.stdout, proc.stdout
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    # The closing line's losses are metrics.jsonl's first and last, to four decimals.
    assert f"; loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}; model in {out}" in proc.stdout, proc.stdout
    # Another objective, other weights: the two runs are not the same training.
    a, b = load_file(str(straight[0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_vlm_path_with_an_image(tiny_vl_model, tmp_path):
    from transformers import AutoModelForImageTextToText

    tiny_models.write_test_image(tmp_path / "cxr.png", seed=1)
    tiny_models.write_test_image(tmp_path / "prior.png", seed=2)
    rows = [dict(PREFERENCES[0], images=["cxr.png"]), dict(PREFERENCES[1], images=["cxr.png", "prior.png"]),
            PREFERENCES[2]]  # a text-only instance in a VLM run
    data = write_jsonl(tmp_path / "preferences.jsonl", rows)
    out = tmp_path / "out"
    proc = run_apo("--model", tiny_vl_model, "--data", data, "--out", out, "--batch-size", 3, "--grad-accum", 1,
                   "--max-steps", 2, "--lr", "1e-3", "--max-negatives", 2, "--nll-weight", 0.5)
    assert "apo: 2 steps on 3 preferences" in proc.stdout
    # K = 1, 2, 3 cut to 1, 2, 2; at the start the loss is sum log(1 + K) / 3 plus 0.5 x the chosen NLL.
    first = metrics(out)[0]
    assert first["loss"] == pytest.approx((math.log(2) + 2 * math.log(3)) / 3 + 0.5 * first["nll_loss"], abs=1e-5)
    assert load_file(str(run_folder(out) / REFERENCE_FILE))["num_negatives"].tolist() == [1, 2, 2]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert "vision_config" in model.config.to_dict()


# ---------------------------------------------------------------------------------------------
# Bad input and faults


@pytest.mark.parametrize("bad, field", [
    (dict(PREFERENCES[1], rejected=[], drift=None, rejected_sources=None), "rejected"),
    (dict(PREFERENCES[1], images=["cxr.png"]), "images"),  # a text model cannot read images
    (dict(PREFERENCES[1], drift=[float("nan")] * len(PREFERENCES[1]["rejected"])), "drift[0]"),  # json.dumps: NaN
])
def test_bad_preference_names_file_line_field(tiny_text_model, tmp_path, bad, field):
    tiny_models.write_test_image(tmp_path / "cxr.png")
    data = write_jsonl(tmp_path / "preferences.jsonl", [PREFERENCES[0], bad, PREFERENCES[2]])
    proc = run_apo("--model", tiny_text_model, "--data", data, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert f"error: {data}:2: field '{field}':" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_the_last_checkpoint_intact(tiny_text_model, data, tmp_path):
    out = tmp_path / "out"
    # lr 1e30 blows the weights up in step 1, so step 2's loss is NaN.
    proc = run_apo("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", 2, "--grad-accum", 2,
                   "--max-length", 256, "--max-steps", 4, "--lr", "1e30", "--warmup", 0, "--save-every", 1,
                   check=False)
    assert proc.returncode == 1
    assert "error: loss is nan at step 2; stopping" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in (run_folder(out) / "checkpoints").iterdir()] == ["step-1"]
    assert json.loads((run_folder(out) / "checkpoints/step-1/run_state.json").read_text())["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(run_folder(out) / "checkpoints/step-1/model.safetensors")).values())
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Pieces


def test_max_negatives_keeps_the_most_drifted_first():
    record = {"rejected": ["a", "b", "c", "d"], "drift": [0.2, 0.9, 0.2, 0.5], "_line": 7}
    assert select_negatives(record, 2, "p.jsonl") == [1, 3]
    assert select_negatives(record, None, "p.jsonl") == [1, 3, 0, 2]  # ties keep file order
    assert select_negatives({"rejected": ["a", "b", "c"], "_line": 1}, 2, "p.jsonl") == [0, 1]
    with pytest.raises(RecordError, match=r"p.jsonl:7: field 'drift'"):
        select_negatives(dict(record, drift=["x", 1, 1, 1]), 2, "p.jsonl")


def test_split_rows_masks_missing_negatives():
    values = torch.tensor([10.0, 11.0, 20.0, 21.0, 22.0, 23.0, 30.0, 31.0])  # K = 1, 3, 1
    chosen, rejected, mask = apo.split_rows(values, torch.tensor([1, 3, 1]))
    assert chosen.tolist() == [10.0, 20.0, 30.0]
    assert mask.tolist() == [[True, False, False], [True, True, True], [True, False, False]]
    assert rejected[mask].tolist() == [11.0, 21.0, 22.0, 23.0, 31.0]


def test_readme_method_in_20_lines_is_what_apo_py_computes(tiny_text_model, data, straight):
    """The README's plain APO step (full logits, reference recomputed) gives apo.py's loss and gradients."""
    from transformers import AutoModelForCausalLM

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- method-in-20-lines")[1].split("```python\n")[1].split("```")[0]
    plain = {}
    exec(compile(block, "README.md (the method in 20 lines)", "exec"), plain)

    processor = modeling.load_processor(tiny_text_model)
    examples = [ex for ex in build_examples(load_preferences(data)[:4], None, data) if len(ex.negatives) == 2]
    assert len(examples) == 2  # the README's view(-1, 1 + k) wants one K for the batch
    batch = make_batch([modeling.encode(processor, ex.record, responses_of(ex), 256) for ex in examples],
                           modeling.tokenizer_of(processor).pad_token_id, share_prompt=False)
    policy = AutoModelForCausalLM.from_pretrained(straight[0])  # trained: rewards are not all 0
    reference = AutoModelForCausalLM.from_pretrained(tiny_text_model)

    with torch.no_grad():
        reference_logps = plain["summed_logps"](reference, **batch["inputs"])
    readme_loss = plain["apo_step"](policy, batch["inputs"], reference_logps, k=2)
    readme_loss.backward()
    readme_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    with torch.no_grad():
        ref_chosen, ref_rejected, _, _ = apo.concatenated_forward(modeling.ResponseLogps(reference), batch, "cpu")
    losses, _ = apo.apo_step_loss(modeling.ResponseLogps(policy, chunk_size=5), batch, (ref_chosen, ref_rejected),
                                  "cpu", loss_settings())
    losses.mean().backward()
    assert abs(readme_loss.item() - losses.mean().item()) < 1e-5 and readme_loss.item() != pytest.approx(math.log(3))
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, readme_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_length_normalize_divides_every_reward_by_its_response_tokens(tiny_text_model, data, straight):
    """--length-normalize: apo_step_loss's rewards are the summed rewards over each response's token count."""
    from transformers import AutoModelForCausalLM

    processor = modeling.load_processor(tiny_text_model)
    examples = build_examples(load_preferences(data)[:3], None, data)
    batch = make_batch([modeling.encode(processor, ex.record, responses_of(ex), 256) for ex in examples],
                           modeling.tokenizer_of(processor).pad_token_id, share_prompt=False)
    policy = modeling.ResponseLogps(AutoModelForCausalLM.from_pretrained(straight[0]))
    with torch.no_grad():
        reference = apo.concatenated_forward(modeling.ResponseLogps(AutoModelForCausalLM.from_pretrained(tiny_text_model)),
                                             batch, "cpu")[:2]
        pc, pr, mask, (tc, tr) = apo.concatenated_forward(policy, batch, "cpu")
        summed, s_sums = apo.apo_step_loss(policy, batch, reference, "cpu", loss_settings())
        averaged, a_sums = apo.apo_step_loss(policy, batch, reference, "cpu", loss_settings(length_normalize=True))
    chosen_r = 0.1 * (pc - reference[0]) / tc
    rejected_r = 0.1 * (pr - reference[1]) / tr
    expected, _, _ = apo_loss(chosen_r / 0.1, rejected_r / 0.1, torch.zeros_like(chosen_r),
                              torch.zeros_like(rejected_r), beta=0.1, rejected_mask=mask)
    torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=1e-5)
    assert a_sums["rewards/chosen"].item() == pytest.approx(chosen_r.sum().item(), abs=1e-6)
    assert (tc > 1).all() and not torch.allclose(summed, averaged)  # real responses: the flag changes the loss


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_equals_separate_forwards(tiny_text_model, tmp_path, attention):
    """Log-probs AND gradients of the packed shared-prompt forward equal one row per response."""
    processor = modeling.load_processor(tiny_text_model)
    data = write_jsonl(tmp_path / "p.jsonl", PREFERENCES)
    examples = build_examples(load_preferences(data), None, data)
    encoded = [modeling.encode(processor, ex.record, responses_of(ex), 4096) for ex in examples]
    pad_id = modeling.tokenizer_of(processor).pad_token_id
    model = modeling.load_model(tiny_text_model)
    model.set_attn_implementation(attention)
    results = []
    for share_prompt, module in ((False, modeling.ResponseLogps(model, chunk_size=7)),
                                 (True, shared_prompt.SharedPromptLogps(model, chunk_size=7))):
        model.zero_grad()
        batch = make_batch(encoded, pad_id, share_prompt)
        logps, counts = module(**batch["inputs"])
        # Uneven weights per row, so a row mixed up with another would show.
        (logps * torch.arange(1, len(logps) + 1)).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (separate, n_separate, g_separate), (shared, n_shared, g_shared) = results
    assert len(separate) == sum(1 + len(p["rejected"]) for p in PREFERENCES)
    assert torch.equal(n_separate, n_shared)
    torch.testing.assert_close(shared, separate, atol=1e-4, rtol=1e-6)
    for name, grad in g_separate.items():
        torch.testing.assert_close(g_shared[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_share_prompt_run_starts_at_the_reference(tiny_text_model, data, straight, tmp_path):
    out = tmp_path / "out"
    # With gradient checkpointing too: the recomputed layers see the same block mask.
    run_apo("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", 2, *TRAIN, "--share-prompt",
            "--gradient-checkpointing")
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(START_LOSS, abs=1e-5)
    # Same data, same steps: the same training curve as the separate forwards, up to float rounding.
    for a, b in zip(metrics(straight[0]), rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    with safe_open(str(run_folder(out) / REFERENCE_FILE), framework="pt") as f:
        assert f.metadata()["share_prompt"] == "True"


# ---------------------------------------------------------------------------------------------
# The output: never the model folder read, one writer at a time


def test_out_equal_to_model_or_locked_is_refused_before_any_model_work(tiny_text_model, data, tmp_path, capsys):
    import fcntl
    import shutil

    model = Path(shutil.copytree(tiny_text_model, tmp_path / "bootstrap"))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir())
    with pytest.raises(SystemExit) as exit_:
        apo.main(["--model", str(model), "--data", str(data), "--out", str(model), *TRAIN])
    assert exit_.value.code == 2
    assert f"is the model folder --model {model}, which this stage reads" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir()) == before

    out = tmp_path / "out"
    run_folder(out).mkdir()
    with open(run_folder(out) / ".lock", "a") as held:  # what a running apo.py holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_:
            apo.main(["--model", str(model), "--data", str(data), "--out", str(out), *TRAIN])
    assert exit_.value.code == 2 and "another apo.py is writing this output" in capsys.readouterr().err
    assert sorted(p.name for p in run_folder(out).iterdir()) == [".lock"] and not out.exists()


def test_a_damaged_reference_cache_is_recomputed_and_said_so(tiny_text_model, tmp_path, capsys):
    """The cache was reused whenever its metadata and lines matched: NaN values stopped training with
    a wrong hint, a wrong shape raised an IndexError, values shifted by +500 trained silently. Each is
    now noticed on load (shape, finiteness, log-probs <= 0, the content hash saved with it), said,
    and recomputed to exactly the values of a clean pass."""
    from safetensors.torch import load_file, save_file

    data = write_jsonl(tmp_path / "preferences.jsonl", PREFERENCES)
    out = tmp_path / "out"
    cache = run_folder(out) / REFERENCE_FILE
    common = [str(a) for a in ("--model", tiny_text_model, "--data", data, "--out", out, "--reference-only")]

    def reference_pass():  # in this process: the interpreter and torch start once
        apo.main(common)
        return capsys.readouterr()

    reference_pass()
    clean = load_file(str(cache))
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()

    damages = {
        "NaN": (lambda t: dict(t, chosen=torch.full_like(t["chosen"], float("nan"))), "'chosen' holds NaN or infinite"),
        "shape": (lambda t: dict(t, rejected=t["rejected"][:, :1].contiguous()), "'rejected' has shape (4, 1)"),
        "+500": (lambda t: dict(t, chosen=t["chosen"] + 500), "'chosen' holds positive values"),
        "-1": (lambda t: dict(t, rejected=t["rejected"] - 1),  # plausible values, still caught
               "its values are not the ones that were saved (content hash differs)"),
    }
    for name, (damage, message) in damages.items():
        save_file(damage(dict(clean)), str(cache), metadata=meta)
        result = reference_pass()
        assert f"the cached {cache} is not used, {message}" in result.out, (name, result.out)
        assert "reference log-probs computed" in result.out
        again = load_file(str(cache))
        assert all(torch.equal(again[k], clean[k]) for k in clean), name
    assert "reference log-probs reused" in reference_pass().out


@pytest.mark.parametrize("change, field, message", [
    (lambda p: dict(p, rejected=[p["chosen"]] + p["rejected"][1:]), "rejected[0]", "is the chosen text itself"),
    (lambda p: dict(p, rejected=["  "] + p["rejected"][1:]), "rejected[0]", "empty"),
    (lambda p: dict(p, drift=[1.5] + p["drift"][1:]), "drift[0]", "must be a number in [0, 1], got 1.5"),
    (lambda p: dict(p, drift=[-0.1] + p["drift"][1:]), "drift[0]", "must be a number in [0, 1], got -0.1"),
    (lambda p: dict(p, drift=["high"] + p["drift"][1:]), "drift[0]", "must be a number in [0, 1], got 'high'"),
    (lambda p: dict(p, rejected_sources=[7] + p["rejected_sources"][1:]), "rejected_sources[0]",
     "must be a source name (a string), got int"),
])
def test_preferences_that_reject_their_chosen_or_break_design_ranges_are_refused(tmp_path, change, field, message):
    """preferences.jsonl accepted a rejected text equal to the chosen one, empty negatives, a drift
    outside [0, 1] (DESIGN) and non-string source names."""
    first = next(p for p in PREFERENCES if p.get("drift") and p.get("rejected_sources"))
    data = write_jsonl(tmp_path / "preferences.jsonl", [change(first)])
    with pytest.raises(RecordError) as e:
        load_preferences(data)
    assert str(e.value).startswith(f"{data}:1: field '{field}': {message}"), str(e.value)


# ---------------------------------------------------------------------------------------------
# --help and argument errors answer before torch is loaded (the import alone takes seconds)

HEAVY = ("torch", "transformers", "accelerate", "peft")
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code, sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("script", ["apo.py", "bootstrap.py", "evaluate.py", "scripts/export_preferences.py", "consensus.py",
                                    "collect.py"])
@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--no-such-flag"], 2)])
def test_help_and_argument_errors_answer_without_loading_torch(script, argv, code):
    assert set(apo.LOSS_NAMES) == set(LOSSES)  # --loss's choices, named without loading apo_loss
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), script, *argv], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == f"exit {code} []", proc.stdout + proc.stderr
