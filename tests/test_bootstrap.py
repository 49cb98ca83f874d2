"""Tests of bootstrap.py (stage 2) on tiny real models: what the loss sees, exact resume after
SIGKILL, 2 processes = 1 process, NaN guard, VLM image masking, and bad input."""

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig

import bootstrap
from common import training, trajectories
import tiny_models
from launch_for_tests import sigkill_at_line
from common.modeling import IGNORE_INDEX, ResponseLogps, load_model, load_processor, tokenizer_of
from common.records import load_instances
from common.run import STOPPED_EXIT, checkpoint_dirs, run_folder

REPO = Path(__file__).resolve().parent.parent

SHORT = [
    "The costophrenic angle is blunted, which suggests an effusion.\nAnswer: Pleural Effusion",
    "The cardiac silhouette is enlarged.\nAnswer: Cardiomegaly",
    "No acute process is seen.\nAnswer: No Finding",
]
REFUSAL = "I am not able to give a medical diagnosis. Please consult a radiologist."


def write_data(folder, n_train=8, image=None, long_prompt=False, long_response=False):
    """n_train train instances with 3 short trajectories each, one refusal, one test instance."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train):
        prompt = f"Study {i}. The chest radiograph shows blunting of the costophrenic angle. Which findings are present?"
        rows.append({"id": f"t{i}", "split": "train", "prompt": prompt,
                     "images": [image] if image else [],
                     "labels": {"Pleural Effusion": 1},
                     "trajectories": [{"source": f"s{k}", "text": SHORT[(i + k) % 3]} for k in range(3)]})
    rows[0]["trajectories"].append({"source": "refuser", "text": REFUSAL})
    if long_response:
        rows[1]["trajectories"][0]["text"] = "The cardiac silhouette is enlarged. " * 40 + "\nAnswer: Cardiomegaly"
    if long_prompt:
        rows.append({"id": "too-long", "split": "train", "prompt": "The cardiac silhouette is enlarged. " * 60,
                     "trajectories": [{"source": "s0", "text": SHORT[0]}, {"source": "s1", "text": SHORT[1]}]})
    rows.append({"id": "test0", "split": "test", "prompt": "Held out.", "trajectories": [{"source": "s0", "text": SHORT[0]}]})
    path = folder / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def run(args, check=True, **kw):
    result = subprocess.run([sys.executable, "bootstrap.py", *args], cwd=REPO, env=env(), capture_output=True,
                            text=True, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}")
    return result


def train_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2", "--grad-accum", "2",
            "--lr", "1e-3", "--max-length", "160", "--warmup", "0.34", *extra]


def metrics(out):
    return [json.loads(line) for line in (run_folder(out) / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# What the loss sees


def test_examples_are_train_pairs_with_refusals_counted(tmp_path):
    data = write_data(tmp_path, n_train=3)
    records = load_instances(data)
    records[1]["trajectories"].append({"source": "blank", "text": "  \n"})
    records.append({"id": "bare", "split": "train", "prompt": "p", "trajectories": []})

    kept, counts = trajectories.collect_examples(records, drop_unanswered=False)
    assert len(kept) == 3 * 3 + 1  # every (train instance, trajectory) pair, the refusal included
    assert REFUSAL in [e.text for e in kept]
    assert all(e.record["split"] == "train" for e in kept)
    assert (counts["train_instances"], counts["test_instances"], counts["unanswered"],
            counts["empty_trajectories"], counts["instances_without_trajectories"]) == (4, 1, 1, 1, 1)

    dropped, counts = trajectories.collect_examples(records, drop_unanswered=True)
    assert len(dropped) == 3 * 3 and REFUSAL not in [e.text for e in dropped]
    assert counts["unanswered"] == 1


def test_loss_is_cross_entropy_on_response_tokens_only(tmp_path, tiny_text_model):
    data = write_data(tmp_path, n_train=2)
    records = load_instances(data)
    examples, _ = trajectories.collect_examples(records, drop_unanswered=False)
    processor = load_processor(tiny_text_model)
    tok = tokenizer_of(processor)
    rows = [0, 3]  # different lengths, so the shorter row is padded
    batch = trajectories.make_batch(trajectories.encode_examples(processor, [examples[i] for i in rows], 512, data),
                                 tok.pad_token_id)

    for r, i in enumerate(rows):
        labelled = batch["labels"][r] != IGNORE_INDEX
        expected = tok(examples[i].text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert batch["labels"][r][labelled].tolist() == expected
        # the labelled tokens are the last real tokens of the row: nothing of the prompt, no padding
        n_real = int(batch["attention_mask"][r].sum())
        assert labelled.nonzero().flatten().tolist() == list(range(n_real - len(expected), n_real))
        assert batch["input_ids"][r][:n_real][labelled[:n_real]].tolist() == expected

    model = load_model(tiny_text_model)
    with torch.no_grad():
        logps, counted = ResponseLogps(model)(**batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert counted.tolist() == [(batch["labels"][r] != IGNORE_INDEX).sum().item() for r in range(2)]
    assert (-logps.sum() / counted.sum()).item() == pytest.approx(reference.item(), rel=1e-5)


def test_vl_image_tokens_are_masked_and_freeze_vision_keeps_the_tower(tmp_path, tiny_vl_model):
    tiny_models.write_test_image(tmp_path / "xray.png")
    data = write_data(tmp_path, n_train=2, image="xray.png")
    records = load_instances(data)
    examples, _ = trajectories.collect_examples(records, drop_unanswered=False)
    processor = load_processor(tiny_vl_model)
    batch = trajectories.make_batch(trajectories.encode_examples(processor, examples[:2], 512, data),
                                 tokenizer_of(processor).pad_token_id)
    image_token = json.loads((Path(tiny_vl_model) / "config.json").read_text())["image_token_id"]
    is_image = batch["input_ids"] == image_token
    # 64x64 px -> 4x4 patches of 14 px (resized to 56x56) -> 2x2 = 4 tokens after merging, per row
    assert is_image.sum(1).tolist() == [4, 4]
    assert (batch["labels"][is_image] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 2 * 16 and batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2

    out = tmp_path / "out"
    result = run(train_args(tiny_vl_model, data, out, "--max-steps", "2", "--freeze-vision", "--max-length", "512"))
    assert "2 steps on" in result.stdout

    from transformers import AutoModelForImageTextToText, AutoProcessor
    trained = AutoModelForImageTextToText.from_pretrained(out)
    assert AutoProcessor.from_pretrained(out).chat_template
    before = AutoModelForImageTextToText.from_pretrained(tiny_vl_model).state_dict()
    after = trained.state_dict()
    vision = [k for k in before if "visual." in k]
    language = [k for k in before if "layers." in k and "visual." not in k]
    assert vision and language
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in language)


# ---------------------------------------------------------------------------------------------
# Exact resume, finished runs, metrics


RESUME_ARGS = ["--max-steps", "6", "--save-every", "3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_text_model):
    """One uninterrupted 6-step run (2 rows x 2 accumulation), the reference of the tests below."""
    folder = tmp_path_factory.mktemp("straight")
    data = write_data(folder, long_prompt=True, long_response=True)
    out = folder / "out"
    result = run(train_args(tiny_text_model, data, out, *RESUME_ARGS))
    return data, out, result


def test_straight_run_outputs_counts_schedule_and_a_loadable_model(straight):
    data, out, result = straight
    summary = json.loads((run_folder(out) / "training_summary.json").read_text())
    # 8 x 3 trajectories + 1 refusal (kept) + 2 of the instance whose prompt leaves no room (skipped)
    assert (summary["examples"], summary["unanswered"], summary["prompt_too_long"], summary["truncated"]) == (25, 1, 2, 1)
    assert "1 unanswered kept, 1 truncated, 2 skipped (prompt too long)" in result.stdout

    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert [m["examples_seen"] for m in steps] == [4, 8, 12, 16, 20, 24]
    # transformers' schedule, as the Trainer's: warmup ceil(0.34 * 6) = 3 steps from 0, then cosine
    # to zero over the 3 others; logged unrounded
    lrs = [1e-3 * s / 3 for s in range(3)] + [1e-3 * 0.5 * (1 + math.cos(math.pi * p / 3)) for p in range(3)]
    assert [m["learning_rate"] for m in steps] == pytest.approx(lrs, rel=1e-12, abs=1e-18)
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0 for m in steps)
    assert sorted(p.name for p in (run_folder(out) / "checkpoints").iterdir()) == ["step-3", "step-6"]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_sigkill_then_rerun_gives_the_weights_of_a_straight_run(tmp_path, capsys, straight, tiny_text_model):
    data, reference, _ = straight
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "bootstrap.py", *train_args(tiny_text_model, data, out, *RESUME_ARGS)]
    proc = sigkill_at_line(cmd, "checkpoint: step 3", cwd=REPO, env=env())
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    # A checkpoint write killed half-way leaves only its temporary folder, which is never resumed from.
    torn = run_folder(out) / "checkpoints" / ".tmp-step-6"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)

    with pytest.raises(SystemExit) as exit_:  # other settings would mix two runs: refused before any loading
        bootstrap.main(train_args(tiny_text_model, data, out, *RESUME_ARGS, "--max-length", "200"))
    assert exit_.value.code == 2 and "saved by a run with other settings (max_length: 160 -> 200)" in capsys.readouterr().err

    resumed = run(train_args(tiny_text_model, data, out, *RESUME_ARGS))
    assert "resuming from step 3" in resumed.stdout
    # the tiny model's head is tied to its embeddings by its config: accelerate's warning about
    # the shared tensor at each checkpoint is expected, and dropped
    assert AutoConfig.from_pretrained(tiny_text_model).tie_word_embeddings
    assert "checkpoint: step 6" in resumed.stdout + resumed.stderr and "Removed shared tensor" not in resumed.stderr
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(reference)], rel=1e-6)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    bootstrap.main(train_args(tiny_text_model, data, out, *RESUME_ARGS))
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(SystemExit) as exit_:  # a larger --max-steps would continue it (test_hf_toolchain)
        bootstrap.main(train_args(tiny_text_model, data, out, *RESUME_ARGS, "--max-length", "200"))
    assert exit_.value.code == 2 and "max_length: 160 -> 200" in capsys.readouterr().err


def test_two_processes_give_the_losses_of_one(tmp_path, straight, tiny_text_model):
    data, one, _ = straight
    two = tmp_path / "two"
    # `--cpu` alone makes accelerate run one process; ACCELERATE_USE_CPU + --multi_gpu gives gloo on CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "bootstrap.py",
              *train_args(tiny_text_model, data, two, *RESUME_ARGS, "--batch-size", "1")]
    result = subprocess.run(launch, cwd=REPO, env=dict(env(), ACCELERATE_USE_CPU="1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1 x 2 processes x 2 accumulation)" in result.stdout

    m1, m2 = metrics(one), metrics(two)
    assert [m["examples_seen"] for m in m2] == [m["examples_seen"] for m in m1]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-5)
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, tiny_text_model):
    data = write_data(tmp_path)
    out = tmp_path / "out"
    # A huge unclipped step sends the weights to ~1e30: the next forward overflows.
    args = train_args(tiny_text_model, data, out, "--max-steps", "6", "--save-every", "1", "--lr", "1e30",
                      "--max-grad-norm", "0", "--warmup", "0", "--schedule", "constant")
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "error: loss is nan at step 2" in err or "error: loss is inf at step 2" in err
    assert "checkpoints/step-1) is intact" in err and "Instances in this step: t" in err
    assert sorted(p.name for p in (run_folder(out) / "checkpoints").iterdir()) == ["step-1"]
    state = json.loads((run_folder(out) / "checkpoints" / "step-1" / "run_state.json").read_text())
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(run_folder(out) / "checkpoints" / "step-1" / "model.safetensors")).values())
    assert not (out / "model.safetensors").exists() and not (run_folder(out) / "training_summary.json").exists()
    assert [m["step"] for m in metrics(out)] == [1]


# ---------------------------------------------------------------------------------------------
# Bad input: file:line: field: message and exit 2, before any model is loaded


def _write(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = json.dumps({"id": "a", "split": "train", "prompt": "p", "trajectories": [{"source": "s", "text": "Answer: Edema"}]})


@pytest.mark.parametrize("content, message", [
    (GOOD + "\n{not json\n", "bad.jsonl:2: malformed JSON"),
    (GOOD + "\n" + json.dumps({"id": "b", "split": "dev", "prompt": "p", "trajectories": []}), "bad.jsonl:2: field 'split'"),
    (json.dumps({"id": "a", "split": "train", "prompt": "p"}), "bad.jsonl:1: field 'trajectories': missing"),
    (json.dumps({"id": "a", "split": "train", "prompt": "p", "images": ["gone.png"], "trajectories": []}),
     "bad.jsonl:1: field 'images': no such image file"),
    (GOOD + "\n" + GOOD, "bad.jsonl:2: field 'id': duplicate id"),
    (GOOD.encode() + b"\n\xff\xfe\n", "bad.jsonl:2: not UTF-8"),
    (GOOD + '\n{"id": "b", "split": "train", "prompt": "p", "trajectories": [], "weight": Infinity}',
     "bad.jsonl:2: field 'weight': Infinity is not valid JSON"),
    (json.dumps({"id": "a", "split": "train", "prompt": "p", "trajectories": [{"source": "s", "text": "x"}] * 2}),
     "bad.jsonl:1: field 'trajectories[1].source': duplicate source 's'"),
    (json.dumps({"id": "a", "split": "test", "prompt": "p", "trajectories": [{"source": "s", "text": "x"}]}),
     "no training examples"),
])
def test_bad_input_names_file_line_and_field(tmp_path, capsys, content, message):
    data = _write(tmp_path, content)
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(["--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_unknown_tracker_and_prompts_that_never_fit_exit_2(tmp_path, capsys, monkeypatch,
                                                                        tiny_text_model):
    data = write_data(tmp_path, n_train=2)
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(["--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "no-model" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(["--model", tiny_text_model, "--data", str(data), "--out", str(tmp_path / "o"),
                        "--report-to", "no-such-tracker"])
    assert exit_.value.code == 2 and "unknown tracker 'no-such-tracker'" in capsys.readouterr().err
    # a known tracker that is not installed (wandb is in no requirements file): the run stops, and says so
    import importlib.util

    assert importlib.util.find_spec("wandb") is None
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(["--model", tiny_text_model, "--data", str(data), "--out", str(tmp_path / "o"),
                        "--report-to", "wandb"])
    assert exit_.value.code == 2
    assert ("--report-to: wandb is not installed: pip install wandb, or run without --report-to wandb "
            "(metrics.jsonl is written either way); nothing was run") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    # an accelerate config's own accumulation would silently change the global batch
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(["--model", tiny_text_model, "--data", str(data), "--out", str(tmp_path / "o"),
                        "--grad-accum", "2"])
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    assert exit_.value.code == 2 and "sets gradient accumulation to [3], but this run needs 2" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        bootstrap.main(["--model", tiny_text_model, "--data", str(data), "--out", str(tmp_path / "o"),
                        "--max-length", "16"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # every instance's prompt alone is longer than 16 tokens: each is named, and the error says by how much
    assert err.count("skipped ") == 2 and f"{data}:1: prompt is " in err and f"{data}:2: prompt is " in err
    longest = max(int(n) for n in re.findall(r"prompt is (\d+) tokens, max length 16", err))
    assert (f"0 usable training examples, fewer than one micro-batch over all processes (2): 7 examples of 2 "
            f"instances skipped, their prompt leaves no room for a response under --max-length 16 (longest prompt "
            f"{longest} tokens); raise --max-length above {longest}") in err


def wait_for(condition, what, proc, timeout=600):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def steps_logged(out):
    path = run_folder(out) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_finishes_the_step_checkpoints_and_the_rerun_resumes(tmp_path, straight, tiny_text_model):
    """A cluster's preemption (SIGTERM) mid-run with the default --save-every 0: the step in flight
    finishes, a checkpoint of it is written, exit 75; a second run on the same --out meanwhile is
    refused by the lock; the same command then resumes from the checkpoint, not from step 0."""
    data, _, _ = straight
    out = tmp_path / "preempted"
    args = train_args(tiny_text_model, data, out, "--max-steps", "60")
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "bootstrap.py", *args], cwd=REPO, env=env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: steps_logged(out) >= 1, "a logged step", proc)
            proc.send_signal(signal.SIGSTOP)  # paused mid-run (tiny steps are fast), still holding its lock
            second = run(args, check=False)  # a concurrent run on the same --out
            assert second.returncode == 2 and "another bootstrap.py is writing this output" in second.stderr
            proc.send_signal(signal.SIGTERM)  # delivered as the run continues
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=600)
        finally:
            proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == STOPPED_EXIT, stderr[-2000:]
    stopped_at = steps_logged(out)
    assert 1 <= stopped_at < 60 and "Traceback" not in stderr
    assert f"stopped by a signal after step {stopped_at} of 60" in stderr and "Run the same command again" in stderr
    assert [p.name for p in checkpoint_dirs(out)] == [f"step-{stopped_at}"]
    assert not (out / "model.safetensors").exists()

    resumed = run(args)
    assert f"resuming from step {stopped_at}" in resumed.stdout
    assert [m["step"] for m in metrics(out)] == list(range(1, 61))


def test_a_full_disk_at_a_checkpoint_is_named_leaves_no_temporaries_and_the_rerun_resumes(
        tmp_path, straight, tiny_text_model, small_disk):
    """A real full disk (a 640 KiB tmpfs: room for step-3's ~420 KiB checkpoint, not for step-6's
    beside it). torch.save used to fail with "RuntimeError: [enforce fail at inline_container.cc:672]
    . unexpected pos" and leave .tmp-step-6 behind. Now: exit 2 naming the checkpoint, the disk and
    the resume, no temporary left; with space again the same command resumes from step 3 to the
    straight run's weights."""
    import shlex

    data, reference, _ = straight
    out = small_disk.disk / "out"
    command = shlex.join([sys.executable, "bootstrap.py", *train_args(tiny_text_model, data, out, *RESUME_ARGS)])
    host = shlex.quote(str(tmp_path))
    result = small_disk("640k", f"""
        {command} > {host}/first.out 2> {host}/first.err || echo $? > {host}/first.rc
        (cd {shlex.quote(str(out))}.run && find . | sort) > {host}/after-first.txt
        mount -o remount,size=8m {shlex.quote(str(small_disk.disk))}
        {command} > {host}/second.out 2> {host}/second.err
        cp {shlex.quote(str(out))}/model.safetensors {shlex.quote(str(out))}.run/metrics.jsonl {host}/
        """, env=env())
    assert result.returncode == 0, (tmp_path / "second.err").read_text()[-3000:] if (tmp_path / "second.err").exists() else result.stderr
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2" and "Traceback" not in err, err[-3000:]
    assert (f"error: {out}.run/checkpoints/step-6: the disk is full (No space left on device) while writing this; nothing "
            f"half-written was kept. Free some space and run again: the same command resumes from "
            f"{out}.run/checkpoints/step-3") in err
    after = (tmp_path / "after-first.txt").read_text().split()
    assert "./checkpoints/step-3/run_state.json" in after and not any("tmp" in p or "step-6" in p for p in after)
    assert "resuming from step 3" in (tmp_path / "second.out").read_text()
    a, b = weights(reference), weights(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_second_signal_stops_at_once(tmp_path, straight, tiny_text_model):
    """Ctrl-C, then SIGTERM before the step is done: the run ends at once (128 + 15), without a
    traceback and without the checkpoint the first signal asked for."""
    data, _, _ = straight
    out = tmp_path / "twice"
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "bootstrap.py", *train_args(tiny_text_model, data, out, "--max-steps", "60")],
                                cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: steps_logged(out) >= 1, "a logged step", proc)
            # Both pending while paused: Python handles SIGINT (2) first, then SIGTERM (15) right after.
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=600)
        finally:
            proc.kill()
    stderr = err_path.read_text()
    # Python's handlers run SIGINT first, then SIGTERM (exit 143); the delivery counter, which
    # may see both first, exits with the second signal delivered (the kernel's order: 130 or 143)
    assert proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), stderr[-2000:]
    assert ("SIGINT: finishing this optimizer step" in stderr and "SIGTERM: stopping at once" in stderr
            or "SIGINT, then SIGTERM: stopping at once" in stderr or "SIGTERM, then SIGINT: stopping at once" in stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert checkpoint_dirs(out) == [] and not (out / "model.safetensors").exists()


def test_two_sigterms_a_twentieth_of_a_second_apart_stop_at_once(tmp_path, straight, tiny_text_model):
    """Two SIGTERMs 0.05 s apart while the main thread is inside one long C call (a large model's
    forward; here a matrix product launch_for_tests.py runs after backward 2) used to reach Python's
    handler as one: the run finished the step and wrote a checkpoint (exit 75). Each delivery counts now."""
    import time

    data, _, _ = straight
    out = tmp_path / "twice"
    proc = subprocess.Popen([sys.executable, "tests/launch_for_tests.py", "bootstrap.py",
                             *train_args(tiny_text_model, data, out, "--max-steps", "60")],
                            cwd=REPO, env={**env(), "APO_TEST_LONG_C_CALL_AFTER_BACKWARD": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "long C call" in line:  # after a progress bar on the same line
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=600)
    finally:
        proc.kill()
        proc.stderr.close()
    stderr = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM, then SIGTERM: stopping at once" in stderr and "Traceback" not in stderr
    assert checkpoint_dirs(out) == [] and not (out / "model.safetensors").exists()


def test_a_model_folder_without_its_tokenizer_is_refused_by_every_stage(tmp_path, capsys, tiny_text_model):
    """With tokenizer.json deleted, transformers builds a 7-token tokenizer and bootstrap used to train
    and write a "finished" model on it (exit 0); with every tokenizer file gone, each stage ended in a
    ValueError traceback. Now each stage exits 2 naming the folder before any output is written."""
    import shutil

    import apo
    import collect
    import consensus
    import evaluate
    from test_apo_stage import PREFERENCES, write_jsonl

    data = write_data(tmp_path / "data", n_train=4)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCES)
    no_json, bare, no_template = tmp_path / "no-json", tmp_path / "bare", tmp_path / "no-template"
    for folder in (no_json, bare, no_template):
        shutil.copytree(tiny_text_model, folder)
    (no_json / "tokenizer.json").unlink()
    for f in bare.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            f.unlink()
    (no_template / "chat_template.jinja").unlink()

    def stage_runs(model):
        yield bootstrap.main, ["--model", model, "--data", data, "--out", tmp_path / "boot"]
        yield apo.main, ["--model", model, "--data", prefs, "--out", tmp_path / "apo"]
        yield consensus.main, ["--model", model, "--data", data, "--out", tmp_path / "p.jsonl"]
        yield evaluate.main, ["--models", model, "--data", data, "--split", "train", "--out", tmp_path / "eval"]
        yield collect.main, ["--data", data, "--sources", f"hf:{model}", "--out", tmp_path / "t.jsonl"]

    expected = {no_json: "the tokenizer has 7 tokens but the model has 400 embedding rows",
                bare: "it is not this model's tokenizer", no_template: "the tokenizer has no chat template"}
    for model, message in expected.items():
        for main, args in stage_runs(model):
            with pytest.raises(SystemExit) as exit_:
                main([str(a) for a in args])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and str(model) in err and message in err, (main.__module__, err)
            assert "Traceback" not in err
    assert not (tmp_path / "boot" / "model.safetensors").exists() and not (tmp_path / "apo" / "model.safetensors").exists()
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "t.jsonl").exists()
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()


def test_a_huge_prompt_is_skipped_by_its_characters_without_tokenizing_it(tmp_path, tiny_text_model):
    """A 50 MB prompt was tokenized whole before it was found too long: 10 GB of memory, minutes in
    the tokenizer during which SIGTERM went unanswered. Its characters alone now prove it cannot fit
    (no token is longer than the vocabulary's longest string), so it is skipped at once."""
    data = write_data(tmp_path / "data", n_train=4)
    huge = {"id": "huge", "split": "train", "prompt": "The cardiac silhouette is enlarged. " * 1_400_000,
            "trajectories": [{"source": "s0", "text": SHORT[0]}, {"source": "s1", "text": SHORT[1]}]}
    with open(data, "a") as f:
        f.write(json.dumps(huge) + "\n")
    assert data.stat().st_size > 50_000_000

    from accelerate import Accelerator

    from common.modeling import prompt_text

    processor = load_processor(tiny_text_model)
    huge["_line"] = 6
    kept, skipped, _ = trajectories.measure_examples(processor, [trajectories.Example(huge, SHORT[0], "s0")],
                                                  Namespace(max_length=160), data, Accelerator(cpu=True))
    longest = max(map(len, tokenizer_of(processor).get_vocab()))
    chars = len(prompt_text(processor, huge))
    # "at least N tokens (C characters)": measured by its characters (a tokenized prompt reads "is N tokens")
    assert kept == [] and skipped == [(f"{data}:6: prompt is at least {chars // longest} tokens ({chars} "
                                       "characters), max length 160", chars // longest)]

    # The whole stage: the huge instance is counted as skipped, the others train.
    result = run(train_args(tiny_text_model, data, tmp_path / "out", "--max-steps", "1"), timeout=300)
    assert "2 skipped (prompt too long)" in result.stdout



def test_a_sigkill_before_the_summary_rename_is_finished_without_saving_the_model_again(tmp_path, tiny_text_model):
    """Killed after the model and the summary were written, before the summary's rename: the rerun
    used to save identical weights again with new modification times, and evaluate.py then refused
    its own predictions as made "with other weights". It now finishes the rename and saves nothing."""
    from common.modeling import model_fingerprint

    data = write_data(tmp_path / "data", n_train=4)
    out = tmp_path / "out"
    args = train_args(tiny_text_model, data, out, "--max-steps", "2")
    killed = subprocess.run([sys.executable, "tests/launch_for_tests.py", "bootstrap.py", *args], cwd=REPO,
                            env={**env(), "APO_TEST_SIGKILL_BEFORE_RENAME": "training_summary.json"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = run_folder(out)
    assert (run_dir / "training_summary.json.tmp").is_file() and not (run_dir / "training_summary.json").exists()
    fingerprint = model_fingerprint(out)  # what evaluate.py ties predictions of this folder to
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and not p.name.startswith("training_")}

    result = run(args, timeout=300)
    assert "nothing to do" in result.stdout
    assert not (run_dir / "training_summary.json.tmp").exists()
    assert json.loads((run_dir / "training_summary.json").read_text())["steps"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()
            and not p.name.startswith("training_")} == stamps
    assert model_fingerprint(out) == fingerprint


def test_only_the_tied_head_warning_is_dropped():
    def record(names):
        return logging.makeLogRecord({"msg": f"Removed shared tensor {names} while saving. This should be OK, but "
                                             "check by verifying that you don't receive any warning while reloading"})

    assert not training.drop_tied_head_warning(record({"model.lm_head.weight"}))
    assert training.drop_tied_head_warning(record({"model.model.layers.0.mlp.up_proj.weight"}))
    assert training.drop_tied_head_warning(record({"model.lm_head.weight", "model.extra.weight"}))
    assert not training.drop_tied_head_warning(logging.makeLogRecord({"msg": "[RANK 1] Removed shared tensor "
                                                                             "{'model.lm_head.weight'} while saving."}))
    assert training.drop_tied_head_warning(logging.makeLogRecord({"msg": "another warning"}))
