"""Shared pytest fixtures: tiny real models built offline once per test session."""

import os

import pytest

import tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """Folder of a random tiny Qwen2 causal LM with a tokenizer trained on the spot."""
    return str(tiny_models.build_text_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


@pytest.fixture(scope="session")
def tiny_vl_model(tmp_path_factory):
    """Folder of a random tiny Qwen2.5-VL with its processor (image processor + tokenizer)."""
    return str(tiny_models.build_vl_model(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl"))


@pytest.fixture
def chat_server():
    """make(behave, models=(), tls=None) -> a loopback_servers.ChatServer, closed after the test."""
    from loopback_servers import ChatServer

    servers = []

    def make(behave, models=(), tls=None):
        servers.append(ChatServer(behave, models, tls))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="session")
def transformers_serve(tmp_path_factory):
    """One real `transformers serve` on loopback for every test module (loopback_servers.Serve); a
    test that kills it calls ensure_running() first, so the next test finds it up."""
    from loopback_servers import Serve, free_port

    server = Serve(free_port(), tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        server.start()
        yield server
    finally:
        server.kill()
        server.proxy.close()


@pytest.fixture
def small_disk(tmp_path):
    """run(size, script, env) -> CompletedProcess of a bash script that runs with a tmpfs of `size`
    (e.g. "640k") mounted at run.disk: a disk that really fills. The mount lives in a private user and
    mount namespace (unshare -rm), so it needs no root and goes away with the script; the script
    writes what the test reads back outside run.disk."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user namespaces) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()

    def run(size, script, env=None):
        script = f"set -e\nmount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))}\n{script}"
        return subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                              capture_output=True, text=True, timeout=600)

    run.disk = disk
    return run
