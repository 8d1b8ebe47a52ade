"""A real OpenAI-compatible chat server on localhost that answers with a tiny in-process model.

`with ChatServer(load_model("tiny-llama")) as server:` serves `POST /v1/chat/completions` on 127.0.0.1, on a
free port, from a thread, until the block ends; `server.base_url` is what a client is pointed at. Tests
script misbehaviour: `server.script` holds `Reply`/`Stall`/`Trickle` items used by the next requests in
order, and `server.default` (when set) by every request after them; otherwise the model answers. The server
records each request body and Authorization header, and the most requests it had in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from participant.generation import generate_answers
from participant.models import LocalModel
from schemas.messages import GenerationParams

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    """Answer with exactly this status, body and headers."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stall:
    """Say nothing for `seconds`, then answer normally (the client has usually given up by then)."""

    seconds: float


@dataclass(frozen=True)
class Trickle:
    """Send `reply` one byte every `seconds_per_byte`: from the status line on, or, with `headers_first`,
    the status line and headers at once and then the body a byte at a time. Never silent for long, so only
    a deadline on the whole request stops a client waiting for it."""

    reply: Reply
    seconds_per_byte: float
    headers_first: bool = False


Misbehaviour = Reply | Stall | Trickle


class ChatServer:
    def __init__(self, lm: LocalModel, *, api_key: str | None = None, delay_seconds: float = 0.0) -> None:
        self.lm = lm
        self.api_key = api_key  # when set, requests without `Authorization: Bearer <key>` get a 401
        self.delay_seconds = delay_seconds  # before generating, so that concurrent requests overlap
        self.script: deque[Misbehaviour] = deque()
        self.default: Misbehaviour | None = None
        self.requests: list[dict[str, Any]] = []  # bodies as received (None for non-JSON), in order
        self.authorizations: list[str | None] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()  # torch generation seeds a global RNG: one at a time
        self.closing = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.chat = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="chat-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.closing.set()  # stalled handlers wake up and finish
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @contextmanager
    def counting(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def respond(self, path: str, raw: bytes, authorization: str | None) -> Reply | Trickle:
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        with self._lock:
            self.requests.append(request)
            self.authorizations.append(authorization)
            planned = self.script.popleft() if self.script else self.default
        if isinstance(planned, Reply | Trickle):
            return planned
        if isinstance(planned, Stall):
            self.closing.wait(planned.seconds)
        if path != CHAT_PATH:
            return _error(404, f"no route {path}")
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return _error(401, "invalid api key")
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            return _error(400, "expected a JSON object with messages")
        return self._complete(request)

    def _complete(self, request: dict[str, Any]) -> Reply:
        prompt = next(m["content"] for m in reversed(request["messages"]) if m.get("role") == "user")
        params = GenerationParams(
            max_new_tokens=int(request.get("max_tokens", 16)),
            temperature=float(request.get("temperature", 0.0)),
            top_p=float(request.get("top_p", 1.0)),
            seed=int(request.get("seed", 0)),
        )
        time.sleep(self.delay_seconds)
        with self._model_lock:
            [answer] = generate_answers(self.lm, [("0", prompt)], params)
        completion = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.lm.model_id),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            },
        }
        return Reply(200, json.dumps(completion).encode())


def _error(status: int, message: str) -> Reply:
    return Reply(
        status, json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler must not hold up close
    chat: ChatServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        chat = self.server.chat
        with chat.counting():
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            reply = chat.respond(self.path, raw, self.headers.get("Authorization"))
        trickle = reply if isinstance(reply, Trickle) else None
        reply = reply.reply if isinstance(reply, Trickle) else reply
        head = f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}\r\n"
        headers = {"Content-Type": "application/json", **reply.headers}
        headers |= {"Content-Length": str(len(reply.body)), "Connection": "close"}
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        whole = head.encode("latin-1") + reply.body
        at_once = len(whole) if trickle is None else len(head) if trickle.headers_first else 0
        try:
            self.wfile.write(whole[:at_once])
            for i in range(at_once, len(whole)):
                assert trickle is not None
                if chat.closing.wait(trickle.seconds_per_byte):
                    return  # the test is over
                self.wfile.write(whole[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet
