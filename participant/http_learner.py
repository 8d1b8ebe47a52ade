"""The `http` kind: a generate-only black box behind an OpenAI-compatible chat completions endpoint.

Each prompt is one `POST {base_url}/chat/completions` carrying a single user message; the round's
generation parameters map onto the request (`max_new_tokens` -> `max_tokens`, `temperature`, `top_p`,
`seed`). llama.cpp's server, vLLM, Ollama and hosted APIs all speak it. Standard library only
(`http.client`): the learner runs on a worker thread like every learner, and a bounded semaphore keeps at
most `max_concurrency` requests in flight.

Each request has a total deadline of `connect_timeout_seconds + read_timeout_seconds` (connect, headers
and the whole body): a server that keeps sending a byte now and then, never silent for a read timeout, is
cut there, so a prompt takes at most `(retries + 1) x (connect + read timeout)` plus the back-offs.
Connection errors, timeouts, 429 and 5xx are retried with exponential back-off (a numeric `Retry-After` is
honoured up to the cap); other 4xx and malformed answers are not, since asking again gets the same answer.
Every failure raises `HttpLearnerError` naming the URL, what happened and the attempts made; the API key
never appears in messages or logs.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

import msgspec
import structlog
from msgspec import Meta

from participant.learner import GeneratedAnswer, LearnerError
from participant.learners.black_box import PerPromptLearner
from participant.settings import HttpTable, ParticipantSettings
from schemas.messages import GenerationParams

log = structlog.get_logger(__name__)

CHAT_COMPLETIONS = "/chat/completions"
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # an answer is at most a few KiB; more is a misbehaving server
EXCERPT_CHARS = 300


class HttpLearnerError(LearnerError):
    """The endpoint could not be reached or answered badly; `attempts` requests were made to `url`."""

    def __init__(self, message: str, *, url: str, attempts: int, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status


class _Message(msgspec.Struct):
    content: str | None = None  # null when a server answers with tool calls or a refusal


class _Choice(msgspec.Struct):
    message: _Message


class _Usage(msgspec.Struct):
    prompt_tokens: Annotated[int, Meta(ge=0)] = 0
    completion_tokens: Annotated[int, Meta(ge=0)] = 0


class _ChatCompletion(msgspec.Struct):
    choices: Annotated[list[_Choice], Meta(min_length=1)]
    usage: _Usage | None = None


_COMPLETION = msgspec.json.Decoder(_ChatCompletion)
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True)
class _Reply:
    status: int
    reason: str
    body: bytes
    retry_after: float | None  # seconds, when the server said so in a numeric Retry-After


@dataclass(frozen=True)
class _Failure:
    what: str  # what happened, for the error message
    retryable: bool
    retry_after: float | None = None
    status: int | None = None


class HttpChatLearner(PerPromptLearner):
    """Answers prompts through an OpenAI-compatible `/chat/completions` endpoint; it cannot train."""

    def __init__(self, endpoint: HttpTable, api_key: str | None = None) -> None:
        parts = urlsplit(endpoint.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LearnerError(f"base_url must be http(s)://host[:port]/path, got {endpoint.base_url!r}")
        self.endpoint = endpoint
        self.model_id = endpoint.model
        self.concurrency = endpoint.max_concurrency
        self.url = endpoint.base_url.rstrip("/") + CHAT_COMPLETIONS
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + CHAT_COMPLETIONS
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Held per request, not per prompt: a prompt waiting out its back-off leaves its slot to others.
        self._slots = threading.BoundedSemaphore(endpoint.max_concurrency)

    @classmethod
    def from_settings(cls, endpoint: HttpTable, environ: Mapping[str, str] | None = None) -> HttpChatLearner:
        """Read the API key from the environment variable the settings name; fail now if it is unset."""
        api_key = None
        if endpoint.api_key_env is not None:
            api_key = (os.environ if environ is None else environ).get(endpoint.api_key_env)
            if not api_key:
                raise LearnerError(
                    f"[http] api_key_env names {endpoint.api_key_env}, but that environment variable is "
                    f"not set; export it with the key for {endpoint.base_url}, or remove api_key_env"
                )
        return cls(endpoint, api_key)

    def complete(self, prompt_id: str, prompt: str, params: GenerationParams) -> GeneratedAnswer:
        body = _ENCODER.encode(
            {
                "model": self.endpoint.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed,
                "stream": False,
            }
        )
        attempts = self.endpoint.retries + 1
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            with self._slots:
                outcome = self._post(body)
            if isinstance(outcome, _Reply) and 200 <= outcome.status < 300:
                return self._parse(outcome, prompt_id, attempt)
            failure = outcome if isinstance(outcome, _Failure) else _status_failure(outcome)
            if not failure.retryable or attempt == attempts:
                raise self._error(prompt_id, failure, attempt, time.monotonic() - started)
            delay = self._backoff(attempt, failure.retry_after)
            log.warning(
                "http_attempt_failed",
                url=self.url,
                prompt=prompt_id,
                attempt=attempt,
                attempts=attempts,
                reason=failure.what,
                retry_in_seconds=round(delay, 3),
            )
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _post(self, body: bytes) -> _Reply | _Failure:
        """One request; a transport failure comes back as a `_Failure`, any HTTP status as a `_Reply`.

        The socket timeouts bound each silence; a watchdog bounds the whole request, since a server
        that sends a byte every second is never silent for long: at the deadline it shuts the socket
        down, which wakes the blocked read, and whatever came of it is reported as the deadline.
        """
        connect_timeout = self.endpoint.connect_timeout_seconds
        deadline = connect_timeout + self.endpoint.read_timeout_seconds
        connection: http.client.HTTPConnection
        if self._https:
            context = ssl.create_default_context()
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=connect_timeout, context=context
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=connect_timeout)
        watchdog = _Watchdog(connection, deadline)
        try:
            outcome = self._exchange(connection, body, watchdog)
        finally:
            watchdog.cancel()
            connection.close()
        if watchdog.expired.is_set():  # a body cut short there reads as complete: never trust it
            return _Failure(
                f"no complete answer within {deadline:g}s (connect_timeout_seconds + read_timeout_seconds)",
                retryable=True,
            )
        return outcome

    def _exchange(
        self, connection: http.client.HTTPConnection, body: bytes, watchdog: _Watchdog
    ) -> _Reply | _Failure:
        connect_timeout = self.endpoint.connect_timeout_seconds
        read_timeout = self.endpoint.read_timeout_seconds
        connected = False
        try:
            connection.connect()
            connected = True
            watchdog.watch(connection.sock)  # the response keeps reading it after `connection` lets go
            connection.sock.settimeout(read_timeout)
            connection.request("POST", self._path, body, self._headers)
            response = connection.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
            return _Reply(response.status, response.reason, data, _seconds(response.getheader("Retry-After")))
        except ConnectionRefusedError:
            return _Failure("connection refused (is the server running at that address?)", retryable=True)
        except TimeoutError:
            if connected:
                return _Failure(f"no response within the read timeout of {read_timeout:g}s", retryable=True)
            return _Failure(f"could not connect within {connect_timeout:g}s", retryable=True)
        except ssl.SSLCertVerificationError as e:
            return _Failure(f"TLS certificate not trusted: {e.verify_message}", retryable=False)
        except (OSError, http.client.HTTPException) as e:
            return _Failure(f"connection failed: {type(e).__name__}: {e}", retryable=True)

    def _parse(self, reply: _Reply, prompt_id: str, attempt: int) -> GeneratedAnswer:
        def bad(what: str) -> HttpLearnerError:
            return HttpLearnerError(
                f"{self.url} answered prompt {prompt_id!r} with HTTP {reply.status} but {what} "
                f"(attempt {attempt}; a malformed answer is not retried); body: {_excerpt(reply.body)}",
                url=self.url,
                attempts=attempt,
                status=reply.status,
            )

        if len(reply.body) > MAX_RESPONSE_BYTES:
            raise bad(f"a body over {MAX_RESPONSE_BYTES} bytes")
        try:
            completion = _COMPLETION.decode(reply.body)
        except (msgspec.DecodeError, ValueError) as e:  # ValidationError is a DecodeError
            raise bad(f"not a chat completion ({e})") from e
        except RecursionError as e:  # JSON nested deeper than the interpreter's stack
            raise bad("not a chat completion (JSON nested too deep)") from e
        content = completion.choices[0].message.content
        if content is None:
            raise bad("choices[0].message.content is null")
        usage = completion.usage or _Usage()
        return GeneratedAnswer(prompt_id, content, usage.prompt_tokens, usage.completion_tokens)

    def _error(self, prompt_id: str, failure: _Failure, attempts: int, seconds: float) -> HttpLearnerError:
        if failure.retryable:
            tried = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''} in {seconds:.1f}s"
        else:
            tried = f"not retried (attempt {attempts} of {self.endpoint.retries + 1})"
        return HttpLearnerError(
            f"{self.url} failed on prompt {prompt_id!r}: {failure.what}; {tried}",
            url=self.url,
            attempts=attempts,
            status=failure.status,
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.endpoint.max_backoff_seconds
        delay = min(cap, self.endpoint.backoff_seconds * 2.0 ** (attempt - 1))
        return max(delay, min(cap, retry_after)) if retry_after is not None else delay


class _Watchdog:
    """Shuts `connection`'s socket down `seconds` from now unless cancelled first; `expired` says it did."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self.expired = threading.Event()
        self._connection = connection
        self._socket: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """The connected socket: `connection` drops it once a `Connection: close` response holds it."""
        self._socket = sock

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        self.expired.set()
        # Before `watch`: the socket a TLS handshake is on, or None while the TCP connect is bounded by
        # its own timeout. A socket already closed has no descriptor left, so this never hits another's.
        sock = self._socket or self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: nothing is blocked on it
                sock.shutdown(socket.SHUT_RDWR)


def _status_failure(reply: _Reply) -> _Failure:
    """A non-2xx reply: 429 and 5xx are worth retrying; any other status is the request's fault."""
    retryable = reply.status == 429 or reply.status >= 500
    what = f"HTTP {reply.status} {reply.reason}: {_excerpt(reply.body)}"
    if reply.status in (401, 403):
        what += " (check the API key in the variable [http] api_key_env names)"
    elif reply.status == 404:
        what += " (check [http] base_url, usually ending in /v1, and model)"
    return _Failure(what, retryable=retryable, retry_after=reply.retry_after, status=reply.status)


def _excerpt(body: bytes) -> str:
    """An error body's message (OpenAI's {"error": {"message": ...}} when it is one), cut short."""
    text = body[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    try:
        error = json.loads(body).get("error") if len(body) <= MAX_RESPONSE_BYTES else None
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(error, str):
        text = error
    text = " ".join(text.split())
    return repr(text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else "")) if text else "(empty)"


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None  # an HTTP date: rare from model servers; the exponential back-off applies


def build(settings: ParticipantSettings) -> HttpChatLearner:
    if settings.http is None:
        raise LearnerError("the http learner needs an [http] table")
    return HttpChatLearner.from_settings(settings.http)
