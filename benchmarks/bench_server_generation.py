"""In-process batched generation against generation through a server, on the same prompts (issue 14).

    python benchmarks/bench_server_generation.py                          # CPU: a tiny Qwen2, transformers serve
    python benchmarks/bench_server_generation.py --model runs/bootstrap   # any local text model folder
    python benchmarks/bench_server_generation.py --server http://127.0.0.1:8000/v1 --model runs/bootstrap
                                                                          # a server already up (vLLM …)

The same prompts (the drift simulator's studies, with their system prompt) are answered twice,
greedy, every answer exactly --max-new-tokens long (the model's generation config gets
min_new_tokens, which both ways read): by modeling.generate in batches of --batch-size, as
consensus.py and evaluate.py do without --server, and through chat_client.answer_all with
--concurrency requests in flight, as they do with --server. Without --server the script starts
`transformers serve` on loopback itself (its model loading is excluded: one warm-up request goes
first). Answers that differ between the two ways are counted.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # tiny models, servers
from common import chat_client  # noqa: E402
from common import modeling  # noqa: E402
import tiny_models  # noqa: E402
from loopback_servers import Serve, free_port  # noqa: E402
from common.records import write_json_atomic  # noqa: E402
from common.simulator import make_instances  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local text model folder (default: a tiny random Qwen2 built here)")
    p.add_argument("--server", help="an OpenAI-compatible server already serving --model (default: start "
                                    "`transformers serve` on loopback)")
    p.add_argument("--prompts", type=int, default=32, help="prompts to answer (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="in-process prompts per batch (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="server requests in flight (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="write the measurements to OUT")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: %(default)s)")
    return p.parse_args(argv)


def fixed_length_copy(src, dst, tokens):
    """The model with min_new_tokens = tokens in its generation config: the same work both ways."""
    shutil.copytree(src, dst)
    config_file = Path(dst) / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["min_new_tokens"] = tokens
    config_file.write_text(json.dumps(config))
    return str(dst)


def main(argv=None):
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_server_"))
    serve = None
    try:
        source = args.model or str(tiny_models.build_text_model(work / "tiny", hidden=64))
        model_dir = source if args.server else fixed_length_copy(source, work / "model", args.max_new_tokens)
        records = make_instances(args.prompts, 0, seed=args.seed)
        processor = modeling.load_processor(model_dir)
        model = modeling.load_model(model_dir).eval()
        model.generation_config.min_new_tokens = args.max_new_tokens
        modeling.generate(model, processor, records[:2], batch_size=2, max_new_tokens=2)  # warm-up
        start = time.perf_counter()
        here = modeling.generate(model, processor, records, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens)
        in_process = time.perf_counter() - start
        del model

        url = args.server
        if url is None:
            serve = Serve(free_port(), work / "serve.log")
            serve.start()
            url = serve.url
        client = chat_client.make_client(url, os.environ.get("OPENAI_API_KEY"), timeout=600)
        served = chat_client.served_model(client, url, want=model_dir)
        request = chat_client.request_fields(args.max_new_tokens, 0.0)
        messages = lambda r: chat_client.api_messages(r)  # noqa: E731
        list(chat_client.answer_all(client, served.name, records[:1], messages, lambda r: request))  # loads it
        start = time.perf_counter()
        answers = {r["id"]: (text, error) for r, text, error in chat_client.answer_all(
            client, served.name, records, messages, lambda r: request, concurrency=args.concurrency,
            generation=True)}
        through_server = time.perf_counter() - start
        client.close()
    finally:
        if serve is not None:
            serve.kill()
        shutil.rmtree(work, ignore_errors=True)

    failed = sum(error is not None for _, error in answers.values())
    differ = sum(answers[r["id"]][1] is None and answers[r["id"]][0][0] != text for r, text in zip(records, here))
    result = {"model": args.model or "tiny Qwen2 (hidden 64)", "server": args.server or "transformers serve (CPU)",
              "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "concurrency": args.concurrency, "in_process_s": round(in_process, 3),
              "server_s": round(through_server, 3), "server_over_in_process": round(through_server / in_process, 2),
              "failed": failed, "answers_that_differ": differ}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
