"""The OpenAI-compatible chat client: one for every stage that asks a server.

collect.py's `openai:` sources, and the `--server` generator of consensus.py and evaluate.py (vLLM,
SGLang, `transformers serve`, any OpenAI-compatible endpoint) all go through it: the conversation
of an instance in the OpenAI format (images as base64 data URLs), one request with retries and
backoff (`ask`), bounded concurrency (`answer_all`), and, for the generating stages, which model
the server serves (`served_model`), so a run can record it and refuse the wrong one.

Faults never raise out of a request: each finished request is (text, None) or (None, a short
reason with every secret removed), and the caller counts the failures and leaves them for the next
run to ask again.
"""

import base64
import contextlib
import importlib
import json
import mimetypes
import os
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common import records


class ServerError(ValueError):
    """The server cannot be used for this run (unreachable, or serving another model)."""


def have_openai():
    try:
        import openai  # noqa: F401
    except ImportError:
        return False
    return True


def image_data_url(path):
    """An image file as a base64 data URL, the one image form every compatible endpoint accepts."""
    mime = mimetypes.guess_type(str(path))[0]
    if not mime or not mime.startswith("image/"):
        from PIL import Image

        with Image.open(path) as img:
            mime = Image.MIME.get(img.format, "image/png")
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def api_messages(record, data_path=None, allow_outside_images=False):
    """The chat of one instance in the OpenAI format: images first, as modeling.messages_for does.

    Images leave the machine here, so their folder is checked again at the moment they are read:
    a symlink changed since validation must not send a file from elsewhere.
    """
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if record.get("images"):
        if not allow_outside_images:
            records.check_images_inside(record, data_path)
        content = [{"type": "image_url", "image_url": {"url": image_data_url(records.resolve_image(data_path, p))}}
                   for p in record["images"]]
        content.append({"type": "text", "text": record["prompt"]})
    else:
        content = record["prompt"]
    messages.append({"role": "user", "content": content})
    return messages


# Shorter values are placeholders ("EMPTY", "x" for a local server), not secrets, and replacing
# them would mangle answers.
MIN_SECRET_LENGTH = 8

# An Authorization header's Basic credentials, as a server or proxy may echo them: base64 of user:password
_BASIC = re.compile(r"\b(Basic\s+)([A-Za-z0-9+/]{4,}={0,2})")


def redact(text, secrets):
    for s in secrets:
        if s and len(s) >= MIN_SECRET_LENGTH:
            text = text.replace(s, "***")
    return _BASIC.sub(_redact_basic, text)


def _redact_basic(match):
    """'Basic ***' where the word after 'Basic' decodes to user:password; prose ('Basic anatomy') stays."""
    try:
        decoded = base64.b64decode(match.group(2), validate=True).decode("ascii")
    except ValueError:  # not base64, or not ASCII (binascii.Error and UnicodeDecodeError are ValueErrors)
        return match.group(0)
    return match.group(1) + "***" if ":" in decoded else match.group(0)


def redacted_url(url):
    """The URL with any user:password@ replaced by ***@, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def refuse_credentials(url, flag):
    """A URL holding user:password@ is refused: the client would send it as Basic auth instead of the
    key, and the URL is written into run manifests and summaries. The key belongs in an environment
    variable (--api-key-env), which is never written anywhere."""
    if url and (urlsplit(url).username is not None or urlsplit(url).password is not None):
        raise ServerError(f"{flag} {redacted_url(url)}: a URL may not hold credentials (user:password@); give "
                          "the server's key in an environment variable named by --api-key-env instead")
    return url


def _retry_after(error):
    """Seconds a 429/503 answer asks us to wait (Retry-After), or None."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _short(message, limit=300):
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _reason(message, secrets):
    """A failure reason for the journal and the summary: redacted first, then cut, so a key that
    straddles the cut cannot leave a piece of itself behind."""
    return _short(redact(str(message), secrets))


class RequestDeadline:
    """A total deadline for each request of one HTTP client, however slowly the server answers.

    httpx timeouts bound each network operation, so a server that trickles a byte every half
    second never times out. The openai client's own `timeout=` is such an httpx timeout (it is
    passed too, for connects): alone, it let test_collect's trickling-server request run 167 s
    against --timeout 1.5 (measured with this class's timer off), hence this class. Instead a timer shuts the request's socket down when its time is up,
    which ends the read in progress. The socket comes from httpx's `trace` extension when the
    connection is opened (and again when TLS wraps it); `Connection: close` gives every request a
    connection of its own, so none runs on a socket the timer cannot see (a handshake is small
    next to a model's answer). The client takes as_event_hooks(); each request is made inside
    attempt(), in the thread that sends it (the sync client sends in the caller's thread, hence
    the thread-local).
    """

    def __init__(self, seconds=None):
        self.seconds = seconds
        self._local = threading.local()

    def as_event_hooks(self):
        return {"request": [self._on_request]}

    def _on_request(self, request):
        request.headers["Connection"] = "close"
        watch = getattr(self._local, "watch", None)
        if watch is not None:
            request.extensions["trace"] = watch.trace
            watch.start()

    @contextlib.contextmanager
    def attempt(self):
        """One request: its time runs from when it is handed to httpx (the client's own work on
        the body before that is not the server's time); the watch's `passed` says whether it ran out."""
        watch = _Watch(self.seconds)
        self._local.watch = watch
        try:
            yield watch
        finally:
            self._local.watch = None
            watch.stop()


class _Watch:
    def __init__(self, seconds):
        self.seconds, self.lock, self.sock, self.passed, self.timer = seconds, threading.Lock(), None, False, None

    def start(self):
        if self.seconds is not None and self.timer is None:
            self.timer = threading.Timer(self.seconds, self._cut)
            self.timer.daemon = True
            self.timer.start()

    def trace(self, event, info):
        # TLS wraps the TCP socket into a new one and detaches the first, so the socket to shut
        # down is the last one opened
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete") and info.get("return_value"):
            with self.lock:
                self.sock = info["return_value"].get_extra_info("socket")
                if self.passed:  # connecting took the whole time
                    self._shutdown()

    def _cut(self):
        with self.lock:
            self.passed = True
            self._shutdown()

    def _shutdown(self):
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: the request ended on its own
                pass

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()


class ResponseTooLarge(Exception):
    """The server's answer grew past --max-response-mb; raised while its body is read."""


# A chat answer is text: 32 MiB is thousands of times the longest one a model writes, and bounds
# what --concurrency requests in flight can hold in memory against a hostile or broken server.
MAX_RESPONSE_MB = 32.0


class BodyCap:
    """Stops reading a response body at `limit` bytes, whether or not it says its length: the
    response hook refuses a Content-Length over the limit and wraps the body stream, which the client
    reads after the hooks, so a chunked body is cut as it arrives."""

    def __init__(self, limit_bytes):
        self.limit = int(limit_bytes)

    def as_event_hooks(self):
        return {"response": [self._on_response]}

    def _on_response(self, response):
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            raise ResponseTooLarge(self._message())
        response.stream = self._capped(response.stream)

    def _capped(self, stream):
        # the client checks the stream's type, so the wrapper is its library's SyncByteStream
        library = importlib.import_module(type(stream).__module__.split(".")[0])
        cap = self

        class Capped(library.SyncByteStream):
            def __iter__(self):
                seen = 0
                for chunk in stream:
                    seen += len(chunk)
                    if seen > cap.limit:
                        raise ResponseTooLarge(cap._message())
                    yield chunk

            def close(self):
                stream.close()

        return Capped()

    def _message(self):
        return (f"response too large: the body passed {self.limit / 2 ** 20:g} MiB (--max-response-mb) and was "
                "not read further")


def api_client(base_url, api_key, timeout, max_response_mb=MAX_RESPONSE_MB):
    """An OpenAI client that never follows a redirect, ends every request after `timeout` s and
    reads no answer past max_response_mb.

    A 307/308 would re-send the request, images included, to wherever the server points; a
    redirect therefore comes back as an HTTP status and is counted as a failure (see ask). The
    client's own retries are off: ask() retries, so that failures are counted and backed off the
    same way whatever the client version does. Returns (client, deadline) for ask().
    """
    import openai

    refuse_credentials(base_url or os.environ.get("OPENAI_BASE_URL"), "the base URL")  # also checked when parsed
    deadline = RequestDeadline(timeout)
    hooks = {**deadline.as_event_hooks(), **BodyCap(max_response_mb * 2 ** 20).as_event_hooks()}
    http = openai.DefaultHttpxClient(timeout=timeout, follow_redirects=False, event_hooks=hooks)
    client = openai.OpenAI(api_key=api_key or "EMPTY", base_url=base_url, timeout=timeout, max_retries=0,
                           http_client=http)
    return client, deadline


def completion_text(raw, secrets=(), generation=False):
    """(text, None) or (None, reason) from a raw 2xx chat completion response.

    The body is parsed here rather than by the client, which passes an HTML page or a JSON list
    through as a string or list and leaves the error to whoever touches it next.
    """
    body = raw.text
    try:
        payload = json.loads(body)
    except ValueError:
        kind = raw.headers.get("content-type", "no content type").split(";")[0]
        return None, _reason(f"malformed response: HTTP {raw.status_code} with a body that is not JSON ({kind}: "
                             f"{body[:120]!r}); is the base URL an OpenAI-compatible endpoint ending in /v1?", secrets)
    choices = payload.get("choices") if isinstance(payload, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
        return None, _reason(f"malformed response: no choices[0].message.content string in {body[:160]!r}", secrets)
    text, replaced = records.replace_lone_surrogates(redact((content or "").strip(), secrets))
    if replaced:  # half a UTF-16 pair cannot be written to any file; the answer is kept, not asked again
        print(f"warning: an answer held {replaced} lone surrogate(s) (half a UTF-16 pair), each replaced by U+FFFD",
              file=sys.stderr, flush=True)
    if generation:  # what the in-process path gives: the text, empty or not, and whether it ended
        return (text, choice.get("finish_reason") == "stop"), None
    if text:
        return text, None
    return None, f"empty answer (finish_reason={choice.get('finish_reason')})"


def _status_reason(error, secrets):
    if 300 <= error.status_code < 400:
        location = error.response.headers.get("location", "(no Location header)")
        return _reason(f"HTTP {error.status_code}: redirect to {location} not followed: a redirect would re-send "
                       "the request, images included; give the final URL as the base URL", secrets)
    return _reason(f"HTTP {error.status_code}: {error.message}", secrets)


def ask(client, model, messages, request, max_retries=5, backoff=1.0, max_backoff=60.0, sleep=time.sleep,
        secrets=(), deadline=None, generation=False):
    """One chat completion with retries; returns (text, None) or (None, reason), never raises
    for an API fault. `secrets` are replaced by *** in both; `deadline` is api_client's.

    429, 408, 409, 5xx, timeouts (the deadline included) and refused connections are retried
    with exponential backoff (backoff, 2·backoff, 4·backoff … capped at max_backoff, or the
    server's Retry-After); other statuses (400 bad request, 401 bad key, 404 unknown model, a
    redirect) and a 2xx body that is not a chat completion fail at once: asking again would not
    help. An empty answer is a failure too, kept for the next run to retry.

    generation: a generating stage's request (consensus, evaluate), which gets what the in-process
    path gives: an empty answer is kept, and the text comes back as (text, ended), ended meaning
    the answer stopped on its own (finish_reason "stop") rather than at the token limit.
    """
    import openai

    deadline = deadline or RequestDeadline()
    error = None
    for attempt in range(max_retries + 1):
        wait = None
        try:
            with deadline.attempt() as watch:
                raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, **request)
            if not watch.passed:
                return completion_text(raw, secrets, generation)
            error = "timeout"  # the timer found no socket to cut, but the answer came after the deadline
        except openai.APIStatusError as e:
            error = _status_reason(e, secrets)
            if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                return None, error
            wait = _retry_after(e)
        except ResponseTooLarge as e:  # asking again would bring the same flood
            return None, str(e)
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            # a connection the deadline shut down reads as a dropped connection: it was a timeout
            timed_out = isinstance(e, openai.APITimeoutError) or watch.passed
            error = "timeout" if timed_out else _reason(f"connection error: {e.__cause__ or e}", secrets)
        if attempt < max_retries:
            sleep(min(max_backoff, wait if wait is not None else backoff * 2 ** attempt))
    return None, f"{error} (after {max_retries + 1} attempts)"


def make_client(base_url, api_key=None, timeout=300.0, max_response_mb=MAX_RESPONSE_MB):
    """api_client with its deadline kept on the client, for answer_all and list_models."""
    client, deadline = api_client(base_url, api_key, timeout, max_response_mb)
    client.apo_deadline = deadline
    return client


def answer_all(client, model, items, messages_of, request_of, concurrency=8, max_retries=5, backoff=1.0,
               secrets=(), generation=False):
    """Yield (item, text, error) for each item as its request finishes, at most `concurrency` in
    flight. messages_of(item) is its conversation (api_messages), request_of(item) the extra
    chat.completions fields (max_completion_tokens, temperature, seed …). The secrets (API keys) are
    removed from every error message, whatever the server echoes back. generation: see ask() (the
    text is then (text, ended)).
    """
    def answer(item):
        try:  # images are encoded in the worker, so only the requests in flight hold them in memory
            messages = messages_of(item)
        except records.RecordError as e:  # an image path that leads out of the data folder since validation
            return None, str(e)
        except OSError as e:  # an image vanished since validation
            return None, f"image unreadable: {e}"
        return ask(client, model, messages, request_of(item), max_retries, backoff, secrets=secrets,
                   deadline=getattr(client, "apo_deadline", None), generation=generation)

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(answer, item): item for item in items}
        for future in as_completed(futures):
            text, error = future.result()
            yield futures[future], text, error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# A server as the generator of a stage (consensus.py, evaluate.py --server)


@dataclass
class Served:
    """The model a server answers for, as the run records it."""

    url: str
    name: str  # what the requests ask for (the server's model id)
    root: str = None  # the folder or hub id it was loaded from, where the server says (vLLM: `root`)
    max_model_len: int = None  # its context length, where the server says (vLLM)

    def record(self):
        return {"server": self.url, "model": self.name, **({"root": self.root} if self.root else {})}


def same_model(a, b):
    """One model named twice: the same string, or paths of the same folder on this machine."""
    if not a or not b:
        return False
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def list_models(client, url, max_retries=5, backoff=1.0, sleep=time.sleep):
    """[(id, root, max_model_len)] of GET /models, waiting with backoff for a server still starting."""
    import openai

    for attempt in range(max_retries + 1):
        try:
            return [(m.id, getattr(m, "root", None), getattr(m, "max_model_len", None))
                    for m in client.models.list().data]
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            error = f"cannot reach it ({_short(e.__cause__ or e)})"
        except openai.APIStatusError as e:
            error = f"GET /models answered HTTP {e.status_code}: {_short(e.message)}"
            if e.status_code < 500:
                break
        if attempt < max_retries:
            sleep(min(60.0, backoff * 2 ** attempt))
    raise ServerError(f"--server {url}: {error}")


def served_model(client, url, want=None, name=None, max_retries=5, backoff=1.0):
    """The model the requests will ask for, checked against the one the stage is about.

    want: that model (--model, a --models folder), or None to take what the server serves. name:
    the server's id for it when it differs (vLLM's --served-model-name). A server that says where
    its models come from (vLLM and SGLang list a `root`) must serve `want`: its id or root is
    `want`, or the same folder. One that loads whatever a request names (an unpinned `transformers
    serve`) is asked for `want` itself.
    """
    listed = list_models(client, url, max_retries, backoff)
    ids = ", ".join(repr(i) for i, _, _ in listed[:8]) or "no model"
    if name is None:
        name = next((i for i, r, _ in listed if same_model(want, i) or same_model(want, r)), None)
    if name is None:
        if want and not any(r for _, r, _ in listed):
            name = want
        elif len(listed) == 1:
            name = listed[0][0]
        else:
            raise ServerError(f"--server {url} lists {ids}: name the model to ask for with "
                              + ("--served-model" if want is None else f"--served-model, or serve {want} there"))
    card = next(((i, r, n) for i, r, n in listed if i == name), (name, None, None))
    if want and not (same_model(want, name) or same_model(want, card[1])):
        serves = f"{name!r}" + (f" (loaded from {card[1]})" if card[1] else "")
        raise ServerError(f"--server {url} serves {serves}, not {want}, the model this run is about; serve "
                          f"{want} there, or point --server at the server that does")
    if listed and name not in (i for i, _, _ in listed) and any(r for _, r, _ in listed):
        raise ServerError(f"--server {url} does not serve {name!r}; it lists {ids}")
    return Served(url, name, card[1], card[2])


def request_fields(max_new_tokens=None, temperature=None, top_p=None, repetition_penalty=None, seed=None):
    """The chat.completions fields of the sampling settings given (None: not sent, the server's
    default). repetition_penalty is no OpenAI field: vLLM and SGLang take it as an extra one (the
    same multiplicative penalty as transformers'); `transformers serve` refuses it (HTTP 422)."""
    fields = {"max_completion_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
              "repetition_penalty": repetition_penalty, "seed": seed}
    return {k: v for k, v in fields.items() if v is not None}


def add_request_options(group, concurrency=8, timeout=300.0):
    """--concurrency, --max-retries, --timeout, --backoff: the same four for every stage that asks."""
    group.add_argument("--concurrency", type=int, default=concurrency, metavar="N",
                       help=f"requests in flight per server (default {concurrency})")
    group.add_argument("--max-retries", type=int, default=5, metavar="N",
                       help="retries of a request after 429, 5xx, timeouts and refused connections (default 5)")
    group.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                       help=f"total deadline of one request in seconds, however slowly the server sends; a request "
                            f"cut there counts as a timeout and is retried (default {timeout:g})")
    group.add_argument("--backoff", type=float, default=1.0, metavar="SECONDS",
                       help="first retry delay in seconds, doubled each retry (capped at 60, or the server's "
                            "Retry-After)")
    group.add_argument("--max-response-mb", type=float, default=MAX_RESPONSE_MB, metavar="MIB",
                       help="largest answer body read from a server, in MiB; a larger one is cut off and counted "
                            f"as a failure, not retried (default {MAX_RESPONSE_MB:g})")


def add_server_options(parser, what):
    """The --server group of a generating stage; `what` says which model the server must serve."""
    group = parser.add_argument_group("generation through a server (instead of the model in this process)")
    group.add_argument("--server", metavar="URL",
                       help="OpenAI-compatible endpoint that generates instead of a model loaded here, e.g. "
                            f"http://127.0.0.1:8000/v1 from `vllm serve {what}` (vLLM, SGLang, transformers serve)")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the server's key, if it wants one (default "
                            "OPENAI_API_KEY; never written anywhere)")
    group.add_argument("--allow-outside-images", action="store_true",
                       help="send the server images whose path leads outside the data file's folder (absolute, ../ "
                            "or a symlink out); without it such an instance fails and is counted")
    add_request_options(group, concurrency=16, timeout=600.0)
    return group
