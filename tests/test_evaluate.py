"""Tests of evaluate.py: exact scores on hand-written records for both task kinds, tiny Qwen2 and
Qwen2.5-VL through the real CLI, SIGKILL then resume, two processes, bad input."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
from common.answers import FINDINGS, parse_answer, task_of
from common.modeling import model_fingerprint
from common.records import content_key
from tiny_models import build_scripted_model, write_test_image

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
GEN = ["--max-new-tokens", "24", "--batch-size", "3"]

# ---------------------------------------------------------------------------------------------
# Data: four presence and three change instances in the test split, two sources.
# Source B never answered p4 (missing) and A's p4 / B's c1 have no Answer line (unparsed).
PRESENCE = [  # id, labels, A's text, B's text
    ("p1", {"Cardiomegaly": 1}, "Answer: Cardiomegaly", "Reasoning.\nAnswer: Cardiomegaly, Edema"),
    ("p2", {"Pleural Effusion": 1, "Edema": 1}, "Answer: Pleural Effusion", "Answer: Pleural Effusion, Edema"),
    ("p3", {}, "Answer: No Finding", "Answer: Cardiomegaly"),
    ("p4", {"Cardiomegaly": 1, "Pleural Effusion": 1}, "I can't tell.", None),
]
CHANGE = [
    ("c1", {"Consolidation": "worsening", "Edema": "stable"},
     "Answer: Consolidation: worsening; Edema: improving", "no answer here"),
    ("c2", {"Consolidation": "improving"}, "Answer: Consolidation: improving", "Answer: Consolidation: improving"),
    ("c3", {"Pleural Effusion": "stable"}, "Answer: Pleural Effusion: worsening", "Answer: Pleural Effusion: stable"),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hand_written(path):
    records = []
    for rid, labels, a, b in PRESENCE + CHANGE:
        trajectories = [{"source": "A", "text": a}] + ([{"source": "B", "text": b}] if b else [])
        records.append({"id": rid, "split": "test", "prompt": f"Study {rid}: what do you see?", "labels": labels,
                        "trajectories": trajectories})
    # neither is scored: another split, and a test instance without labels
    records.insert(2, {"id": "t1", "split": "train", "prompt": "x", "labels": {"Edema": 1},
                       "trajectories": [{"source": "A", "text": "Answer: Edema"}]})
    records.append({"id": "u1", "split": "test", "prompt": "y", "trajectories": [{"source": "A", "text": "Answer: Edema"}]})
    return write_jsonl(path, records)


def run_cli(*args, launcher=(), env=None):
    return subprocess.run([sys.executable, *launcher, "evaluate.py", *map(str, args)], cwd=REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=900)


def lines(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def livelier(src, dst):
    """A copy of a tiny model with larger random weights: at the default init greedy decoding
    repeats one token (the text strips to ""), and equal empty texts would prove nothing."""
    import torch

    from common import modeling

    model = modeling.load_model(src)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 5 / p.shape[1] ** 0.5)
    model.save_pretrained(dst)
    modeling.load_processor(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def text_model(tiny_text_model, tmp_path_factory):
    return livelier(tiny_text_model, tmp_path_factory.mktemp("lively") / "qwen2")


@pytest.fixture(scope="module")
def text_run(text_model, tmp_path_factory):
    """One uninterrupted single-process run of two models (the same weights under two names)."""
    root = tmp_path_factory.mktemp("text_run")
    data = hand_written(root / "data.jsonl")
    command = ["--models", f"a={text_model}", f"b={text_model}", "--data", data, *GEN]
    result = run_cli(*command, "--out", root / "out")
    assert result.returncode == 0, result.stderr
    return {"command": command, "out": root / "out", "result": result}


# ---------------------------------------------------------------------------------------------
# Exact scores


def row(metrics, name):
    return next(r for r in metrics["rows"] if r["name"] == name)


def test_sources_only_exact_scores_both_tasks(tmp_path, capsys):
    data = hand_written(tmp_path / "data.jsonl")
    evaluate.main(["--sources-only", "--data", str(data), "--out", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["instances"] == 7 and metrics["unlabelled_skipped"] == 1
    assert metrics["tasks"] == {"presence": 4, "change": 3}
    assert [(r["name"], r["kind"]) for r in metrics["rows"]] == [("A", "source"), ("B", "source")]

    a, b = row(metrics, "A")["presence"], row(metrics, "B")["presence"]
    # A: p4 unparsed is wrong everywhere (3/4 on every finding); p2 misses Edema.
    assert {f: v["accuracy"] for f, v in a["per_finding"].items()} == {f: 0.5 if f == "Edema" else 0.75 for f in FINDINGS}
    assert a["per_finding"]["Cardiomegaly"] == {"accuracy": 0.75, "n": 4, "support": 2, "precision": 1.0,
                                                "recall": 0.5, "f1": pytest.approx(2 / 3)}
    assert a["per_finding"]["Edema"]["f1"] == 0.0 and a["per_finding"]["No Finding"]["f1"] == 1.0
    assert a["macro"] == {"accuracy": pytest.approx(10.25 / 14), "f1": pytest.approx(7 / 12)}
    assert (a["n"], a["unparsed"], a["missing"]) == (4, 1, 0)
    # B: over-calls Cardiomegaly on p3 and Edema on p1; never answered p4 (missing = unparsed).
    expected = {f: 0.75 for f in FINDINGS} | {"Cardiomegaly": 0.5, "Edema": 0.5, "No Finding": 0.5}
    assert {f: v["accuracy"] for f, v in b["per_finding"].items()} == expected
    assert b["per_finding"]["Cardiomegaly"]["precision"] == 0.5 and b["per_finding"]["Cardiomegaly"]["recall"] == 0.5
    assert b["per_finding"]["Edema"]["precision"] == 0.5 and b["per_finding"]["Edema"]["recall"] == 1.0
    assert b["macro"] == {"accuracy": pytest.approx(9.75 / 14), "f1": pytest.approx(11 / 24)}
    assert (b["n"], b["unparsed"], b["missing"]) == (4, 1, 1)

    a, b = row(metrics, "A")["change"], row(metrics, "B")["change"]
    assert a["per_finding"] == {"Consolidation": {"accuracy": 1.0, "n": 2}, "Pleural Effusion": {"accuracy": 0.0, "n": 1},
                                "Edema": {"accuracy": 0.0, "n": 1}}
    assert a["macro"] == {"accuracy": pytest.approx(1 / 3)} and a["unparsed"] == 0
    assert {f: v["accuracy"] for f, v in b["per_finding"].items()} == {"Consolidation": 0.5, "Pleural Effusion": 1.0,
                                                                       "Edema": 0.0}
    assert b["macro"] == {"accuracy": 0.5} and (b["unparsed"], b["missing"]) == (1, 0)

    table = (tmp_path / "out" / "table.md").read_text()
    assert "| A | source | " + " | ".join(["0.750"] * 3 + ["0.500"] + ["0.750"] * 10) + " | 0.732 | 0.583 | 1/4 |" in table
    assert "| | kind | Consolidation | Pleural Effusion | Edema | average | unparsed |" in table
    assert "| B | source | 0.500 | 1.000 | 0.000 | 0.500 | 1/3 |" in table
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
    out = capsys.readouterr().out
    assert table in out
    assert out.strip().splitlines()[-1].startswith(
        "evaluate: 7 test instances (4 presence, 3 change, 1 unlabelled skipped), 2 sources, 0 models;")


def test_split_flag_and_plot_skipped_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when absent
    data = hand_written(tmp_path / "data.jsonl")
    evaluate.main(["--sources-only", "--split", "train", "--data", str(data), "--out", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["instances"] == 1 and row(metrics, "A")["presence"]["macro"]["accuracy"] == 1.0
    assert not (tmp_path / "out" / "accuracy.png").exists()
    assert "note: matplotlib is not installed; accuracy.png skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Models through the real CLI


def test_text_models_cli(text_run, text_model):
    out = text_run["out"]
    preds = lines(out / "predictions.jsonl")
    ids = [r[0] for r in PRESENCE + CHANGE]
    assert [(p["model"], p["id"]) for p in preds] == [(m, i) for m in ("a", "b") for i in ids]
    assert all(p["text"] and p["answer"] == parse_answer(p["text"]) for p in preds)
    assert [p["text"] for p in preds[:7]] == [p["text"] for p in preds[7:]]  # same weights, greedy
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["name"], r["kind"]) for r in metrics["rows"]] == [("A", "source"), ("B", "source"), ("a", "model"),
                                                                  ("b", "model")]
    for task, group in (("presence", PRESENCE), ("change", CHANGE)):
        texts = {p["id"]: p for p in preds if p["model"] == "a"}
        unparsed = sum(texts[r[0]]["answer"] is None or task_of(texts[r[0]]["answer"]) != task for r in group)
        assert row(metrics, "a")[task]["unparsed"] == unparsed and row(metrics, "a")[task]["n"] == len(group)
        assert row(metrics, "a")[task] == row(metrics, "b")[task]
    assert row(metrics, "a")["path"] == str(text_model)
    manifest = json.loads((out / "models.json").read_text())
    assert manifest["a"] == {"path": str(text_model), "max_new_tokens": 24, "repetition_penalty": 1.0,
                             "fingerprint": model_fingerprint(text_model)}
    assert all(isinstance(p["ended"], bool) for p in preds)
    table = (out / "table.md").read_text()
    assert "| a | model | " in table and "| b | model | " in table and table in text_run["result"].stdout
    assert "14 answers generated, 0 reused" in text_run["result"].stdout.splitlines()[-1]
    assert "Traceback" not in text_run["result"].stderr


def test_sigkill_mid_generation_then_resume_equals_uninterrupted(text_run, tmp_path):
    out = tmp_path / "out"
    predictions = out / "predictions.jsonl"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "evaluate.py", *map(str, text_run["command"]), "--out", str(out)],
                                cwd=REPO, env=ENV, stdout=log, stderr=log)
        # kill at the first written answer: model a is mid-way and b not even loaded yet
        while proc.poll() is None and not (predictions.exists() and predictions.read_bytes().count(b"\n") >= 1):
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept = predictions.read_bytes()
    assert 1 <= kept.count(b"\n") < 14
    predictions.write_bytes(kept + b'{"id": "c2", "model": "a", "te')  # a torn write, as a kill mid-line leaves
    result = run_cli(*text_run["command"], "--out", out)
    assert result.returncode == 0, result.stderr
    done = kept.count(b"\n")
    assert f"{14 - done} answers generated, {done} reused" in result.stdout.splitlines()[-1]
    for name in ("predictions.jsonl", "metrics.json", "table.md", "models.json"):
        assert (out / name).read_bytes() == (text_run["out"] / name).read_bytes(), name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gather_each_prediction_once(text_run, tmp_path):
    # 7 instances on 2 processes with batches of 3: shards of 4 and 3, the second ends in an empty batch
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.15; --multi_gpu with ACCELERATE_USE_CPU
    # starts two that talk over gloo on the CPU.
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    result = run_cli(*text_run["command"], "--out", tmp_path / "out", launcher=launcher,
                     env=dict(ENV, ACCELERATE_USE_CPU="1"))
    assert result.returncode == 0, result.stderr
    preds = lines(tmp_path / "out" / "predictions.jsonl")
    assert sorted((p["model"], p["id"]) for p in preds) == sorted({(p["model"], p["id"]) for p in preds})
    assert len(preds) == 14
    for name in ("predictions.jsonl", "metrics.json", "table.md", "models.json"):
        assert (tmp_path / "out" / name).read_bytes() == (text_run["out"] / name).read_bytes(), name
    assert result.stdout.count("evaluate: 7 test instances") == 1  # one summary: the main process's


def test_vl_model_with_images_cli(tiny_vl_model, tmp_path):
    model = livelier(tiny_vl_model, tmp_path / "vl")
    (tmp_path / "img").mkdir()
    write_test_image(tmp_path / "img" / "a.png", seed=0)
    write_test_image(tmp_path / "img" / "b.png", seed=1)
    records = [
        {"id": "v1", "split": "test", "prompt": "Describe the image.", "images": ["img/a.png"],
         "labels": {"Edema": 1}, "trajectories": [{"source": "S", "text": "Answer: Edema"}]},
        {"id": "v2", "split": "test", "prompt": "Describe the image.", "images": ["img/b.png"],
         "labels": {}, "trajectories": [{"source": "S", "text": "Answer: Edema"}]},
        {"id": "v3", "split": "test", "prompt": "Compare the studies.", "images": ["img/a.png", "img/b.png"],
         "labels": {"Edema": "worsening"}, "trajectories": [{"source": "S", "text": "Answer: Edema: worsening"}]},
    ]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    result = run_cli("--models", model, "--data", data, "--out", tmp_path / "out", *GEN)
    assert result.returncode == 0, result.stderr
    preds = lines(tmp_path / "out" / "predictions.jsonl")
    assert [(p["model"], p["id"]) for p in preds] == [("vl", "v1"), ("vl", "v2"), ("vl", "v3")]  # folder name
    assert preds[0]["text"] and preds[0]["text"] != preds[1]["text"]  # same prompt, the image tells them apart
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    s = row(metrics, "S")
    assert s["presence"]["per_finding"]["Edema"]["accuracy"] == 0.5 and s["presence"]["unparsed"] == 0
    assert s["change"]["macro"]["accuracy"] == 1.0
    assert row(metrics, "vl")["presence"]["n"] == 2 and row(metrics, "vl")["change"]["n"] == 1


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 with file, line and field, before any model is loaded


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, tiny_text_model):
    data = hand_written(tmp_path / "data.jsonl")
    out = tmp_path / "out"

    train_only = write_jsonl(tmp_path / "train.jsonl", [{"id": "t", "split": "train", "prompt": "p", "labels": {}}])
    assert fails(capsys, "--sources-only", "--data", train_only, "--out", out) == (
        f"error: {train_only}: field 'split': no instances of split 'test' (choose another with --split)")

    unlabelled = write_jsonl(tmp_path / "nolabels.jsonl", [{"id": "t", "split": "test", "prompt": "p"}])
    assert "field 'labels': none of the 1 test instances has labels" in fails(
        capsys, "--sources-only", "--data", unlabelled, "--out", out)

    bad_labels = write_jsonl(tmp_path / "badlabels.jsonl", [{"id": "t", "split": "test", "prompt": "p", "labels": {}},
                                                            {"id": "u", "split": "test", "prompt": "p",
                                                             "labels": {"Cardiomegaly": -1}}])
    assert fails(capsys, "--sources-only", "--data", bad_labels, "--out", out).startswith(
        f"error: {bad_labels}:2: field 'labels': Cardiomegaly: presence value must be 0 or 1")

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(data.read_text().replace('"p2"', '"p2', 1))
    assert fails(capsys, "--sources-only", "--data", malformed, "--out", out).startswith(
        f"error: {malformed}:2: malformed JSON")

    assert fails(capsys, "--models", tmp_path / "nowhere", "--data", data, "--out", out) == (
        f"error: --models: {tmp_path / 'nowhere'}: no such model folder")
    assert fails(capsys, "--models", tmp_path, "--data", data, "--out", out) == (
        f"error: --models: {tmp_path}: no config.json (not a Hugging Face model folder)")
    assert "two models named 'm'" in fails(capsys, "--models", f"m={tiny_text_model}", f"m={tiny_text_model}",
                                           "--data", data, "--out", out)
    assert "model name(s) ['A'] are also source names" in fails(capsys, "--models", f"A={tiny_text_model}",
                                                                "--data", data, "--out", out)

    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"id": "a", "split": "test", "prompt": "p", "labels": {}}\n{"id": "b", "prompt": "\xff"}\n')
    assert fails(capsys, "--sources-only", "--data", not_utf8, "--out", out).startswith(
        f"error: {not_utf8}:2: not UTF-8 (invalid start byte")

    write_test_image(tmp_path / "x.png")
    with_image = write_jsonl(tmp_path / "img.jsonl", [{"id": "t", "split": "test", "prompt": "p", "images": ["x.png"],
                                                       "labels": {}}])
    assert "1 instances have images but model 'qwen2'" in fails(capsys, "--models", tiny_text_model,
                                                               "--data", with_image, "--out", out)
    missing_image = write_jsonl(tmp_path / "noimg.jsonl", [{"id": "t", "split": "test", "prompt": "p",
                                                            "images": ["gone.png"], "labels": {}}])
    assert "1: field 'images': no such image file" in fails(capsys, "--models", tiny_text_model,
                                                           "--data", missing_image, "--out", out)
    assert not out.exists()  # nothing was written by any of them


def test_predictions_of_other_weights_are_never_reused(text_run, tmp_path, capsys, tiny_text_model):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("predictions.jsonl", "models.json"):
        (out / name).write_bytes((text_run["out"] / name).read_bytes())
    data = text_run["command"][text_run["command"].index("--data") + 1]
    message = fails(capsys, "--models", f"a={tiny_text_model}", "--data", data, "--out", out, *GEN)
    assert message == (f"error: {out / 'predictions.jsonl'}: holds predictions of model 'a' made with other "
                       f"weights ({text_run['command'][1][2:]} when it ran); use another --out, rename the model "
                       "(NAME=DIR), or delete its lines")
    message = fails(capsys, "--models", text_run["command"][1], "--data", data, "--out", out, "--max-new-tokens", "9")
    assert "holds predictions of model 'a' made with --max-new-tokens 24;" in message
    message = fails(capsys, "--models", text_run["command"][1], "--data", data, "--out", out,
                    "--max-new-tokens", "24", "--repetition-penalty", "1.1")
    assert "holds predictions of model 'a' made with --repetition-penalty 1.0;" in message
    (out / "models.json").write_text("{")
    assert "models.json: corrupt" in fails(capsys, "--models", text_run["command"][1], "--data", data, "--out", out)


def test_model_scores_exact_with_a_scripted_model(tmp_path, capsys):
    """A model that answers "Answer: Edema" to everything: its row has numbers fixed by hand."""
    model = build_scripted_model(tmp_path / "scripted", "Answer: Edema")
    data = hand_written(tmp_path / "data.jsonl")
    evaluate.main(["--models", f"s={model}", "--data", str(data), "--out", str(tmp_path / "out"), *GEN])
    assert all(p["text"] == "Answer: Edema" for p in lines(tmp_path / "out" / "predictions.jsonl"))
    s = row(json.loads((tmp_path / "out" / "metrics.json").read_text()), "s")
    expected = {f: 1.0 for f in FINDINGS} | {"Edema": 0.25, "Cardiomegaly": 0.5, "Pleural Effusion": 0.5,
                                             "No Finding": 0.75}
    assert {f: v["accuracy"] for f, v in s["presence"]["per_finding"].items()} == expected
    edema = s["presence"]["per_finding"]["Edema"]
    assert (edema["precision"], edema["recall"], edema["f1"]) == (0.25, 1.0, pytest.approx(0.4))
    assert s["presence"]["macro"] == {"accuracy": pytest.approx(12 / 14), "f1": pytest.approx(0.1)}
    assert (s["presence"]["unparsed"], s["presence"]["missing"]) == (0, 0)
    # a presence answer to a change question is of the other task: unparsed, wrong everywhere
    assert s["change"]["unparsed"] == 3 and s["change"]["macro"]["accuracy"] == 0.0
    assert "| s | model | 1.000 | 0.500 | 1.000 | 0.250 |" in capsys.readouterr().out


def test_rerun_reuses_answers_and_keeps_other_models_lines(text_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("predictions.jsonl", "models.json"):
        (out / name).write_bytes((text_run["out"] / name).read_bytes())
    command = text_run["command"]
    # only model a this time: all its answers are there, so no model is even loaded
    evaluate.main([str(c) for c in command[:2] + command[3:]] + ["--out", str(out)])
    assert "0 answers generated, 7 reused" in capsys.readouterr().out.strip().splitlines()[-1]
    assert (out / "predictions.jsonl").read_bytes() == (text_run["out"] / "predictions.jsonl").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["rows"]] == ["A", "B", "a"]
    assert row(metrics, "a") == row(json.loads((text_run["out"] / "metrics.json").read_text()), "a")


def test_prompt_without_room_for_the_answer_names_its_line(tmp_path, capsys, tiny_text_model):
    """The tiny model has 4096 positions: a prompt that leaves no room for --max-new-tokens is a
    clear error on its own line, before anything is generated or written."""
    data = write_jsonl(tmp_path / "long.jsonl", [
        {"id": "short", "split": "test", "prompt": "p", "labels": {"Edema": 1}},
        {"id": "long", "split": "test", "prompt": "The cardiac silhouette is enlarged. " * 400, "labels": {"Edema": 1}}])
    message = fails(capsys, "--models", tiny_text_model, "--data", data, "--out", tmp_path / "out",
                    "--max-new-tokens", "64")
    assert message.startswith(f"error: {data}:2: field 'prompt': ")
    assert "exceed the model's 4096 positions" in message
    assert not (tmp_path / "out" / "predictions.jsonl").exists() or not (tmp_path / "out" / "predictions.jsonl").read_text()


def test_an_instance_edited_under_the_same_id_is_answered_again(text_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("predictions.jsonl", "models.json"):
        (out / name).write_bytes((text_run["out"] / name).read_bytes())
    data = hand_written(tmp_path / "data.jsonl")
    edited = lines(data)
    edited[1]["prompt"] = "Study p2, new film: what do you see?"  # p2, its id unchanged
    write_jsonl(data, edited)
    command = text_run["command"]
    model_a = command[1]
    evaluate.main(["--models", model_a, "--data", str(data), "--out", str(out), *GEN])
    assert "1 answers generated, 6 reused" in capsys.readouterr().out.strip().splitlines()[-1]
    preds = lines(out / "predictions.jsonl")
    p2 = [p for p in preds if p["id"] == "p2"]
    assert [p["model"] for p in p2] == ["a"] and p2[0]["h"] == content_key(edited[1])
    # model b's stale answer to the old p2 is gone; its other answers stay
    assert sorted(p["id"] for p in preds if p["model"] == "b") == ["c1", "c2", "c3", "p1", "p3", "p4"]


def test_out_a_model_folder_or_a_locked_out_is_refused(text_run, tmp_path, capsys, tiny_text_model):
    import fcntl

    data = text_run["command"][text_run["command"].index("--data") + 1]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in Path(tiny_text_model).iterdir())
    message = fails(capsys, "--models", f"m={tiny_text_model}", "--data", data, "--out", tiny_text_model, *GEN)
    assert message == f"error: {tiny_text_model}: is the model folder --models m {tiny_text_model}, which this stage " \
                      "reads; choose another output folder"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in Path(tiny_text_model).iterdir()) == before

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # what a running evaluate.py holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = fails(capsys, "--sources-only", "--data", data, "--out", out)
    assert "another evaluate.py is writing this output" in message and not (out / "metrics.json").exists()


def test_out_at_the_root_or_inside_a_model_folder_is_refused(tmp_path, capsys, tiny_text_model):
    """As root, `evaluate.py --sources-only --out /` wrote /.lock, /metrics.json, /table.md and
    /accuracy.png; --out / in collect, consensus and export was a ValueError traceback; apo and
    evaluate wrote inside the model folder they read (M/apo, M/eval). Each exits 2 with a message now."""
    import shutil

    import apo
    import bootstrap
    import collect
    import consensus
    from test_apo_stage import PREFERENCES

    data = hand_written(tmp_path / "data.jsonl")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCES)
    model = Path(shutil.copytree(tiny_text_model, tmp_path / "model"))
    root_before = {name: (Path("/") / name).exists() for name in (".lock", "metrics.json", "table.md", "accuracy.png")}

    def exits_2(main, *argv):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, (main.__module__, err)
        return err

    for main, argv in ((evaluate.main, ["--sources-only", "--data", data]),
                       (bootstrap.main, ["--model", model, "--data", data]),
                       (apo.main, ["--model", model, "--data", prefs])):
        assert "/: is the root of the file system; choose an output folder of its own" in exits_2(main, *argv, "--out", "/")
    for main, argv in ((collect.main, ["--data", data, "--sources", "sim:concise"]),
                       (consensus.main, ["--data", data, "--consensus", "vote"])):
        assert "/: names a folder, not a file" in exits_2(main, *argv, "--out", "/")
    assert {name: (Path("/") / name).exists() for name in root_before} == root_before

    before = sorted(p.name for p in model.iterdir())
    err = exits_2(apo.main, "--model", model, "--data", prefs, "--out", model / "apo")
    assert f"lies inside the model folder --model {model}, which this stage reads" in err
    err = exits_2(evaluate.main, "--models", model, "--data", data, "--out", model / "eval")
    assert f"lies inside the model folder --models model {model}" in err
    assert sorted(p.name for p in model.iterdir()) == before


def test_sources_only_without_trajectories_exits_2_and_writes_nothing(tmp_path, capsys):
    """It used to end in a matplotlib traceback, leaving an empty table.md."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": "p1", "split": "test", "prompt": "?", "labels": {"Edema": 1}}])
    assert fails(capsys, "--sources-only", "--data", data, "--out", tmp_path / "out") == (
        f"error: {data}: field 'trajectories': none of the 1 test instances has trajectories: --sources-only has "
        "nothing to score (give --models, or the file collect.py wrote)")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_at_the_picture_keeps_the_rest_and_the_rerun_writes_it(tmp_path, small_disk):
    """On a full disk savefig raised an OSError traceback and left a 0-byte accuracy.png. Now: exit 2
    naming the picture and the full disk, no partial file; with space the same command writes it."""
    import shlex

    data = hand_written(tmp_path / "data.jsonl")
    straight = tmp_path / "straight"
    assert run_cli("--sources-only", "--data", data, "--out", straight).returncode == 0
    out = small_disk.disk / "eval"
    command = shlex.join([sys.executable, "evaluate.py", "--sources-only", "--data", str(data), "--out", str(out)])
    host = shlex.quote(str(tmp_path))
    # 16 KiB: metrics.json (8 KiB in tmpfs pages) and table.md fit, the picture (~60 KiB) does not
    result = small_disk("16k", f"""
        {command} > {host}/first.out 2> {host}/first.err || echo $? > {host}/first.rc
        ls -a {shlex.quote(str(out))} > {host}/after-first.txt
        mount -o remount,size=4m {shlex.quote(str(small_disk.disk))}
        {command} > {host}/second.out 2> {host}/second.err
        cp -r {shlex.quote(str(out))} {host}/resumed
        """, env=ENV)
    assert result.returncode == 0, result.stderr + (tmp_path / "second.err").read_text()
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2" and "Traceback" not in err, err
    assert f"error: {out / 'accuracy.png'}: the disk is full (No space left on device)" in err
    assert (tmp_path / "after-first.txt").read_text().split() == [".", "..", ".lock", "metrics.json", "table.md"]
    for name in ("metrics.json", "table.md"):
        assert (tmp_path / "resumed" / name).read_bytes() == (straight / name).read_bytes()
    assert (tmp_path / "resumed" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
