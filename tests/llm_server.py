"""A scripted OpenAI-compatible chat-completions server for tests (stdlib only).

Every LLM call in the tests goes through litellm over real HTTP to one of these, on
127.0.0.1 with a free port. The test scripts what the server answers, request by request:

    from llm_server import Delay, Reply, ScriptedLLM, Status   # tests/ is on sys.path under pytest

    with ScriptedLLM([Status(429), Reply("```python\\n...\\n```\\nDESCRIPTION: x")]) as srv:
        propose = make_agent("llm", model=srv.model, api_base=srv.url, retry_wait=0.01)
        ...
        assert len(srv.requests) == 2                 # the parsed JSON bodies, in order
        assert "program.md text" in srv.requests[0]["messages"][0]["content"]

Script items, consumed one per request (to `/v1/chat/completions`, `/chat/completions`):

- ``Reply(text, latency=0.0, prompt_tokens=None, completion_tokens=None, finish_reason="stop")``:
  a 200 with a normal completion; `usage` is filled (counts default to about len/4 of the
  prompt and reply, at least 1). Streaming requests (`"stream": true`) get the same reply as
  server-sent events, with the usage in the last chunk.
- ``Status(code, message=None, latency=0.0, headers=None)``: that HTTP status with an
  OpenAI-style error body (e.g. 429, 500, 503, 400, 401).
- ``Delay(seconds, then=None)``: wait `seconds` before answering (`then`, default a short
  Reply): longer than the client's timeout, this makes the client time out.
- a callable ``f(body: dict) -> Reply | Status | Delay``: computed from the request, e.g. an
  edit of the train.py the prompt contains (handy for loop tests).

When the script is used up the server answers with `default` (an item or a callable, as
above); without one it answers 500 "script exhausted", which the tests then see as an error.
`srv.requests` holds every request body, `srv.paths` the request paths, `srv.headers` the
request headers (lower-cased names), `srv.remaining` the items not yet used.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union


@dataclass
class Reply:
    text: str
    latency: float = 0.0                 # seconds to wait before answering
    prompt_tokens: int | None = None     # default: about len(all message contents) / 4
    completion_tokens: int | None = None  # default: about len(text) / 4
    finish_reason: str = "stop"


@dataclass
class Status:
    code: int
    message: str | None = None
    latency: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Delay:
    seconds: float
    then: Union[Reply, Status, None] = None   # what is sent after the delay (default: a Reply)


Item = Union[Reply, Status, Delay, Callable[[dict], Union[Reply, Status, Delay]]]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
                502: "server_error", 503: "service_unavailable", 504: "server_error"}


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _prompt_text(body: dict) -> str:
    parts = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):       # [{"type": "text", "text": ...}, ...]
            parts.extend(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return "\n".join(parts)


class ScriptedLLM:
    """The server; a context manager. `url` is the OpenAI base URL (ends in /v1)."""

    def __init__(self, script: list[Item] | None = None, default: Item | None = None,
                 model_name: str = "scripted-model"):
        self._script: deque[Item] = deque(script or [])
        self._default = default
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.model_name = model_name
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- the test-facing API ----

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """A litellm model string that routes to this server (with api_base=url)."""
        return f"openai/{self.model_name}"

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._script)

    def add(self, *items: Item) -> None:
        with self._lock:
            self._script.extend(items)

    def start(self) -> "ScriptedLLM":
        handler = type("Handler", (_Handler,), {"server_obj": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()                  # wakes handlers sleeping in a Delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ScriptedLLM":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- used by the handler ----

    def _next(self, body: dict) -> Union[Reply, Status, Delay]:
        with self._lock:
            self.requests.append(body)
            item = self._script.popleft() if self._script else self._default
        if item is None:
            return Status(500, "ScriptedLLM: script exhausted")
        if callable(item) and not isinstance(item, (Reply, Status, Delay)):
            item = item(body)
        return item

    def _sleep(self, seconds: float) -> bool:
        """False if the server is closing (the answer is then not sent)."""
        return not self._closing.wait(seconds) if seconds > 0 else True


class _Handler(BaseHTTPRequestHandler):
    server_obj: ScriptedLLM
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:   # keep pytest output clean
        pass

    def _send_json(self, code: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server_obj.model_name, "object": "model", "owned_by": "tests"}]})
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        srv = self.server_obj
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}",
                                            "type": "not_found_error"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "body is not JSON",
                                            "type": "invalid_request_error"}})
            return
        with srv._lock:
            srv.paths.append(self.path)
            srv.headers.append({k.lower(): v for k, v in self.headers.items()})
        item = srv._next(body)
        try:
            if isinstance(item, Delay):
                if not srv._sleep(item.seconds):
                    return
                item = item.then or Reply("(late reply)")
            if not srv._sleep(item.latency):
                return
            if isinstance(item, Status):
                message = item.message or f"scripted status {item.code}"
                self._send_json(item.code, {"error": {
                    "message": message, "type": _ERROR_TYPES.get(item.code, "error"),
                    "param": None, "code": str(item.code)}}, item.headers)
            elif body.get("stream"):
                self._stream(body, item)
            else:
                self._send_json(200, self._completion(body, item))
        except (BrokenPipeError, ConnectionResetError):
            pass                                 # the client gave up (a timeout): fine

    def _usage(self, body: dict, item: Reply) -> dict:
        p = item.prompt_tokens if item.prompt_tokens is not None else _estimate_tokens(_prompt_text(body))
        c = item.completion_tokens if item.completion_tokens is not None else _estimate_tokens(item.text)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _completion(self, body: dict, item: Reply) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.server_obj.model_name,
            "choices": [{"index": 0, "finish_reason": item.finish_reason,
                         "message": {"role": "assistant", "content": item.text}}],
            "usage": self._usage(body, item),
        }

    def _stream(self, body: dict, item: Reply) -> None:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        model = body.get("model") or self.server_obj.model_name

        def chunk(delta: dict, finish: str | None, usage: dict | None = None) -> bytes:
            payload = {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [{"index": 0, "delta": delta,
                                                    "finish_reason": finish}]}
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": item.text}, None),
                  chunk({}, item.finish_reason, self._usage(body, item)), b"data: [DONE]\n\n"]
        data = b"".join(events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
