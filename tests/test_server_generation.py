"""consensus.py and evaluate.py with --server: a real `transformers serve` on loopback against the
in-process model (same outputs), a server killed and restarted mid-run, and small stdlib servers
that stall, answer 5xx or serve another model."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import chat_client
import consensus
import evaluate
from common import modeling
import tiny_models
from loopback_servers import completion, server_env, varied_copy

REPO = Path(__file__).resolve().parent.parent
SOURCES = [("a", "The angle is blunted.\nAnswer: Pleural Effusion"), ("b", "Clear lungs.\nAnswer: No Finding"),
           ("c", "Big heart, fluid.\nAnswer: Cardiomegaly, Pleural Effusion")]


def instances(n, split="train", prefix="q", **extra):
    return [{"id": f"{prefix}{i}", "split": split, "prompt": f"Question {i}: is the angle blunted" + "?" * i,
             "images": [], "labels": {"Pleural Effusion": 1}, **extra,
             "trajectories": [{"source": s, "text": t + " " * (i % 2)} for s, t in SOURCES]} for i in range(n)]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_main(module, capsys, *args):
    """module.main in this process: (exit status, stdout, stderr)."""
    try:
        code = module.main([str(a) for a in args]) or 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def varied(tmp_path_factory, tiny_text_model, tiny_vl_model):
    """Tiny models whose greedy answers differ with every prompt and image (loopback_servers.varied_copy)."""
    root = tmp_path_factory.mktemp("varied")
    return {"text": varied_copy(tiny_text_model, root / "text"), "vl": varied_copy(tiny_vl_model, root / "vl")}


# ---------------------------------------------------------------------------------------------
# a real transformers serve: the same answers as the model loaded in-process


def test_evaluate_through_transformers_serve_equals_in_process(tmp_path, capsys, transformers_serve, varied):
    transformers_serve.ensure_running()
    (tmp_path / "img").mkdir()
    tiny_models.write_test_image(tmp_path / "img" / "x.png", seed=4)
    for kind, rows in (("text", instances(5, "test")),
                       ("vl", instances(2, "test", prefix="im", images=["img/x.png"], system="Be brief."))):
        data = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        model = varied[kind]
        common = ["--data", data, "--max-new-tokens", 12, "--batch-size", 4]
        code, _, err = run_main(evaluate, capsys, *common, "--models", f"m={model}", "--out", tmp_path / f"{kind}-here")
        assert code == 0, err
        code, out, err = run_main(evaluate, capsys, *common, "--models", f"m={model}@{transformers_serve.url}",
                                  "--concurrency", 2, "--out", tmp_path / f"{kind}-served")
        assert code == 0, err
        here = read_jsonl(tmp_path / f"{kind}-here" / "predictions.jsonl")
        served = read_jsonl(tmp_path / f"{kind}-served" / "predictions.jsonl")
        # bit-identical greedy text, and it depends on the prompt (and the image): no two alike
        assert served == here and len({p["text"] for p in here}) == len(rows) and all(p["text"] for p in here)
        manifest = json.loads((tmp_path / f"{kind}-served" / "models.json").read_text())["m"]
        assert manifest["generator"] == {"server": transformers_serve.url, "model": model}
        assert manifest["fingerprint"] == modeling.model_fingerprint(model)  # the same weights either way


def test_consensus_through_transformers_serve_equals_in_process(tmp_path, capsys, transformers_serve, varied):
    transformers_serve.ensure_running()
    data = write_jsonl(tmp_path / "d.jsonl", instances(4))
    args = consensus.parse_args(["--data", str(data), "--out", str(tmp_path / "unused.jsonl"), "--server",
                                 transformers_serve.url, "--model", varied["text"], "--max-new-tokens", "12"])
    served = consensus.served_model(args)
    assert served.name == varied["text"]
    processor = modeling.load_processor(varied["text"])
    rows = read_jsonl(data)
    prompts = {r["id"]: consensus.render_prompt(consensus.CONSENSUS_PROMPT, r["prompt"],
                                                [t["text"] for t in r["trajectories"]], "presence") for r in rows}
    got = {r["id"]: (answer, error) for r, answer, error in consensus.ask_server(args, served, rows, prompts)}
    model = modeling.load_model(varied["text"]).eval()
    texts, ended = modeling.generate(model, processor, rows, batch_size=4, max_new_tokens=12, return_ended=True,
                                     prompt_fn=lambda r: consensus.consensus_chat(r, prompts[r["id"]]))
    assert [got[r["id"]] for r in rows] == [((t, e), None) for t, e in zip(texts, ended)]
    assert len(set(texts)) == len(rows)
    # the stage end to end: both paths write the same preferences (these consensuses are no clean
    # answers, so every chosen is the vote's, counted by the same reason)
    outs = []
    for extra in ([], ["--server", transformers_serve.url]):
        out = tmp_path / f"p{len(outs)}.jsonl"
        code, stdout, err = run_main(consensus, capsys, "--model", varied["text"], "--data", data, "--out", out,
                                     "--max-new-tokens", 12, "--summary", str(out) + ".summary.json", *extra)
        assert code == 0, err
        outs.append(read_jsonl(out))
    assert outs[0] == outs[1] and all(p["consensus_by"].startswith("vote:") for p in outs[0])
    assert json.loads(Path(str(out) + ".summary.json").read_text())["generator"] == {
        "server": transformers_serve.url, "model": varied["text"]}


def test_server_killed_and_restarted_mid_consensus(tmp_path, transformers_serve, varied):
    transformers_serve.ensure_running()
    n = 12
    data, out = write_jsonl(tmp_path / "d.jsonl", instances(n)), tmp_path / "p.jsonl"
    command = [sys.executable, "consensus.py", "--server", transformers_serve.url, "--model", varied["text"],
               "--data", data, "--out", out, "--max-new-tokens", 48, "--concurrency", 1, "--max-retries", 12,
               "--backoff", 0.5, "--timeout", 120]
    proc = subprocess.Popen([str(c) for c in command], cwd=REPO, env=server_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and len(read_jsonl(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        transformers_serve.kill()
        time.sleep(1.0)  # an answer that arrived just before the kill is written by now
        before = {p["id"]: p for p in read_jsonl(out)}
        assert 3 <= len(before) < n
        received = transformers_serve.requests_received()
        transformers_serve.start()  # consensus.py keeps retrying with backoff meanwhile
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    after = read_jsonl(out)
    assert sorted(p["id"] for p in after) == sorted(f"q{i}" for i in range(n))  # each once, in input order
    assert [p["id"] for p in after] == [f"q{i}" for i in range(n)]
    assert all(p == before[p["id"]] for p in after if p["id"] in before)  # nothing written before is lost
    # the restarted server was asked exactly the instances not written yet (the one in flight at
    # the kill among them): nothing answered was asked twice
    assert transformers_serve.requests_received() - received == n - len(before)


# ---------------------------------------------------------------------------------------------
# small stdlib servers: stalls and 5xx are retried and counted, another model is refused


def test_stall_and_5xx_are_retried_counted_and_asked_again_next_run(tmp_path, capsys, chat_server, tiny_text_model):
    healed = {"on": False}

    def behave(prompt, n, body):
        if not healed["on"] and "Question 1:" in prompt:
            return 200, completion("late\nAnswer: Edema"), {}, 6.0  # past --timeout
        if not healed["on"] and ("Question 2:" in prompt or "Question 3" in prompt):
            return 503, {"error": {"message": "overloaded"}}, {}, 0
        return 200, completion("Is the angle blunted? It is.\nAnswer: Pleural Effusion"), {}, 0  # quotes the prompt

    server = chat_server(behave, models=[{"id": "boot", "root": tiny_text_model, "max_model_len": 2048}])
    rows = instances(5)
    for r in rows:
        r["system"] = "You are a radiologist."
    data, out = write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "p.jsonl"
    # a --timeout of seconds, not less: on a loaded machine a prompt 503 must not be read as a stall
    args = ["--server", server.url, "--model", tiny_text_model, "--data", data, "--out", out, "--timeout", 2,
            "--max-retries", 1, "--backoff", 0.01, "--max-new-tokens", 64, "--summary", tmp_path / "s.json"]
    code, stdout, _ = run_main(consensus, capsys, *args)
    assert code == 3
    assert "3 failed (run the same command again" in stdout
    assert "  1 failed: timeout (after 2 attempts)" in stdout
    assert "  2 failed: HTTP 503: " in stdout and "overloaded (after 2 attempts)" in stdout
    asked = {i: sum(f"Question {i}:" in r["prompt"] for r in server.requests) for i in range(5)}
    assert asked == {0: 1, 1: 2, 2: 2, 3: 2, 4: 1}
    assert [p["id"] for p in read_jsonl(out)] == ["q0", "q4"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["failed"] == 3 and summary["generator"] == {"server": server.url, "model": "boot",
                                                               "root": tiny_text_model}
    body = server.requests[0]["body"]  # the sampling flags as fields, the model under the server's name
    assert {k: body[k] for k in ("model", "temperature", "max_completion_tokens")} == {
        "model": "boot", "temperature": 0.0, "max_completion_tokens": 64}
    assert "top_p" not in body and "seed" not in body  # greedy
    record = next(r for r in rows if r["prompt"] in json.dumps(body["messages"]))
    assert body["messages"][0] == {"role": "system", "content": "You are a radiologist."}
    assert body["messages"][1]["content"].startswith("Several assistants answered the question below")
    assert record["trajectories"][1]["text"].strip() in body["messages"][1]["content"]
    healed["on"] = True
    code, stdout, _ = run_main(consensus, capsys, *args)
    assert code == 0
    asked_again = {i: sum(f"Question {i}:" in r["prompt"] for r in server.requests) - asked[i] for i in range(5)}
    assert asked_again == {0: 0, 1: 1, 2: 1, 3: 1, 4: 0}
    prefs = read_jsonl(out)
    assert [p["id"] for p in prefs] == [f"q{i}" for i in range(5)]
    assert {p["chosen"] for p in prefs} == {"Is the angle blunted? It is.\nAnswer: Pleural Effusion"}
    assert {p["consensus_by"] for p in prefs} == {"model"}


def test_evaluate_stall_is_retried_counted_and_asked_again(tmp_path, capsys, chat_server, tiny_text_model):
    healed = {"on": False}

    def behave(prompt, n, body):
        if not healed["on"] and "Question 0:" in prompt:
            return 200, completion("late"), {}, 6.0
        return 200, completion("Answer: Pleural Effusion"), {}, 0

    server = chat_server(behave, models=[{"id": tiny_text_model, "root": tiny_text_model}])
    data = write_jsonl(tmp_path / "d.jsonl", instances(3, "test"))
    args = ["--models", f"m={tiny_text_model}", "--server", server.url, "--data", data, "--out", tmp_path / "e",
            "--timeout", 2, "--max-retries", 1, "--backoff", 0.01]
    code, stdout, _ = run_main(evaluate, capsys, *args)
    assert code == 3 and "  1 failed: timeout (after 2 attempts)" in stdout
    assert sorted(p["id"] for p in read_jsonl(tmp_path / "e" / "predictions.jsonl")) == ["q1", "q2"]
    assert sum("Question 0:" in r["prompt"] for r in server.requests) == 2
    healed["on"] = True
    code, stdout, _ = run_main(evaluate, capsys, *args)
    assert code == 0 and "1 answers generated, 2 reused" in stdout
    assert len(server.requests) == 5
    assert [p["id"] for p in read_jsonl(tmp_path / "e" / "predictions.jsonl")] == ["q0", "q1", "q2"]


def test_a_server_serving_another_model_is_refused(tmp_path, capsys, chat_server, tiny_text_model):
    server = chat_server(lambda prompt, n, body: (200, completion("Answer: Edema"), {}, 0),
                         models=[{"id": "other", "root": "/models/other"}])
    data = write_jsonl(tmp_path / "d.jsonl", instances(2))
    code, _, err = run_main(consensus, capsys, "--server", server.url, "--model", tiny_text_model, "--data", data,
                            "--out", tmp_path / "p.jsonl")
    assert code == 2 and f"--server {server.url} serves 'other' (loaded from /models/other), not {tiny_text_model}" in err
    test_data = write_jsonl(tmp_path / "t.jsonl", instances(2, "test"))
    code, _, err = run_main(evaluate, capsys, "--models", f"{tiny_text_model}@{server.url}", "--data", test_data,
                            "--out", tmp_path / "e")
    assert code == 2 and "serves 'other'" in err
    assert server.requests == [] and not (tmp_path / "p.jsonl").exists() and not (tmp_path / "e").exists()


def test_served_model_resolution(chat_server, tiny_text_model):
    cases = [([{"id": "boot", "root": tiny_text_model}], tiny_text_model, None, "boot"),  # vLLM --served-model-name
             ([{"id": tiny_text_model}], None, None, tiny_text_model),  # a pinned server: its one model
             ([], tiny_text_model, None, tiny_text_model),  # an unpinned transformers serve loads what it is asked
             ([{"id": "a", "root": "/a"}, {"id": "b", "root": "/b"}], None, "b", "b")]
    for models, want, name, expected in cases:
        server = chat_server(lambda prompt, n, body: (200, completion("x"), {}, 0), models=models)
        client = chat_client.make_client(server.url)
        assert chat_client.served_model(client, server.url, want, name).name == expected
        client.close()
    server = chat_server(lambda prompt, n, body: (200, completion("x"), {}, 0),
                         models=[{"id": "a", "root": "/a"}, {"id": "b", "root": "/b"}])
    with pytest.raises(chat_client.ServerError, match="lists 'a', 'b': name the model to ask for with --served-model"):
        chat_client.served_model(chat_client.make_client(server.url), server.url)


def test_server_urls_with_credentials_are_refused_and_lone_surrogates_in_answers_kept(tmp_path, capsys, chat_server,
                                                                                   tiny_text_model):
    """consensus/evaluate --server: user:password@ used to be written into the summary and
    models.json and sent as Basic auth; a lone surrogate in an answer crashed the write on every run."""
    reply = "Is the angle blunted? Fluid \ud83d cut.\nAnswer: Pleural Effusion"  # quotes its prompt
    server = chat_server(lambda prompt, n, body: (200, completion(reply), {}, 0),
                         models=[{"id": tiny_text_model, "root": tiny_text_model, "max_model_len": 2048}])
    password = "hunter2-password-0042"
    secret_url = server.url.replace("http://", f"http://bob:{password}@")
    data, test_data = write_jsonl(tmp_path / "d.jsonl", instances(2)), write_jsonl(tmp_path / "t.jsonl", instances(2, "test"))
    code, out, err = run_main(consensus, capsys, "--server", secret_url, "--model", tiny_text_model, "--data", data,
                              "--out", tmp_path / "p.jsonl", "--summary", tmp_path / "s.json")
    assert code == 2 and "may not hold credentials" in err and password not in out + err
    code, out, err = run_main(evaluate, capsys, "--models", f"m={tiny_text_model}@{secret_url}", "--data", test_data,
                              "--out", tmp_path / "e")
    assert code == 2 and "may not hold credentials" in err and password not in out + err
    assert server.requests == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "t.jsonl"]

    args = ["--server", server.url, "--model", tiny_text_model, "--data", data, "--out", tmp_path / "p.jsonl",
            "--max-new-tokens", 16]
    code, _, err = run_main(consensus, capsys, *args)
    assert code == 0 and err.count("1 lone surrogate(s)") == 2, err
    assert {p["chosen"] for p in read_jsonl(tmp_path / "p.jsonl")} == {"Is the angle blunted? Fluid \ufffd cut.\nAnswer: Pleural Effusion"}
    eval_args = ["--models", f"m={tiny_text_model}", "--server", server.url, "--data", test_data, "--out", tmp_path / "e"]
    code, out, err = run_main(evaluate, capsys, *eval_args)
    assert code == 0 and "2 answers generated" in out, err
    asked = len(server.requests)
    assert run_main(consensus, capsys, *args)[0] == 0 and run_main(evaluate, capsys, *eval_args)[0] == 0
    assert len(server.requests) == asked  # what was answered is never asked again


def test_outside_images_are_sent_to_a_server_only_with_the_flag_the_message_names(tmp_path, capsys, chat_server):
    """consensus/evaluate --server told the user to "pass --allow-outside-images", a flag neither had."""
    (tmp_path / "study").mkdir()
    tiny_models.write_test_image(tmp_path / "study" / "in.png", seed=1)
    tiny_models.write_test_image(tmp_path / "phi.png", seed=2)
    server = chat_server(lambda prompt, n, body: (200, completion("Answer: Pleural Effusion"), {}, 0),
                         models=[{"id": "served-vl"}])
    rows = [dict(r, images=["in.png" if i == 0 else "../phi.png"]) for i, r in enumerate(instances(2, "test"))]
    data = write_jsonl(tmp_path / "study" / "t.jsonl", rows)
    args = ["--models", f"m=served-vl@{server.url}", "--data", data, "--out", tmp_path / "e", "--max-retries", 0]
    code, out, _ = run_main(evaluate, capsys, *args)
    assert code == 3 and "--allow-outside-images" in out and len(server.requests) == 1, out
    code, out, err = run_main(evaluate, capsys, *args, "--allow-outside-images")
    assert code == 0 and "1 answers generated, 1 reused" in out, out + err
    sent = [p["image_url"]["url"] for p in server.requests[-1]["body"]["messages"][-1]["content"]
            if p["type"] == "image_url"]
    assert sent == [chat_client.image_data_url(tmp_path / "phi.png")]
    assert consensus.parse_args(["--data", str(data), "--out", str(tmp_path / "p.jsonl"), "--server", server.url,
                                 "--allow-outside-images"]).allow_outside_images  # consensus --server takes it too


# ---------------------------------------------------------------------------------------------
# Ctrl-C with requests in flight


def start_stage(stage, *args):
    """A stage as a terminal's foreground job runs it, SIGINT at its default (test_collect.as_foreground_job)."""
    return subprocess.Popen([sys.executable, f"{stage}.py", *map(str, args)], cwd=REPO, env=server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("stage", ["consensus", "evaluate"])
def test_ctrl_c_with_requests_in_flight_stops_at_once_and_the_same_command_continues(stage, tmp_path, chat_server,
                                                                                     tiny_text_model):
    """As collect.py's: Ctrl-C exits 130 at once, naming what is kept, though two requests are still
    in flight for 45 s (a normal exit waits for them); the same command then asks only the rest."""
    slow = {"on": True}

    def behave(prompt, n, body):
        late = slow["on"] and not ("Question 0:" in prompt or "Question 1:" in prompt)
        return 200, completion("Reasoning.\nAnswer: Pleural Effusion"), {}, 45.0 if late else 0

    server = chat_server(behave, models=[{"id": tiny_text_model, "root": tiny_text_model}])
    n = 6
    if stage == "consensus":
        data, out = write_jsonl(tmp_path / "d.jsonl", instances(n)), tmp_path / "p.jsonl"
        args, written = ["--model", tiny_text_model, "--out", out], out
    else:
        data, out = write_jsonl(tmp_path / "d.jsonl", instances(n, "test")), tmp_path / "e"
        args, written = ["--models", f"m={tiny_text_model}", "--out", out], out / "predictions.jsonl"
    args += ["--server", server.url, "--data", data, "--concurrency", 2, "--timeout", 120]
    proc = start_stage(stage, *args)
    try:
        deadline = time.monotonic() + 240
        while not (written.exists() and len(read_jsonl(written)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        while len(server.requests) < 4:  # the next two are in flight
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)  # well before the requests in flight are answered
    finally:
        proc.kill()
    assert proc.returncode == 130 and f"interrupted: finished {'preferences' if stage == 'consensus' else 'predictions'} " \
                                      f"are kept in {written}" in stderr, stderr
    assert "Traceback" not in stderr
    assert sorted(r["id"] for r in read_jsonl(written)) == ["q0", "q1"]
    slow["on"] = False
    asked = len(server.requests)
    resumed = subprocess.run([sys.executable, f"{stage}.py", *map(str, args)], cwd=REPO, env=server_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["id"] for r in read_jsonl(written)] == [f"q{i}" for i in range(n)]
    assert len(server.requests) - asked == n - 2  # nothing kept was asked again
