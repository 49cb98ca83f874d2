"""Real servers on 127.0.0.1 for the tests of every stage that asks one (collect.py's `openai:`
sources, the --server of consensus.py and evaluate.py): a real `transformers serve` process, and a
small stdlib HTTP server that speaks just enough of the OpenAI API to misbehave on purpose (429,
5xx, stalls, echoed keys, bodies that are not JSON, responses trickled a byte at a time, over HTTP or
HTTPS)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def server_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    # One thread: these models are tiny, and on shared cores two threads only wait on each other.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion(text, model="m"):
    return {"id": "c", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def prompt_of(body):
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def send(handler, status, data, headers):
    """One whole HTTP response from a BaseHTTPRequestHandler; a client that hung up is no error."""
    try:
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def loopback_certificate(folder):
    """A self-signed certificate for 127.0.0.1 (cert file, key file), made by the openssl tool: the
    `tls` of a ChatServer, and the SSL_CERT_FILE of the client that trusts it."""
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class ChatServer:
    """A real HTTP server on 127.0.0.1 that speaks just enough of /v1/chat/completions.

    behave(prompt, n, body) -> (status, payload, headers, delay) decides each answer; n counts the
    requests seen for that prompt so far (1 for the first). A payload of bytes is sent as it is
    (an HTML page, broken JSON), with the Content-Type of `headers` if it names one. GET /v1/models
    lists `models`, each {"id", "root"?, "max_model_len"?} as vLLM lists them. With `trickle` set
    (an attribute, changed at will), the whole response, status line and headers included, goes out
    one byte every `trickle` seconds. With `tls` (cert file, key file; see loopback_certificate) it
    speaks HTTPS.
    """

    def __init__(self, behave, models=(), tls=None):
        self.behave, self.models, self.requests, self.lock = behave, list(models), [], threading.Lock()
        self.trickle = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self.reply(200, {"object": "list", "data": [{"object": "model", "created": 0, "owned_by": "test",
                                                                 **m} for m in server.models]}, {})
                else:
                    self.reply(404, {"error": {"message": "not found"}}, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = prompt_of(body)
                with server.lock:
                    server.requests.append({"prompt": prompt, "auth": self.headers.get("Authorization"), "body": body})
                    n = sum(r["prompt"] == prompt for r in server.requests)
                status, payload, headers, delay = server.behave(prompt, n, body)
                if delay:
                    time.sleep(delay)
                self.reply(status, payload, headers)

            def reply(self, status, payload, headers):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                headers = {"Content-Type": "application/json", **headers, "Content-Length": str(len(data))}
                if not server.trickle:
                    return send(self, status, data, headers)
                head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                try:
                    for byte in (head + "\r\n").encode() + data:
                        self.wfile.write(bytes([byte]))
                        time.sleep(server.trickle)
                except OSError:  # the client hung up mid-trickle (a plain socket's or a TLS one's error)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def count(self, prompt):
        return sum(r["prompt"] == prompt for r in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class CountingProxy:
    """A pass-through HTTP proxy on 127.0.0.1 that counts the chat requests its backend took.

    Tests count requests here, at a layer they own, not from a server's log lines (which change
    between releases). A request counts once the backend accepted its connection, as a server's own
    count would: one refused while the backend is down is answered 502 and not counted; one in
    flight when the backend dies was received and counts."""

    def __init__(self, backend_port):
        self.received, self.lock = 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def forward(self, body):
                import http.client

                backend = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=600)
                try:
                    backend.connect()
                except OSError as e:
                    return self.reply(502, f"backend down: {e}".encode(), "text/plain")
                if self.command == "POST" and self.path.rstrip("/").endswith("/chat/completions"):
                    with proxy.lock:
                        proxy.received += 1
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    backend.request(self.command, self.path, body=body, headers=headers)
                    response = backend.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as e:
                    return self.reply(502, f"backend failed: {e}".encode(), "text/plain")
                finally:
                    backend.close()
                self.reply(response.status, data, response.getheader("Content-Type", "application/json"))

            def reply(self, status, data, content_type):
                send(self, status, data, {"Content-Type": content_type, "Content-Length": str(len(data))})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Serve:
    """`transformers serve` on 127.0.0.1, unpinned: a request's model (a local folder) is loaded on
    demand. Clients reach it through a CountingProxy, which outlives restarts of the server and
    counts the chat requests it took (`requests_received`)."""

    def __init__(self, port, log):
        self.port, self.log, self.proc = port, Path(log), None
        self.proxy = CountingProxy(port)
        self.url = f"http://127.0.0.1:{self.proxy.port}/v1"

    def start(self):
        cli = Path(sys.executable).with_name("transformers")
        command = [str(cli)] if cli.exists() else [sys.executable, "-c", "from transformers.cli.transformers "
                                                                          "import main; main()"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command + ["serve", "--host", "127.0.0.1", "--port", str(self.port),
                                                    "--device", "cpu"], env=server_env(), stdout=log, stderr=log)
        start = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() - start > 240:
                self.kill()  # not left running for the next test's start to find its port taken
                raise RuntimeError("transformers serve did not answer /health within 240 s")
            time.sleep(0.25)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def ensure_running(self):
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def requests_received(self):
        return self.proxy.received


def varied_copy(src, dst, std=0.3, seed=1):
    """A copy of a tiny random model whose greedy output depends on the whole prompt.

    The tiny models' default initialisation (std 0.02) makes them repeat one newline whatever they
    read; weights drawn with a wider spread give a different text for every prompt and image, so
    equal outputs mean the same conversation reached the model. Special tokens other than the end
    of turn are suppressed (in the generation config, which the in-process path and the server both
    read), as a trained model never writes them mid-answer: `transformers serve` runs Qwen answers
    through its response parser, which keeps special tokens in the content, where the in-process
    path decodes with skip_special_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    shutil.copytree(src, dst)
    vision = "vision_config" in json.loads((Path(src) / "config.json").read_text())
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(src)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    tok = AutoTokenizer.from_pretrained(src)
    end = model.generation_config.eos_token_id
    model.generation_config.suppress_tokens = sorted(set(tok.all_special_ids) - {end})
    model.save_pretrained(dst)
    return str(dst)
