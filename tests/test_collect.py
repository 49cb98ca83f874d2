"""collect.py and sources.py: real tiny models, a real `transformers serve` on loopback, small
stdlib HTTP servers that misbehave on purpose (429, 5xx, stalls, echoed keys; loopback_servers.py),
SIGKILL and resume, bad input, and the importers."""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import records
from common import simulator
from common import sources
import tiny_models
from loopback_servers import completion, free_port, loopback_certificate, server_env
from common.records import RecordError

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-test-9f8e7d6c5b4a-SECRET"


# ---------------------------------------------------------------------------------------------
# helpers


def run_collect(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "collect.py", *map(str, args)], cwd=REPO, env=env or server_env(),
                          capture_output=True, text=True, timeout=timeout)


def collect_in_process(capsys, *args):
    """collect.main in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    import collect

    try:
        code = collect.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def start_collect(*args, env=None):
    return subprocess.Popen([sys.executable, "collect.py", *map(str, args)], cwd=REPO, env=env or server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_foreground_job)


def as_foreground_job():
    """Ctrl-C reaches a stage run from a terminal. A shell starts a background job (`pytest &`,
    nohup, a CI runner) with SIGINT ignored, and its children inherit that, so the child is given the
    default disposition back: otherwise it would ignore the test's SIGINT, as it should in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def journal_of(out):
    return Path(str(out) + ".parts.jsonl")


def answered_lines(out):
    path = journal_of(out)
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}") and '"text"' in l]


def wait_for(predicate, what, limit=240.0):
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def text_rows(n, prefix="q", split="train"):
    return [{"id": f"{prefix}{i}", "split": split, "prompt": f"Question {i}: the costophrenic angle is blunted" + "!" * i}
            for i in range(n)]


def assert_no_secret(out, result):
    for text in (result.stdout, result.stderr):
        assert SECRET not in text
    for path in (Path(out), journal_of(out)):
        if path.exists():
            assert SECRET not in path.read_text()


# ---------------------------------------------------------------------------------------------
# source names


def test_parse_sources_names_urls_and_expansion():
    got = sources.parse_sources(["gpt5=openai:gpt-5-nano@https://api.openai.com/v1", "openai:org/model@rev",
                                 "hf:/models/a=b/", "sim:all", "my-conc=sim:concise"])
    assert [(s.name, s.kind, s.target, s.base_url) for s in got[:3]] == [
        ("gpt5", "openai", "gpt-5-nano", "https://api.openai.com/v1"),
        ("org/model@rev", "openai", "org/model@rev", None),
        ("/models/a=b", "hf", "/models/a=b/", None)]
    assert [s.name for s in got[3:]] == list(simulator.PROFILES) + ["my-conc"]
    assert got[-1].profile is simulator.PROFILES["concise"]


@pytest.mark.parametrize("specs, message", [
    (["hf:a", "hf:a"], "source name 'a' is used twice"),
    (["x=sim:concise", "x=openai:m"], "source name 'x' is used twice"),
    (["vllm:model"], "expected [name=]kind:target"),
    (["hf:"], "nothing after 'hf:'"),
    (["team=sim:all"], "cannot take one name"),
    (["sim:nosuch"], "unknown simulator profile 'nosuch'"),
])
def test_parse_sources_rejects(specs, message):
    with pytest.raises(sources.SourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sources.parse_sources(specs)


def test_help_documents_every_flag():
    import collect

    parser = collect.build_parser()
    # Flags that exist for the tests alone (--sim-delay) are hidden on purpose.
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    for action in shown:
        assert action.help and action.help.strip(), action.option_strings
    result = run_collect("--help")
    assert result.returncode == 0
    for action in shown:
        for flag in action.option_strings:
            assert flag in result.stdout
    assert "--sim-delay" not in result.stdout


# ---------------------------------------------------------------------------------------------
# sim: determinism, summary, resume


def test_sim_all_is_deterministic_and_matches_the_simulator(tmp_path):
    out1, out2 = tmp_path / "a" / "t.jsonl", tmp_path / "b" / "t.jsonl"
    r1 = run_collect("--sources", "sim:all", "--n-train", 24, "--n-test", 6, "--seed", 3, "--out", out1)
    r2 = run_collect("--sources", "sim:all", "--n-train", 24, "--n-test", 6, "--seed", 3, "--out", out2)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr
    assert out1.read_bytes() == out2.read_bytes()
    rows = read_jsonl(out1)
    instances = simulator.make_instances(24, 6, 3)
    assert [r["id"] for r in rows] == [r["id"] for r in instances]
    assert [r["split"] for r in rows] == ["train"] * 24 + ["test"] * 6
    for i, (row, inst) in enumerate(zip(rows, instances)):
        assert {k: v for k, v in row.items() if k != "trajectories"} == inst
        assert row["trajectories"] == [{"source": name, "text": simulator.simulate(p, inst, i / 29, 3)}
                                       for name, p in simulator.PROFILES.items()]
    # the summary names every source with its counts, and the drift columns
    assert "accuracy  first 1/3  last 1/3" in r1.stdout
    for name in simulator.PROFILES:
        assert any(line.split()[:3] == [name, "30", "0"] for line in r1.stdout.splitlines()), name
    assert "per-finding accuracy (presence, 30 labelled instances" in r1.stdout
    assert "210 answered this run, 0 resumed from the journal, 0 failed" in r1.stdout
    assert len(read_jsonl(journal_of(out1))) == 210
    # a finished command run again asks nothing and writes the same bytes
    before = out1.read_bytes()
    r3 = run_collect("--sources", "sim:all", "--n-train", 24, "--n-test", 6, "--seed", 3, "--out", out1)
    assert r3.returncode == 0 and "0 answered this run, 210 resumed from the journal" in r3.stdout
    assert out1.read_bytes() == before and len(read_jsonl(journal_of(out1))) == 210


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    args = ["--sources", "sim:concise", "sim:sudden", "--n-train", 16, "--n-test", 4, "--seed", 1]
    clean, killed = tmp_path / "clean" / "t.jsonl", tmp_path / "killed" / "t.jsonl"
    assert run_collect(*args, "--out", clean).returncode == 0
    proc = start_collect(*args, "--out", killed, "--sim-delay", 0.1)
    try:
        wait_for(lambda: len(answered_lines(killed)) >= 8, "8 journalled answers")
        # paused, so that it still runs (and holds its lock) however slowly the second one starts
        proc.send_signal(signal.SIGSTOP)
        # a second run on the same --out is refused while the first holds the lock
        second = run_collect(*args, "--out", killed)
        assert second.returncode == 2 and "another collect.py is writing" in second.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    done_before = answered_lines(killed)
    assert 8 <= len(done_before) < 40
    with open(journal_of(killed), "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"id": "sim1-p-train-00015", "source": "conc')
    resumed = run_collect(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{40 - len(done_before)} answered this run, {len(done_before)} resumed" in resumed.stdout
    assert killed.read_bytes() == clean.read_bytes()
    journal = read_jsonl(journal_of(killed))  # the torn line was cut, each pair is there once
    assert len(journal) == 40 and len({(l["id"], l["source"]) for l in journal}) == 40


def test_edited_instance_is_asked_again_and_given_trajectories_are_kept(tmp_path):
    instances = simulator.make_instances(5, 1, 0)
    instances[0]["trajectories"] = [{"source": "concise", "text": "given by the user\nAnswer: No Finding"}]
    data = write_jsonl(tmp_path / "data.jsonl", instances)
    out = tmp_path / "t.jsonl"
    first = run_collect("--data", data, "--sources", "sim:concise", "--out", out)
    assert first.returncode == 0 and "5 answered this run" in first.stdout
    assert read_jsonl(out)[0]["trajectories"] == instances[0]["trajectories"]
    instances[3]["prompt"] += " Also a small left pleural effusion."
    write_jsonl(data, instances)
    second = run_collect("--data", data, "--sources", "sim:concise", "--out", out)
    assert second.returncode == 0 and "1 answered this run, 4 resumed from the journal" in second.stdout
    rows = read_jsonl(out)
    assert rows[3]["prompt"].endswith("effusion.")
    assert rows[3]["trajectories"][0]["text"] == simulator.simulate(simulator.PROFILES["concise"], instances[3], 3 / 5, 0)


# ---------------------------------------------------------------------------------------------
# hf: tiny real models through the CLI


def expected_hf(model_dir, name, instances, data_file, seed, batch_size, max_new_tokens):
    """What collect must write: modeling.generate on each fixed batch, seeded per batch."""
    import torch

    from common import modeling

    processor, model = modeling.load_processor(model_dir), modeling.load_model(model_dir)
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (server_env)
    try:
        for batch in sources.fixed_batches(instances, batch_size):
            torch.manual_seed(sources.seed_for(seed, name, batch[0]["id"]))
            texts = modeling.generate(model, processor, batch, data_path=data_file, batch_size=len(batch),
                                      max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
            out.update({r["id"]: t for r, t in zip(batch, texts)})
    finally:
        torch.set_num_threads(threads)
    return out


def test_hf_vlm_with_images_matches_generate(tmp_path, tiny_vl_model):
    (tmp_path / "img").mkdir()
    tiny_models.write_test_image(tmp_path / "img" / "a.png", seed=1)
    tiny_models.write_test_image(tmp_path / "img" / "b.png", size=(80, 56), seed=2)
    rows = [{**r, "system": "Read the chest X-ray.", "images": ["img/a.png" if i % 2 else "img/b.png"]}
            for i, r in enumerate(text_rows(5))]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out" / "t.jsonl"
    result = run_collect("--data", data, "--sources", f"vl=hf:{tiny_vl_model}", "--temperature", 1,
                         "--max-new-tokens", 8, "--batch-size", 2, "--seed", 5, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr
    got = read_jsonl(out)
    assert [r["images"] for r in got] == [["../img/b.png"], ["../img/a.png"]] * 2 + [["../img/b.png"]]
    expected = expected_hf(tiny_vl_model, "vl", rows, data, seed=5, batch_size=2, max_new_tokens=8)
    assert all(expected.values())
    assert {r["id"]: r["trajectories"] for r in got} == {i: [{"source": "vl", "text": t}] for i, t in expected.items()}


def test_hf_text_model_sigkill_resume_is_byte_identical(tmp_path, tiny_text_model):
    rows = text_rows(20)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = ["--data", data, "--sources", f"txt=hf:{tiny_text_model}", "--temperature", 1, "--max-new-tokens", 16,
            "--batch-size", 2, "--seed", 7]
    killed = tmp_path / "killed.jsonl"
    proc = start_collect(*args, "--out", killed)
    try:
        wait_for(lambda: len(answered_lines(killed)) >= 2, "2 journalled answers (one batch)")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    assert len(answered_lines(killed)) < 20
    resumed = run_collect(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    # the bytes an uninterrupted run writes: each instance with generate's answer for its batch
    expected = expected_hf(tiny_text_model, "txt", rows, data, seed=7, batch_size=2, max_new_tokens=16)
    assert all(expected.values())
    clean = "".join(json.dumps({**r, "images": [], "trajectories": [{"source": "txt", "text": expected[r["id"]]}]},
                               ensure_ascii=False) + "\n" for r in rows)
    assert killed.read_text() == clean
    assert len(read_jsonl(journal_of(killed))) == 20


def test_hf_text_model_refuses_image_instances(tmp_path, tiny_text_model):
    tiny_models.write_test_image(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "prompt": "p", "images": ["a.png"]}])
    result = run_collect("--data", data, "--sources", f"hf:{tiny_text_model}", "--out", tmp_path / "t.jsonl")
    assert result.returncode == 2 and "is a text model but 1 instances have images" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# openai: a real `transformers serve` on loopback


def sampling_copy(src, dst):
    """The tiny models repeat a newline when greedy, and the server decodes greedily unless the
    model's generation config samples: a copy that samples (and never stops at once, which would
    be an empty answer) gives real text to check."""
    shutil.copytree(src, dst)
    config_file = Path(dst) / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_new_tokens=4)
    config_file.write_text(json.dumps(config))
    return str(dst)


@pytest.fixture(scope="module")
def sampling(tmp_path_factory, tiny_text_model, tiny_vl_model):
    """Sampling copies of the tiny models (sampling_copy), for the shared `transformers_serve`."""
    root = tmp_path_factory.mktemp("sampling")
    return {"text": sampling_copy(tiny_text_model, root / "text"), "vl": sampling_copy(tiny_vl_model, root / "vl")}


def test_openai_source_against_transformers_serve(tmp_path, transformers_serve, sampling):
    transformers_serve.ensure_running()
    (tmp_path / "img").mkdir()
    tiny_models.write_test_image(tmp_path / "img" / "x.png", seed=4)
    text_data = write_jsonl(tmp_path / "text.jsonl", text_rows(6))
    image_data = write_jsonl(tmp_path / "images.jsonl", [{**r, "images": ["img/x.png"], "system": "Be brief."}
                                                         for r in text_rows(3, prefix="im")])
    env = server_env(OPENAI_API_KEY=SECRET)
    for data, spec in ((text_data, f"tx=openai:{sampling['text']}@{transformers_serve.url}"),
                       (image_data, f"vl=openai:{sampling['vl']}@{transformers_serve.url}")):
        out = tmp_path / (data.stem + "-out.jsonl")
        result = run_collect("--data", data, "--sources", spec, "--max-new-tokens", 8, "--concurrency", 2,
                             "--out", out, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = read_jsonl(out)
        assert len(rows) == len(read_jsonl(data))
        name = spec.split("=")[0]
        assert all(len(r["trajectories"]) == 1 and r["trajectories"][0]["source"] == name
                   and r["trajectories"][0]["text"] for r in rows)
        assert_no_secret(out, result)


def test_transformers_serve_killed_and_restarted_mid_collection(tmp_path, transformers_serve, sampling):
    transformers_serve.ensure_running()
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(30))
    out = tmp_path / "t.jsonl"
    args = ["--data", data, "--sources", f"tx=openai:{sampling['text']}@{transformers_serve.url}",
            "--max-new-tokens", 8, "--concurrency", 1, "--max-retries", 12, "--backoff", 0.5, "--timeout", 60,
            "--out", out]
    proc = start_collect(*args)
    try:
        wait_for(lambda: len(answered_lines(out)) >= 3, "3 answers before the kill")
        transformers_serve.kill()
        before = answered_lines(out)
        assert len(before) < 30
        transformers_serve.start()  # collect keeps retrying with backoff meanwhile
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    after = answered_lines(out)
    assert after[: len(before)] == before  # nothing rewritten
    assert len(after) == 30 and len({l["id"] for l in after}) == 30  # each pair asked once
    rows = read_jsonl(out)
    assert [len(r["trajectories"]) for r in rows] == [1] * 30
    texts = {r["id"]: r["trajectories"][0]["text"] for r in rows}
    assert all(texts[l["id"]] == l["text"] for l in before)
    # the finished command again asks nothing: it succeeds with the server down
    transformers_serve.kill()
    again = run_collect(*args)
    assert again.returncode == 0 and "0 answered this run, 30 resumed from the journal" in again.stdout
    assert read_jsonl(out) == rows


# ---------------------------------------------------------------------------------------------
# openai: API faults from small real servers


def test_429_is_retried_and_the_key_is_sent_but_never_written(tmp_path, chat_server):
    def behave(prompt, n, body):
        if n == 1:
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0"}, 0
        return 200, completion(f"Reasoning about: {prompt}\nAnswer: No Finding"), {}, 0

    server = chat_server(behave)
    rows = text_rows(5)
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    result = run_collect("--data", data, "--sources", f"api=openai:model-x@{server.url}", "--max-retries", 2,
                         "--backoff", 0.01, "--temperature", 0.3, "--out", out, env=server_env(OPENAI_API_KEY=SECRET))
    assert result.returncode == 0, result.stderr
    assert [server.count(r["prompt"]) for r in rows] == [2] * 5
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    body = server.requests[0]["body"]
    assert body["model"] == "model-x" and body["temperature"] == 0.3
    assert "max_completion_tokens" not in body and "top_p" not in body  # only flags given are sent
    assert [r["trajectories"] for r in read_jsonl(out)] == [
        [{"source": "api", "text": f"Reasoning about: {r['prompt']}\nAnswer: No Finding"}] for r in rows]
    assert_no_secret(out, result)


def test_each_api_source_gets_its_own_key(tmp_path, chat_server, capsys, monkeypatch):
    server = chat_server(lambda prompt, n, body: (200, completion("Answer: No Finding"), {}, 0))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("APO_TEST_OTHER_KEY", "sk-other")
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(2))
    code, out, err = collect_in_process(capsys, "--data", data, "--sources", f"a=openai:m@{server.url}",
                                        f"b=openai:m@{server.url}", "--api-key-env", "OPENAI_API_KEY",
                                        "b=APO_TEST_OTHER_KEY", "--out", tmp_path / "t.jsonl")
    assert code == 0, err
    assert sorted(r["auth"] for r in server.requests) == sorted([f"Bearer {SECRET}"] * 2 + ["Bearer sk-other"] * 2)
    assert SECRET not in out + err


def test_ctrl_c_stops_at_once_and_the_same_command_continues(tmp_path):
    args = ["--sources", "sim:concise", "--n-train", 30, "--n-test", 0, "--out", tmp_path / "t.jsonl"]
    # 2 s an answer: the run lasts a minute, so the signal lands mid-run however slowly the test's own
    # process gets to send it on a loaded machine (the resumed run below has no delay)
    proc = start_collect(*args, "--sim-delay", 2.0)
    try:
        wait_for(lambda: len(answered_lines(tmp_path / "t.jsonl")) >= 2, "2 journalled answers")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted: finished answers are kept in" in stderr
    assert "Traceback" not in stderr
    done = len(answered_lines(tmp_path / "t.jsonl"))
    resumed = run_collect(*args)
    assert resumed.returncode == 0 and f"{30 - done} answered this run, {done} resumed" in resumed.stdout


# A journaled stage's body in a few lines: the output locked, a journal opened with a record in
# it, a request in flight (a thread that would hold a normal exit for a minute), then the fault.
JOURNALED_RUN = """
import argparse, os, signal, sys, threading, time
from common import records
from common.run import Run

out, fault = sys.argv[1], sys.argv[2]
with Run("collect", argparse.Namespace(out=out), journaled=True) as run:
    run.output(out)
    parts = run.journal(out + ".parts.jsonl", kept="finished answers")
    if fault != "before-open":
        parts.open().append({"id": "a", "text": "Answer: Edema"})
        threading.Thread(target=time.sleep, args=(60,)).start()
    if fault == "full-disk":
        raise records.DiskFull(parts.path, "the same command resumes after them")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)
"""


def test_a_journaled_run_stops_at_once_on_ctrl_c_and_a_full_disk_once_its_journal_is_open(tmp_path):
    """Run's own stop, without a stage around it: Ctrl-C exits 130 naming the journal and a full disk
    exits 2 with its message, both without waiting for the work in flight; before the journal is
    opened Ctrl-C is Python's KeyboardInterrupt (the run installs no signal handling)."""
    def journaled_run(fault):
        out = tmp_path / fault / "t.jsonl"
        out.parent.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", JOURNALED_RUN, str(out), fault], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=as_foreground_job)
        try:
            _, stderr = proc.communicate(timeout=30)  # well before the thread's minute is up
        finally:
            proc.kill()
        return proc.returncode, stderr, journal_of(out)

    code, err, journal = journaled_run("ctrl-c")
    assert code == 130 and "Traceback" not in err, err
    assert err == (f"\ninterrupted: finished answers are kept in {journal}; run the same command again to "
                   "continue\n")
    assert journal.read_text() == '{"id": "a", "text": "Answer: Edema"}\n'
    code, err, journal = journaled_run("full-disk")
    assert code == 2 and err == (f"error: {journal}: the disk is full (No space left on device) while writing this; "
                                 "nothing half-written was kept. Free some space and run again: the same command "
                                 "resumes after them\n")
    code, err, journal = journaled_run("before-open")
    assert code == -signal.SIGINT and "KeyboardInterrupt" in err and not journal.exists()


def test_stalled_requests_time_out_count_as_failures_and_are_retried_next_run(tmp_path, chat_server):
    stalled = {"on": True}

    def behave(prompt, n, body):
        return 200, completion(f"late answer to {prompt}"), {}, 3.0 if stalled["on"] else 0

    server = chat_server(behave)
    rows = text_rows(3)
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    args = ["--data", data, "--sources", f"slow=openai:m@{server.url}", "--timeout", 0.5, "--max-retries", 1,
            "--backoff", 0.01, "--out", out]
    first = run_collect(*args)
    assert first.returncode == 3, first.stderr
    assert [server.count(r["prompt"]) for r in rows] == [2] * 3
    assert "slow: 3 failed: timeout (after 2 attempts)" in first.stdout
    assert "0 answered this run, 0 resumed from the journal, 3 failed (run the same command again" in first.stdout
    assert any(line.split()[:3] == ["slow", "0", "3"] for line in first.stdout.splitlines())
    assert [r["trajectories"] for r in read_jsonl(out)] == [[]] * 3
    assert [l.get("error") for l in read_jsonl(journal_of(out))] == ["timeout (after 2 attempts)"] * 3
    stalled["on"] = False
    second = run_collect(*args)
    assert second.returncode == 0 and "3 answered this run" in second.stdout
    assert [r["trajectories"] for r in read_jsonl(out)] == [[{"source": "slow", "text": f"late answer to {r['prompt']}"}]
                                                          for r in rows]


def test_5xx_retried_4xx_not_and_echoed_keys_redacted(tmp_path, chat_server):
    def behave(prompt, n, body):
        if "0" in prompt.split(":")[0]:
            return 503, {"error": {"message": "overloaded"}}, {}, 0
        if "1" in prompt.split(":")[0]:
            return 400, {"error": {"message": "image too large"}}, {}, 0
        if "2" in prompt.split(":")[0]:
            return 401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}, {}, 0
        if "3" in prompt.split(":")[0]:
            return 200, completion("   "), {}, 0
        return 200, completion("fine\nAnswer: Edema"), {}, 0

    server = chat_server(behave)
    rows = text_rows(5)
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    result = run_collect("--data", data, "--sources", f"api=openai:m@{server.url}", f"dead=openai:m@{dead}",
                         "--max-retries", 2, "--backoff", 0.01, "--out", out, env=server_env(OPENAI_API_KEY=SECRET))
    assert result.returncode == 3
    assert [server.count(r["prompt"]) for r in rows] == [3, 1, 1, 1, 1]
    errors = {(l["id"], l["source"]): l.get("error") for l in read_jsonl(journal_of(out))}
    assert errors[("q0", "api")].startswith("HTTP 503: ") and errors[("q0", "api")].endswith("(after 3 attempts)")
    assert errors[("q1", "api")].startswith("HTTP 400: ") and "image too large" in errors[("q1", "api")]
    assert errors[("q2", "api")].startswith("HTTP 401: ") and "***" in errors[("q2", "api")]
    assert errors[("q3", "api")] == "empty answer (finish_reason=stop)"
    assert errors[("q4", "api")] is None
    assert all(errors[(r["id"], "dead")].startswith("connection error") and
               errors[(r["id"], "dead")].endswith("(after 3 attempts)") for r in rows)
    assert [r["trajectories"] for r in read_jsonl(out)] == [[]] * 4 + [[{"source": "api", "text": "fine\nAnswer: Edema"}]]
    assert_no_secret(out, result)


def key_of(prompt):
    return "q" + prompt.split(":")[0].split()[-1]


def test_malformed_200_bodies_fail_their_pair_and_later_sources_are_still_asked(tmp_path, chat_server, capsys):
    bodies = {"q0": (b"<html><body>Sign in to the hotel wifi</body></html>", "text/html"),
              "q1": (b'{"choices": [{"message": ', "application/json"),
              "q2": (b'{"choices": 5}', "application/json"),
              "q3": (b"[1, 2]", "application/json")}

    def behave(prompt, n, body):
        if body["model"] == "broken" and key_of(prompt) in bodies:
            data, kind = bodies[key_of(prompt)]
            return 200, data, {"Content-Type": kind}, 0
        return 200, completion(f"{body['model']} on {key_of(prompt)}\nAnswer: No Finding"), {}, 0

    server = chat_server(behave)
    rows = text_rows(5)
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    code, stdout, err = collect_in_process(capsys, "--data", data, "--sources", f"broken=openai:broken@{server.url}",
                                           f"fine=openai:fine@{server.url}", "--backoff", 0.01, "--out", out)
    assert code == 3, err
    assert "Traceback" not in err
    # not retried: the same body would come back
    assert [sum(r["prompt"] == row["prompt"] and r["body"]["model"] == "broken" for r in server.requests)
            for row in rows] == [1] * 5
    errors = {l["id"]: l.get("error") for l in read_jsonl(journal_of(out)) if l["source"] == "broken"}
    assert errors["q0"].startswith("malformed response: HTTP 200 with a body that is not JSON (text/html: "
                                   "'<html><body>Sign in to the hotel wifi</body></html>')")
    assert errors["q1"].startswith("malformed response: HTTP 200 with a body that is not JSON (application/json: ")
    assert errors["q2"] == "malformed response: no choices[0].message.content string in '{\"choices\": 5}'"
    assert errors["q3"] == "malformed response: no choices[0].message.content string in '[1, 2]'"
    assert errors["q4"] is None
    assert [[t["source"] for t in r["trajectories"]] for r in read_jsonl(out)] == [["fine"]] * 4 + [["broken", "fine"]]
    assert "  broken: 1 failed: malformed response: " in stdout


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_trickling_server_is_cut_at_the_total_deadline(tmp_path, chat_server, capsys, monkeypatch, scheme):
    tls = None
    if scheme == "https":  # TLS puts a socket of its own over the TCP one: the one to cut
        if shutil.which("openssl") is None:
            pytest.skip("needs the openssl tool to make a certificate")
        tls = loopback_certificate(tmp_path)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    server = chat_server(lambda prompt, n, body: (200, completion(f"slow answer to {key_of(prompt)}"), {}, 0),
                         tls=tls)
    server.trickle = 0.5  # one byte every 0.5 s: no single read ever waits as long as --timeout
    rows = text_rows(2)
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    args = ["--data", data, "--sources", f"slow=openai:m@{server.url}", "--timeout", 1.5, "--max-retries", 1,
            "--backoff", 0.01, "--out", out]
    import collect, openai  # noqa: E401, F401  (imported before the clock starts: they are slow on a busy machine)

    start = time.monotonic()
    code, stdout, err = collect_in_process(capsys, *args)
    elapsed = time.monotonic() - start
    assert code == 3, err
    # two attempts of 1.5 s each, in parallel for both instances; the whole response would take minutes
    assert 3.0 <= elapsed < 30.0, elapsed
    assert [server.count(r["prompt"]) for r in rows] == [2, 2]
    assert [l.get("error") for l in read_jsonl(journal_of(out))] == ["timeout (after 2 attempts)"] * 2
    assert "slow: 2 failed: timeout (after 2 attempts)" in stdout
    server.trickle = None
    code, stdout, err = collect_in_process(capsys, *args)
    assert code == 0 and "2 answered this run" in stdout, err
    assert [r["trajectories"][0]["text"] for r in read_jsonl(out)] == ["slow answer to q0", "slow answer to q1"]


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_is_never_followed(tmp_path, chat_server, capsys, status):
    elsewhere = chat_server(lambda prompt, n, body: (200, completion("Answer: No Finding"), {}, 0))
    target = f"{elsewhere.url}/chat/completions"
    server = chat_server(lambda prompt, n, body: (status, {}, {"Location": target}, 0))
    tiny_models.write_test_image(tmp_path / "xray.png")
    rows = [{**r, "images": ["xray.png"]} for r in text_rows(2)]
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    code, stdout, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}",
                                           "--backoff", 0.01, "--out", out)
    assert code == 3, err
    assert elsewhere.requests == []  # the body, image included, went nowhere else
    assert [server.count(r["prompt"]) for r in rows] == [1, 1]
    assert [l["error"] for l in read_jsonl(journal_of(out))] == [
        f"HTTP {status}: redirect to {target} not followed: a redirect would re-send the request, images included; "
        "give the final URL as the base URL"] * 2


def test_keys_are_redacted_before_errors_are_cut_and_in_answers(tmp_path, chat_server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def behave(prompt, n, body):
        i = int(key_of(prompt)[1:])
        if i < 12:  # the key at 12 offsets around the 300-character cut of an error message
            return 401, {"error": {"message": "x" * (220 + 7 * i) + f" key {SECRET} rejected"}}, {}, 0
        auth = next(r["auth"] for r in reversed(server.requests) if r["prompt"] == prompt)
        return 200, completion(f"The request carried Authorization: {auth}\nAnswer: No Finding"), {}, 0

    server = chat_server(behave)
    data, out = write_jsonl(tmp_path / "data.jsonl", text_rows(13)), tmp_path / "t.jsonl"
    code, stdout, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}",
                                           "--out", out)
    assert code == 3, err
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    errors = [l["error"] for l in read_jsonl(journal_of(out)) if "error" in l]
    assert len(errors) == 12 and all(e.startswith("HTTP 401: ") for e in errors)
    assert all("***" in e or e.endswith("…") for e in errors)
    assert read_jsonl(out)[12]["trajectories"] == [
        {"source": "api", "text": "The request carried Authorization: Bearer ***\nAnswer: No Finding"}]
    for text in (stdout, err, out.read_text(), journal_of(out).read_text()):
        assert not any(SECRET[:k] in text for k in range(6, len(SECRET) + 1))


def images_outside_setup(tmp_path):
    """A data folder with an image, a symlink to it, and four ways to reach a file outside it."""
    folder, outside = tmp_path / "study", tmp_path / "elsewhere"
    (folder / "img").mkdir(parents=True)
    outside.mkdir()
    tiny_models.write_test_image(folder / "img" / "a.png", seed=1)
    tiny_models.write_test_image(outside / "phi.png", seed=2)
    (folder / "img" / "alias.png").symlink_to(folder / "img" / "a.png")
    (folder / "img" / "leak.png").symlink_to(outside / "phi.png")
    (folder / "scans").symlink_to(outside, target_is_directory=True)
    ways = {"absolute": str(outside / "phi.png"), "dot-dot": "../elsewhere/phi.png", "symlink": "img/leak.png",
            "symlinked folder": "scans/phi.png"}
    return folder, (outside / "phi.png").resolve(), ways


def test_images_outside_the_data_folder_are_never_sent_unless_allowed(tmp_path, chat_server, capsys):
    folder, phi, ways = images_outside_setup(tmp_path)
    server = chat_server(lambda prompt, n, body: (200, completion("Answer: No Finding"), {}, 0))
    for way, image in ways.items():
        rows = [{"id": "in", "prompt": "p", "images": ["img/a.png", "img/alias.png"]},
                {"id": "out", "prompt": "q", "images": ["img/a.png", image]}]
        data = write_jsonl(folder / "data.jsonl", rows)
        out = tmp_path / way / "t.jsonl"
        code, _, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}",
                                          "--out", out)
        assert code == 2, way
        assert err.startswith(f"error: {data}:2: field 'images': {image!r} resolves to {phi}, outside the data "
                              f"file's folder {folder.resolve()}; ") and "--allow-outside-images" in err, err
        assert server.requests == [] and not journal_of(out).exists()
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}",
                                      "--allow-outside-images", "--out", tmp_path / "allowed.jsonl")
    assert code == 0, err
    sent = {r["prompt"]: [p["image_url"]["url"] for p in r["body"]["messages"][-1]["content"] if p["type"] == "image_url"]
            for r in server.requests}
    assert sent == {"p": [sources.image_data_url(folder / "img" / "a.png")] * 2,
                    "q": [sources.image_data_url(folder / "img" / "a.png"), sources.image_data_url(phi)]}


def test_an_image_link_changed_after_validation_is_checked_again_before_sending(tmp_path, chat_server):
    folder, phi, _ = images_outside_setup(tmp_path)
    server = chat_server(lambda prompt, n, body: (200, completion("Answer: No Finding"), {}, 0))
    data = write_jsonl(folder / "data.jsonl", [{"id": "a", "prompt": "p", "images": ["img/alias.png"]}])
    record = records.load_instances(data)[0]
    records.check_images_inside(record, data)  # inside when checked ...
    (folder / "img" / "alias.png").unlink()
    (folder / "img" / "alias.png").symlink_to(phi)  # ... outside when sent
    source = sources.parse_sources([f"api=openai:m@{server.url}"])[0]
    (rec_id, text, error), = sources.openai_answers(source, [record], data_path=data, max_retries=0)
    assert text is None and error.startswith(f"{data}:1: field 'images': 'img/alias.png' resolves to {phi}, outside")
    assert server.requests == []
    (rec_id, text, error), = sources.openai_answers(source, [record], data_path=data, allow_outside_images=True)
    assert (text, error) == ("Answer: No Finding", None) and len(server.requests) == 1


# ---------------------------------------------------------------------------------------------
# bad input: exit 2 naming file, line and field, before any source is asked


def _png_that_is_text(tmp):
    (tmp / "fake.png").write_text("not an image")
    return ["fake.png"]


BAD_INPUTS = {
    "malformed JSON": ([b'{"id": "a", "prompt": "p"}', b'{"id": "b", "prompt": '], 2, None, "malformed JSON"),
    "missing id": ([b'{"prompt": "p"}'], 1, "id", "missing"),
    "missing prompt": ([b'{"id": "a"}'], 1, "prompt", "missing"),
    "empty prompt": ([b'{"id": "a", "prompt": "  "}'], 1, "prompt", "empty"),
    "duplicate id": ([b'{"id": "a", "prompt": "p"}', b'{"id": "b", "prompt": "p"}', b'{"id": "a", "prompt": "q"}'],
                     3, "id", "duplicate id 'a' (first on line 1)"),
    "missing image": ([b'{"id": "a", "prompt": "p", "images": ["nowhere.png"]}'], 1, "images", "no such image file"),
    "not an image": ([b'{"id": "a", "prompt": "p", "images": ["fake.png"]}'], 1, "images", "not an image file"),
    "unknown split": ([b'{"id": "a", "prompt": "p", "split": "dev"}'], 1, "split", "unknown split 'dev'"),
    "non-UTF-8": ([b'{"id": "a", "prompt": "p"}', b'{"id": "b", "prompt": "\xff\xfe"}'], 2, None, "not UTF-8"),
    "bad labels": ([b'{"id": "a", "prompt": "p", "labels": {"Pleural Effusion": 2}}'], 1, "labels",
                   "presence value must be 0 or 1"),
    "unknown finding": ([b'{"id": "a", "prompt": "p", "labels": {"Edemaa": 1}}'], 1, "labels",
                        "unknown finding 'Edemaa'"),
    "NaN": ([b'{"id": "a", "prompt": "p"}', b'{"id": "b", "prompt": "p", "meta": {"age": NaN}}'], 2, "meta.age",
            "NaN is not valid JSON"),
    "a source twice": ([b'{"id": "a", "prompt": "p", "trajectories": [{"source": "s", "text": "x"}, '
                        b'{"source": "s", "text": "y"}]}'], 1, "trajectories[1].source", "duplicate source 's'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_any_source_is_asked(tmp_path, chat_server, capsys, case):
    lines, line, field, message = BAD_INPUTS[case]
    _png_that_is_text(tmp_path)
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    server = chat_server(lambda prompt, n, body: (200, completion("x"), {}, 0))
    out = tmp_path / "t.jsonl"
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}", "--out", out)
    assert code == 2
    where = f"{data}:{line}: " + (f"field '{field}': " if field else "")
    assert err.startswith(f"error: {where}") and message in err, err
    assert server.requests == [] and not out.exists() and not journal_of(out).exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": "\xff"}\n')
    result = run_collect("--data", data, "--sources", "sim:concise", "--out", tmp_path / "t.jsonl")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {data}:2: not UTF-8")
    assert "Traceback" not in result.stderr


def test_sim_source_needs_labels(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "p", "labels": {"No Finding": 1}},
                                                       {"id": "b", "prompt": "q", "labels": {}}])
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "sim:concise", "--out", tmp_path / "t.jsonl")
    assert code == 2 and err.startswith(f"error: {data}:2: field 'labels': missing or empty: sim: sources")


def test_bad_options_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    for args, message in ((["--sources", "hf:a", "hf:a"], "used twice"),
                          (["--sources", "x=sim:all"], "cannot take one name"),
                          (["--sources", "sim:concise", "--api-key-env", "nobody=KEY"], "no source is named 'nobody'"),
                          (["--sources", "openai:gpt-5-nano"], "no API key: set $OPENAI_API_KEY"),
                          (["--sources", "a=openai:m@http://127.0.0.1:9/v1", "--api-key-env", "a=APO_TEST_NO_SUCH_KEY"],
                           "no API key: set $APO_TEST_NO_SUCH_KEY")):
        code, _, err = collect_in_process(capsys, *args, "--n-train", 3, "--n-test", 0, "--out", tmp_path / "t.jsonl")
        assert code == 2 and message in err, (args, err)


# ---------------------------------------------------------------------------------------------
# importers


SWIFT_ROWS = [
    {"messages": [{"role": "system", "content": "You are a radiologist."},
                  {"role": "user", "content": "<image>Which findings are present?"},
                  {"role": "assistant", "content": "Consensus.\nAnswer: Pleural Effusion"}],
     "images": ["img/a.png"], "rejected_response": "Bad.\nAnswer: No Finding", "rejected_source": "gpt5"},
    {"messages": [{"role": "system", "content": "You are a radiologist."},
                  {"role": "user", "content": "<image>Which findings are present?"},
                  {"role": "assistant", "content": "Consensus.\nAnswer: Pleural Effusion"}],
     "images": ["img/a.png"], "rejected_response": "Other.\nAnswer: Edema", "rejected_source": "claude"},
    {"id": 7, "split": "test", "messages": [{"role": "user", "content": "Second?"}, {"role": "assistant", "content": "A2"}],
     "rejected_response": ["R1", "R2", "R1"]},
]


def swift_expected(first_id):
    return [
        {"id": first_id, "split": "train", "prompt": "Which findings are present?", "images": ["img/a.png"],
         "system": "You are a radiologist.",
         "trajectories": [{"source": "swift-chosen", "text": "Consensus.\nAnswer: Pleural Effusion"},
                          {"source": "gpt5", "text": "Bad.\nAnswer: No Finding"},
                          {"source": "claude", "text": "Other.\nAnswer: Edema"}]},
        {"id": "7", "split": "test", "prompt": "Second?", "images": [],
         "trajectories": [{"source": "swift-chosen", "text": "A2"}, {"source": "swift-rejected", "text": "R1"},
                          {"source": "swift-rejected-2", "text": "R2"}]},
    ]


def test_import_swift_jsonl_and_json_array(tmp_path):
    (tmp_path / "img").mkdir()
    tiny_models.write_test_image(tmp_path / "img" / "a.png")
    jsonl = write_jsonl(tmp_path / "dpo.jsonl", SWIFT_ROWS)
    array = tmp_path / "dpo.json"
    items = [json.dumps(r, indent=1) for r in SWIFT_ROWS]
    array.write_text("[\n" + ",\n".join(items) + "\n]\n")
    third_item_line = 2 + len(items[0].splitlines()) + len(items[1].splitlines())
    a, b = sources.import_swift(jsonl), sources.import_swift(array)
    assert a[0]["id"].startswith("imp-") and a[0]["id"] == b[0]["id"]
    assert [records.public(r) for r in a] == swift_expected(a[0]["id"]) == [records.public(r) for r in b]
    assert [r["_line"] for r in a] == [1, 3] and [r["_line"] for r in b] == [2, third_item_line]
    # the CLI: images made relative to the output's folder, a name for the chosen answers
    out = tmp_path / "out" / "t.jsonl"
    result = run_collect("--import-swift", jsonl, "--import-source", "consensus", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert rows[0]["images"] == ["../img/a.png"] and rows[1]["split"] == "test"
    assert [t["source"] for t in rows[0]["trajectories"]] == ["consensus", "gpt5", "claude"]


@pytest.mark.parametrize("row, line, field, message", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, 2, "messages", "no user turn"),
    ({"messages": [{"role": "user", "content": "q"}]}, 2, "response", "no trajectory"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "again"}]}, 2, "messages", "2 user turns"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "images": ["missing.png"]}, 2, "images",
     "no such image file"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "images": ["http://x/a.png"]}, 2, "images[0]",
     "is a URL"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "rejected_response": 3}, 2,
     "rejected_response", "must be a string or a list"),
])
def test_import_swift_errors_name_file_line_field(tmp_path, row, line, field, message):
    path = write_jsonl(tmp_path / "s.jsonl", [SWIFT_ROWS[2], row])
    with pytest.raises(RecordError) as e:
        sources.import_swift(path)
    assert str(e.value).startswith(f"{path}:{line}: field '{field}': ") and message in str(e.value)


def test_import_mapped_jsonl_groups_rows_and_scores_sources(tmp_path):
    (tmp_path / "img").mkdir()
    tiny_models.write_test_image(tmp_path / "img" / "a.png")
    pe, normal = {"Pleural Effusion": 1}, {}
    dump = write_jsonl(tmp_path / "cxrmax.jsonl", [
        {"study": {"id": "s1"}, "question": "Q1", "image": "img/a.png", "model": "gpt5", "gt": pe,
         "response": "Blunted angle.\nAnswer: Pleural Effusion"},
        {"study": {"id": "s1"}, "question": "Q1", "image": "img/a.png", "model": "claude", "gt": pe,
         "response": "Looks clear.\nAnswer: No Finding"},
        {"study": {"id": "s2"}, "question": "Q2", "image": "img/a.png", "model": "gpt5", "gt": normal,
         "response": "Answer: No Finding", "split": "test"},
        {"study": {"id": "s2"}, "question": "Q2", "image": "img/a.png", "model": "claude", "gt": normal,
         "response": "Answer: No Finding", "split": "test"},
    ])
    out = tmp_path / "out" / "t.jsonl"
    result = run_collect("--import-jsonl", dump, "--map",
                         "prompt=question,text=response,source=model,id=study.id,images=image,labels=gt,split=split",
                         "--out", out)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(out) == [
        {"id": "s1", "split": "train", "prompt": "Q1", "images": ["../img/a.png"], "labels": pe,
         "trajectories": [{"source": "gpt5", "text": "Blunted angle.\nAnswer: Pleural Effusion"},
                          {"source": "claude", "text": "Looks clear.\nAnswer: No Finding"}]},
        {"id": "s2", "split": "test", "prompt": "Q2", "images": ["../img/a.png"], "labels": normal,
         "trajectories": [{"source": "gpt5", "text": "Answer: No Finding"},
                          {"source": "claude", "text": "Answer: No Finding"}]}]
    # claude is wrong on Pleural Effusion and No Finding of s1: 26 of 28 finding calls, 13/14 macro
    lines = {l.split()[0]: l.split() for l in result.stdout.splitlines() if l.split()[:1] in (["gpt5"], ["claude"])}
    assert lines["gpt5"][:3] == ["gpt5", "2", "0"] and lines["gpt5"][4] == "1.000"
    assert lines["claude"][:3] == ["claude", "2", "0"] and lines["claude"][4] == f"{13 / 14:.3f}"


def test_import_mapped_errors(tmp_path):
    with pytest.raises(sources.SourceError, match="prompt and text must be mapped"):
        sources.parse_mapping("id=x")
    with pytest.raises(sources.SourceError, match="unknown field 'answer'"):
        sources.parse_mapping("prompt=q,text=r,answer=a")
    mapping = sources.parse_mapping("prompt=q,text=r,id=i,source=m")
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": 1, "q": "Q", "r": "R", "m": "a"}, {"i": 1, "q": "Q", "m": "b"}])
    with pytest.raises(RecordError, match=r"d.jsonl:2: field 'r': missing \(mapped to text\)"):
        sources.import_mapped(path, mapping)
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": 1, "q": "Q", "r": "R", "m": "a"}, {"i": 1, "q": "Q2", "r": "S", "m": "b"}])
    with pytest.raises(RecordError, match=r"d.jsonl:2: field 'prompt': differs from line 1"):
        sources.import_mapped(path, mapping)


# ---------------------------------------------------------------------------------------------
# resume tied to each source's settings; --out never over an input or a file of another tool


def labelled_rows(n):
    return [dict(r, labels={"Pleural Effusion": 1}) for r in text_rows(n)]


def test_a_rerun_with_other_source_settings_is_refused_before_any_source_is_asked(tmp_path, chat_server, capsys):
    data, out = write_jsonl(tmp_path / "data.jsonl", labelled_rows(4)), tmp_path / "t.jsonl"
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "x=sim:concise", "--out", out)
    assert code == 0, err
    before = out.read_bytes()
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "x=sim:concise", "--seed", 1, "--out", out)
    assert code == 2 and "was written with other settings for 'x' (seed: 0 -> 1)" in err
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "x=sim:refuser", "--out", out)
    assert code == 2 and "spec: 'sim:concise' -> 'sim:refuser'" in err and "give the source another NAME=" in err
    assert out.read_bytes() == before
    # another source beside it is fine: only a name's own settings are tied
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "x=sim:concise", "y=sim:refuser", "--out", out)
    assert code == 0, err
    assert [t["source"] for t in read_jsonl(out)[0]["trajectories"]] == ["x", "y"]

    server = chat_server(lambda prompt, n, body: (200, completion("Answer: No Finding"), {}, 0))
    api = ["--data", data, "--sources", f"api=openai:m@{server.url}", "--out", tmp_path / "api.jsonl"]
    assert collect_in_process(capsys, *api, "--temperature", 0.3, "--max-new-tokens", 64)[0] == 0
    asked = len(server.requests)
    code, _, err = collect_in_process(capsys, *api, "--temperature", 0.9, "--max-new-tokens", 64)
    assert code == 2 and "'temperature': 0.3" in err and "'temperature': 0.9" in err
    code, _, err = collect_in_process(capsys, *api, "--temperature", 0.3)
    assert code == 2 and "'max_completion_tokens': 64" in err
    assert len(server.requests) == asked  # refused before a single request


def test_out_over_an_input_or_a_file_of_another_tool_is_refused_untouched(tmp_path, capsys, tiny_text_model):
    data = write_jsonl(tmp_path / "data.jsonl", labelled_rows(2))
    before = data.read_bytes()
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "sim:concise", "--out", data)
    assert code == 2 and "is also the input --data" in err and data.read_bytes() == before

    weights = Path(tiny_text_model) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", "sim:concise", "--out", weights)
    assert code == 2 and "exists and was not written by collect.py" in err
    assert weights.stat().st_mtime_ns == stamp and not Path(f"{weights}.parts.jsonl").exists()
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", f"hf:{tiny_text_model}",
                                      "--out", Path(tiny_text_model) / "t.jsonl")
    assert code == 2 and "lies in the model folder --sources" in err


def test_a_full_disk_while_journalling_is_named_cut_clean_and_the_rerun_resumes(tmp_path, small_disk):
    """A real full disk (a 12 KiB tmpfs: the run manifest and 8 KiB of journal) used to end collect
    with a raw Errno 28 traceback and a torn journal line. Now: exit 2 naming the journal, the disk
    and the resume; the journal holds whole lines only; with space again the same command asks only
    the rest and writes what an uninterrupted run writes."""
    import shlex

    args = ["--sources", "sim:all", "--n-train", 40, "--n-test", 0, "--seed", 2]
    straight = tmp_path / "straight.jsonl"
    assert run_collect(*args, "--out", straight).returncode == 0
    out = small_disk.disk / "t.jsonl"
    command = shlex.join([sys.executable, "collect.py", *map(str, args), "--out", str(out)])
    host = shlex.quote(str(tmp_path))
    result = small_disk("12k", f"""
        {command} > {host}/first.out 2> {host}/first.err || echo $? > {host}/first.rc
        cp {shlex.quote(str(journal_of(out)))} {host}/journal-first.jsonl
        ls -a {shlex.quote(str(small_disk.disk))} > {host}/after-first.txt
        mount -o remount,size=4m {shlex.quote(str(small_disk.disk))}
        {command} > {host}/second.out 2> {host}/second.err
        cp {shlex.quote(str(out))} {host}/resumed.jsonl
        """, env=server_env())
    assert result.returncode == 0, result.stderr + (tmp_path / "second.err").read_text()
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2" and "Traceback" not in err, err
    assert (f"error: {journal_of(out)}: the disk is full (No space left on device) while writing this; nothing "
            "half-written was kept. Free some space and run again: the lines before this one are kept, and the same "
            "command resumes after them") in err
    journal = (tmp_path / "journal-first.jsonl").read_text()
    kept = [json.loads(line) for line in journal.splitlines()]  # whole lines only, each valid JSON
    assert journal.endswith("\n") and 4096 < len(journal) <= 8192 and all("text" in k for k in kept)
    assert (tmp_path / "after-first.txt").read_text().split() == [".", "..", "t.jsonl.lock", "t.jsonl.parts.jsonl",
                                                                  "t.jsonl.run.json"]
    assert f"{len(kept)} resumed from the journal" in (tmp_path / "second.out").read_text()
    assert (tmp_path / "resumed.jsonl").read_text() == straight.read_text()


def test_credentials_in_a_url_are_refused_unwritten_and_echoed_basic_credentials_redacted(tmp_path, chat_server,
                                                                                          capsys, monkeypatch):
    """user:password@ in a source URL used to be written into OUT.run.json and sent as Basic auth
    instead of the key; it is refused before anything is asked or written, the password nowhere."""
    password = "hunter2-password-0042"
    basic = __import__("base64").b64encode(f"alice:{password}".encode()).decode()

    def behave(prompt, n, body):  # a server (or proxy) that echoes Basic credentials into its answer
        return 200, completion(f"Basic anatomy is fine. Header: Authorization: Basic {basic}\nAnswer: No Finding"), {}, 0

    server = chat_server(behave)
    data, out = write_jsonl(tmp_path / "data.jsonl", text_rows(2)), tmp_path / "t.jsonl"
    url = server.url.replace("http://", f"http://alice:{password}@")
    code, stdout, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{url}", "--out", out)
    assert code == 2 and "may not hold credentials" in err and "http://***@127.0.0.1:" in err, err
    assert password not in stdout + err and server.requests == [] and list(tmp_path.iterdir()) == [data]
    monkeypatch.setenv("OPENAI_BASE_URL", url)  # the client's default endpoint is checked the same way
    code, stdout, err = collect_in_process(capsys, "--data", data, "--sources", "api=openai:m", "--out", out)
    assert code == 2 and password not in stdout + err and server.requests == []
    monkeypatch.delenv("OPENAI_BASE_URL")

    code, stdout, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}",
                                           "--out", out)
    assert code == 0, err
    texts = [t["text"] for r in read_jsonl(out) for t in r["trajectories"]]
    assert texts == ["Basic anatomy is fine. Header: Authorization: Basic ***\nAnswer: No Finding"] * 2
    for path in tmp_path.iterdir():
        assert basic not in path.read_text() and password not in path.read_text()


def test_lone_surrogates_are_refused_at_load_and_replaced_in_answers_without_asking_again(tmp_path, chat_server,
                                                                                         capsys):
    """A lone surrogate ("\\ud800") passed validation and crashed the final write, leaving *.tmp;
    one in a server's answer crashed the journal write on every run, asking again each time."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "half \\ud800 a pair"}\n')
    code, _, err = collect_in_process(capsys, "--data", bad, "--sources", "sim:concise", "--out", tmp_path / "o.jsonl")
    assert code == 2 and f"{bad}:2: field 'prompt': holds a lone surrogate '\\ud800'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]

    server = chat_server(lambda prompt, n, body: (200, completion("Answer: No Finding \ud83d cut"), {}, 0))
    data, out = write_jsonl(tmp_path / "data.jsonl", text_rows(3)), tmp_path / "t.jsonl"
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}", "--out", out)
    assert code == 0 and err.count("1 lone surrogate(s)") == 3, err
    assert [t["text"] for r in read_jsonl(out) for t in r["trajectories"]] == ["Answer: No Finding \ufffd cut"] * 3
    assert len(server.requests) == 3 and not Path(f"{out}.tmp").exists()
    code, _, err = collect_in_process(capsys, "--data", data, "--sources", f"api=openai:m@{server.url}", "--out", out)
    assert code == 0 and len(server.requests) == 3  # nothing asked again


class EndlessChunkedServer:
    """A hostile server on 127.0.0.1: a chat completion whose chunked body never ends (a JSON string
    that grows 64 KiB at a time until the client hangs up), counting what it sent."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests, self.sent = 0, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunks = [b'{"choices": [{"message": {"role": "assistant", "content": "'] + [b"x" * 65536] * 100000
                try:
                    for chunk in chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        owner.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_oversized_answer_is_cut_at_the_cap_counted_and_not_retried(tmp_path, chat_server):
    """A 100 MB answer used to be read whole into memory and written into the journal; an endless
    chunked one grew memory until --timeout. Now the body is cut at --max-response-mb: a failure
    (exit 3), asked once, nothing of it written; a Content-Length over the cap is refused unread."""
    endless = EndlessChunkedServer()
    big = chat_server(lambda prompt, n, body: (200, completion("y" * (3 << 20)), {}, 0))  # 3 MiB, Content-Length
    try:
        data, out = write_jsonl(tmp_path / "data.jsonl", text_rows(2)), tmp_path / "t.jsonl"
        result = run_collect("--data", data, "--sources", f"endless=openai:m@{endless.url}",
                             f"big=openai:m@{big.url}", "--max-response-mb", 1, "--backoff", 0.01, "--out", out)
        assert result.returncode == 3, result.stderr
        errors = [l["error"] for l in read_jsonl(journal_of(out))]
        assert errors == ["response too large: the body passed 1 MiB (--max-response-mb) and was not read further"] * 4
        assert endless.requests == 2 and len(big.requests) == 2  # not retried
        # the client stopped reading within a few socket buffers of the cap (the kernel buffers what
        # the server wrote before the client hung up: far less than the 6.5 GB it offered)
        assert endless.sent < 2 * (64 << 20)
        assert journal_of(out).stat().st_size < 4096 and "yyyy" not in out.read_text()
    finally:
        endless.close()
