"""The HTTP learner against a real OpenAI-compatible server on localhost serving a tiny in-process model."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from support.chat_server import ChatServer, Reply, Stall, Trickle
from support.coordinators import memory_coordinator
from support.tiny_models import PRIVATE, coordinator_config, tiny_participant

from broker.memory import MemoryBroker
from broker.topology import DEAD_LETTER_QUEUE, full_topology
from common.embedding import HashingEmbedder
from participant.generation import generate_answers
from participant.http_learner import HttpChatLearner, HttpLearnerError
from participant.learner import LearnerError, trainer
from participant.models import LocalModel, load_model
from participant.service import Participant
from participant.settings import HttpTable, SettingsError, load_participant_settings
from participant.wiring import build_learner
from schemas.codec import decode_generation
from schemas.messages import GenerationParams

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPTS = [("p1", "first prompt"), ("p2", "second"), ("p3", "the third prompt")]
PARAMS = GenerationParams(max_new_tokens=6, temperature=0.0, top_p=0.9, seed=3)
# A chat completion whose unknown field nests 200,000 arrays deep: past any recursive decoder's stack.
DEEP = b'{"choices": [{"message": {"content": "hi"}}], "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama() -> LocalModel:
    return load_model("tiny-llama")


@pytest.fixture
def server(tiny_llama: LocalModel) -> Iterator[ChatServer]:
    with ChatServer(tiny_llama) as running:
        yield running


def learner_for(base_url: str, api_key: str | None = None, **table: float) -> HttpChatLearner:
    """Short timeouts and back-off, so that failing tests take well under a second."""
    settings: dict[str, float] = {
        "read_timeout_seconds": 5.0,
        "retries": 2,
        "backoff_seconds": 0.05,
        "max_backoff_seconds": 0.2,
    }
    return HttpChatLearner(HttpTable(base_url=base_url, model="tiny", **(settings | table)), api_key)  # type: ignore[arg-type]


def test_answers_come_from_the_model_behind_the_endpoint(server: ChatServer, tiny_llama: LocalModel) -> None:
    learner = learner_for(server.base_url)
    answers = learner.generate(PROMPTS, PARAMS)
    expected = generate_answers(tiny_llama, PROMPTS, PARAMS, batch_size=1)  # one prompt a request, as served
    assert [(a.prompt_id, a.text) for a in answers] == [(e.prompt_id, e.text) for e in expected]
    # the server's usage is passed on, so the coordinator sees token counts
    assert [a.completion_tokens for a in answers] == [e.completion_tokens for e in expected]
    assert all(a.prompt_tokens > 0 for a in answers)
    # Requests run concurrently, so the server may see them in any order.
    [first] = [r for r in server.requests if r["messages"] == [{"role": "user", "content": "first prompt"}]]
    assert first["model"] == "tiny"
    assert (first["max_tokens"], first["temperature"], first["top_p"], first["seed"]) == (6, 0.0, 0.9, 3)
    assert server.authorizations == [None, None, None]  # no key configured, none sent
    assert trainer(learner) is None  # what the participant service sees: a black box that cannot train


def test_requests_in_flight_never_exceed_max_concurrency(tiny_llama: LocalModel) -> None:
    prompts = [(f"p{i}", f"prompt number {i}") for i in range(8)]
    with ChatServer(tiny_llama, delay_seconds=0.15) as server:
        answers = learner_for(server.base_url, max_concurrency=3).generate(prompts, PARAMS)
    assert [a.prompt_id for a in answers] == [p for p, _ in prompts]
    assert len(server.requests) == 8
    assert server.max_in_flight == 3  # overlapping (the delay), and never more than the limit


def test_a_stalling_server_is_retried_then_fails_clearly_in_bounded_time(server: ChatServer) -> None:
    server.default = Stall(3.0)
    learner = learner_for(server.base_url, read_timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(HttpLearnerError) as caught:
        learner.generate(PROMPTS[:1], PARAMS)
    # three attempts of 0.3 s and back-offs of 0.05 s and 0.1 s, far below the server's 3 s stall
    assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert f"{server.base_url}/chat/completions failed on prompt 'p1'" in message
    assert "no response within the read timeout of 0.3s; gave up after 3 attempts" in message
    assert caught.value.attempts == 3 and len(server.requests) == 3


@pytest.mark.parametrize("headers_first", [False, True], ids=["status-line", "body"])
def test_a_trickling_server_is_cut_at_the_documented_bound(server: ChatServer, headers_first: bool) -> None:
    """A byte every 0.05 s is never a read timeout's silence; the whole answer would take 10 s. Each
    attempt is cut at connect + read timeout, so the prompt fails within the README's bound:
    (retries + 1) x (connect + read timeout) plus the back-offs = 2 x 0.8 + 0.05 = 1.65 s."""
    answer = b'{"choices": [{"message": {"content": "' + b"a" * 150 + b'"}}]}'
    server.default = Trickle(Reply(200, answer), seconds_per_byte=0.05, headers_first=headers_first)
    learner = learner_for(server.base_url, connect_timeout_seconds=0.3, read_timeout_seconds=0.5, retries=1)
    started = time.monotonic()
    with pytest.raises(HttpLearnerError) as caught:
        learner.generate(PROMPTS[:1], PARAMS)
    elapsed = time.monotonic() - started
    assert 1.6 <= elapsed < 1.65 + 0.5  # the deadline cut both attempts, not a read timeout or the end
    message = str(caught.value)
    assert "no complete answer within 0.8s (connect_timeout_seconds + read_timeout_seconds)" in message
    assert "gave up after 2 attempts" in message and len(server.requests) == 2


def test_a_server_that_answers_in_time_is_not_cut(tiny_llama: LocalModel) -> None:
    with ChatServer(tiny_llama, delay_seconds=0.3) as server:  # well inside the 0.6 s deadline
        [answer] = learner_for(
            server.base_url, connect_timeout_seconds=0.1, read_timeout_seconds=0.5, retries=0
        ).generate(PROMPTS[:1], PARAMS)
    assert answer.prompt_id == "p1" and len(server.requests) == 1


@pytest.mark.parametrize(
    ("reply", "problem", "attempts"),
    [
        (Reply(200, DEEP), r"HTTP 200 but not a chat completion \(JSON nested too deep\)", 1),
        (Reply(200, b"[" * 200_000), r"HTTP 200 but not a chat completion \(Expected `object`", 1),
        (Reply(500, b'{"error": ' + DEEP + b"}"), r"HTTP 500 Internal Server Error: '\{\"error\"", 3),
    ],
    ids=["in-an-answer", "truncated", "in-an-error"],
)
def test_deeply_nested_json_is_a_clear_error(
    server: ChatServer, reply: Reply, problem: str, attempts: int
) -> None:
    server.default = reply
    with pytest.raises(HttpLearnerError, match=problem) as caught:
        learner_for(server.base_url).generate(PROMPTS[:1], PARAMS)
    assert f"{server.base_url}/chat/completions" in str(caught.value)
    assert caught.value.attempts == attempts and len(server.requests) == attempts


def test_a_refused_connection_names_the_url_and_the_attempts() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(HttpLearnerError, match=rf"{url}/chat/completions failed on prompt 'p1': connection "
                       r"refused \(is the server running.*gave up after 3 attempts"):  # fmt: skip
        learner_for(url).generate(PROMPTS[:1], PARAMS)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>upstream hiccup</html>", r"not a chat completion \(JSON is malformed"),
        (b'{"object": "chat.completion", "model": "tiny"}', r"missing required field `choices`"),
        (b'{"choices": []}', r"Expected `array` of length >= 1"),
        (b'{"choices": [{"message": {"role": "assistant"}}]}', r"choices\[0\]\.message\.content is null"),
    ],
)
def test_garbage_from_the_server_is_a_clear_error_and_not_retried(
    server: ChatServer, body: bytes, problem: str
) -> None:
    server.default = Reply(200, body)
    with pytest.raises(HttpLearnerError, match=problem) as caught:
        learner_for(server.base_url).generate(PROMPTS[:1], PARAMS)
    assert f"{server.base_url}/chat/completions answered prompt 'p1' with HTTP 200" in str(caught.value)
    assert caught.value.attempts == 1 and len(server.requests) == 1


def test_server_errors_are_retried_until_the_model_answers(
    server: ChatServer, tiny_llama: LocalModel
) -> None:
    server.script.extend(
        [
            Reply(500, b'{"error": {"message": "loading model"}}'),
            Reply(429, b"slow down", {"Retry-After": "0.1"}),
            Reply(503, b""),
        ]
    )
    [answer] = learner_for(server.base_url, retries=3).generate(PROMPTS[:1], PARAMS)
    assert answer.text == generate_answers(tiny_llama, PROMPTS[:1], PARAMS)[0].text
    assert len(server.requests) == 4


def test_server_errors_past_the_retries_give_up_with_the_last_status(server: ChatServer) -> None:
    server.default = Reply(502, b'{"error": {"message": "bad gateway upstream"}}')
    with pytest.raises(
        HttpLearnerError, match=r"HTTP 502 Bad Gateway: 'bad gateway upstream'; gave up after 2"
    ):
        learner_for(server.base_url, retries=1).generate(PROMPTS[:1], PARAMS)


def test_a_refused_key_is_not_retried(tiny_llama: LocalModel) -> None:
    with ChatServer(tiny_llama, api_key="sk-right") as server:
        with pytest.raises(HttpLearnerError) as caught:
            learner_for(server.base_url, api_key="sk-wrong").generate(PROMPTS[:1], PARAMS)
        assert len(server.requests) == 1
    message = str(caught.value)
    assert "HTTP 401 Unauthorized: 'invalid api key' (check the API key" in message
    assert "not retried (attempt 1 of 3)" in message
    assert "sk-wrong" not in message and caught.value.status == 401


def write_settings(tmp_path: Path, body: str, name: str = "box") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'federation = "t"\nparticipant_id = "{name}"\nstate_dir = "{name}"\n' + body)
    return path


def test_the_key_comes_from_the_named_environment_variable(
    tiny_llama: LocalModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ChatServer(tiny_llama, api_key="sk-from-env") as server:
        config = write_settings(
            tmp_path,
            f'[http]\nbase_url = "{server.base_url}"\nmodel = "tiny"\napi_key_env = "CHORUS_TEST_KEY"\n',
        )
        settings = load_participant_settings(config, env={})
        monkeypatch.delenv("CHORUS_TEST_KEY", raising=False)
        with pytest.raises(LearnerError, match="api_key_env names CHORUS_TEST_KEY, but that environment"):
            build_learner(settings)
        monkeypatch.setenv("CHORUS_TEST_KEY", "sk-from-env")
        learner = build_learner(settings)
        [answer] = learner.generate(PROMPTS[:1], PARAMS)
    assert server.authorizations == ["Bearer sk-from-env"]
    assert learner.model_id == "tiny" and answer.prompt_id == "p1"


def test_http_settings_are_validated_on_load(tmp_path: Path) -> None:
    http = '[http]\nbase_url = "http://127.0.0.1:8080/v1"\nmodel = "m"\n'
    loaded = load_participant_settings(write_settings(tmp_path, http), env={}).http
    assert loaded is not None and (loaded.retries, loaded.max_concurrency, loaded.api_key_env) == (3, 4, None)
    bad = {
        'command = ["ollama", "run", "x"]\n' + http: "either command or \\[http\\]",
        'model = "tiny-llama"\n' + http: "remove model \\(a local model's training setup\\)",
        http + "[train]\nrank = 4\n": "remove train",
        http + 'api_key = "sk-secret"\n': "takes no api_key; put the key in an environment variable",
        http.replace("http://", "ftp://"): "base_url",
        http + "max_concurrency = 0\n": "max_concurrency",
        http + 'api_key_env = "sk-not-a-name!"\n': "api_key_env",
        http.replace('model = "m"\n', ""): "missing required field `model`",
    }
    for text, problem in bad.items():
        with pytest.raises(SettingsError, match=problem):
            load_participant_settings(write_settings(tmp_path, text), env={})


def test_the_shipped_http_example_loads() -> None:
    settings = load_participant_settings(EXAMPLES / "participant_http.toml", env={})
    assert settings.http is not None and settings.command is None
    assert settings.http.base_url == "http://127.0.0.1:8080/v1"
    assert settings.http.api_key_env == "OPENAI_API_KEY"
    learner = HttpChatLearner(settings.http)  # building opens nothing: no server needed
    assert learner.url == "http://127.0.0.1:8080/v1/chat/completions"


async def test_a_participant_on_the_http_learner_takes_part_in_a_real_round(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["llama", "box"]))
    coordinator = memory_coordinator(coordinator_config(tmp_path, rounds=1), broker)
    llama = tiny_participant(broker.connect("llama"), tmp_path, "llama", "tiny-llama")
    gpt2 = load_model("tiny-gpt2")
    with ChatServer(gpt2) as server:
        config = write_settings(tmp_path, f'[http]\nbase_url = "{server.base_url}"\nmodel = "tiny-gpt2"\n')
        settings = load_participant_settings(config, env={})
        box = Participant(
            settings,
            broker.connect("box"),
            build_learner(settings),
            test=PRIVATE[:2],
            embed=HashingEmbedder().embed,
        )
        await coordinator.start()
        runs = [asyncio.create_task(p.run_until(rounds=1)) for p in (llama, box)]
        await asyncio.wait_for(coordinator.drive(), 60)
        await asyncio.wait_for(asyncio.gather(*runs), 60)
        await coordinator.stop_intake()
    (summary,) = coordinator.closed_rounds
    assert summary.answered == ["box", "llama"]
    sent = [
        decode_generation(row.body) for row in coordinator.store.batches(1) if row.participant_id == "box"
    ]
    answers = [(a.prompt_id, a.text) for batch in sent for a in batch.answers]
    asked = [r["messages"][0]["content"] for r in server.requests[: len(answers)]]
    assert len(answers) == 4 and all(batch.model_id == "tiny-gpt2" for batch in sent)
    generation = GenerationParams(max_new_tokens=6)  # what coordinator_config sends
    expected = generate_answers(gpt2, [(str(i), prompt) for i, prompt in enumerate(asked)], generation)
    assert sorted(text for _, text in answers) == sorted(e.text for e in expected)
    assert len(server.requests) == 4 + 2  # the round's prompts, then the two held-out test prompts
    assert box.rounds_done == [1] and {"rouge_l", "embedding_similarity"} <= box.reports[0].metrics.keys()


@pytest.mark.parametrize(
    ("failure", "logged"),
    [
        (Reply(503, b'{"error": {"message": "model loading"}}'), "503"),
        (Reply(200, DEEP), "JSON nested too deep"),
    ],
    ids=["down", "deep-json"],
)
async def test_an_endpoint_down_for_a_round_costs_that_round_only(
    tmp_path: Path, tiny_llama: LocalModel, failure: Reply, logged: str
) -> None:
    """The learner's own retries are all a round gets: the RoundOpened is handled (no redelivery that would
    repeat the whole wait), the round closes at its deadline without the box, which keeps serving and
    answers the next round once its endpoint is back. So too when the endpoint answers with JSON too
    deep to decode (once a RecursionError that redelivered each announcement six times)."""
    broker = MemoryBroker()
    broker.declare(full_topology(["steady", "box"]))
    config = coordinator_config(tmp_path, rounds=2)
    config.write_text(config.read_text().replace("deadline_seconds = 60.0", "deadline_seconds = 4.0"))
    coordinator = memory_coordinator(config, broker)
    with ChatServer(tiny_llama) as healthy, ChatServer(load_model("tiny-gpt2")) as flaky:
        flaky.script.append(failure)  # retries 0: one request
        participants = []
        for name, server in (("steady", healthy), ("box", flaky)):
            http = (
                f'[http]\nbase_url = "{server.base_url}"\nmodel = "m"\nretries = 0\nmax_concurrency = 1\n'
                "connect_timeout_seconds = 0.5\nread_timeout_seconds = 1.0\n"
            )
            settings = load_participant_settings(write_settings(tmp_path, http, name), env={})
            participants.append(Participant(settings, broker.connect(name), build_learner(settings)))
        with capture_logs() as logs:
            await coordinator.start()
            runs = [asyncio.create_task(p.run_until(rounds=2)) for p in participants]
            await asyncio.wait_for(coordinator.drive(), 30)
            await asyncio.wait_for(asyncio.gather(*runs), 30)
            await coordinator.stop_intake()
    assert [s.answered for s in coordinator.closed_rounds] == [["steady"], ["box", "steady"]]
    assert not [e for e in logs if e["event"] == "handler failed; requeueing"]
    (missed,) = [e for e in logs if e["event"] == "round_not_answered"]
    assert missed["round"] == 1 and missed["participant"] == "box" and logged in missed["error"]
    assert len(flaky.requests) == 1 + 4  # round 1's one failure, then round 2's four prompts
    assert broker.queue_depth(DEAD_LETTER_QUEUE) == 0
    box = participants[1]
    assert box.rounds_done == [1, 2]  # it still applied round 1's close (nothing to train) and reported
