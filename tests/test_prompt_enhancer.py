"""Prompt enhancement (bernini_core/prompt_enhancer, docs/prompt_enhancer.md): the endpoint backend against a fake
OpenAI-compatible server on 127.0.0.1 (request shape, retries, failures, the key kept out of every output), the
local backend on the tiny full-Bernini planner (chat layout, greedy / seeded decoding, the token cap, answers in the
wrong shape), the node, the CLI, and that nothing opens a network connection unless the endpoint backend runs.

Expected values are written here from the official request layout (official bernini/prompt_enhancer.py
``_build_messages`` / ``_chat`` / ``extract_uniform_frames``) and Qwen2.5-VL's chat format, not read from the code.
"""

import base64
import io
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bernini_core.errors import BerniniError

SENTINEL = "sk-SENTINEL-7f3a9c-never-written"
ENV_NAMES = ("BERNINI_PE_API_KEY", "OPENAI_API_KEY", "BERNINI_PE_BASE_URL", "OPENAI_BASE_URL", "BERNINI_PE_MODEL")
DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES + ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------ the fake endpoint
class FakeEndpoint:
    """An OpenAI-compatible chat-completions server on 127.0.0.1. ``script``: what each request gets, in order —
    ("ok", text), (status, body) or ("sleep", seconds); the last entry repeats. Every request is recorded."""

    def __init__(self):
        self.requests, self.script = [], [("ok", "an enhanced prompt")]
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                endpoint.requests.append({"path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                action = endpoint.script[min(len(endpoint.requests) - 1, len(endpoint.script) - 1)]
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = ("ok", "too late")
                if action[0] == "ok":
                    payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": action[1]}}]})
                    status = 200
                else:
                    status, payload = action
                    # a careless server echoes the credentials it got: they must not reach a log line
                    payload = payload.replace("{auth}", self.headers.get("Authorization", ""))
                data = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(monkeypatch):
    server = FakeEndpoint()
    monkeypatch.setenv("BERNINI_PE_API_KEY", SENTINEL)
    monkeypatch.setenv("BERNINI_PE_BASE_URL", server.url)
    monkeypatch.setenv("BERNINI_PE_MODEL", "fake-vlm-1")
    yield server
    server.close()


def _clients():
    try:
        import openai  # noqa: F401
    except ImportError:
        return ["requests", pytest.param("openai", marks=pytest.mark.skip(reason="openai is not installed"))]
    return ["requests", "openai"]


# ------------------------------------------------------------------------------------------ the socket guard
@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection attempt is recorded and refused."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network use in a test that must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


# ------------------------------------------------------------------------------------------ helpers
def _png_pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _decode_all(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _enhancer_warnings(caplog):
    return [r for r in caplog.records if r.name == "bernini.prompt_enhancer" and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------ endpoint backend
@pytest.mark.parametrize("client", _clients())
def test_endpoint_request_has_the_official_shape(endpoint, media_dir, client, caplog):
    from bernini_core.prompt_enhancer import enhance

    answer = '{"rewritten_text": "Replace the car with the red bike from image0."}'
    endpoint.script = [("ok", f"Sure.\n```json\n{answer}\n```")]
    with caplog.at_level(logging.INFO):
        out = enhance("rv2v", "把车换成自行车", {"video": str(media_dir / "source.mp4"),
                                           "images": [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]},
                      backend="openai", client=client, backoff=0)
    assert out == "Replace the car with the red bike from image0."
    (request,) = endpoint.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {SENTINEL}"
    body = request["body"]
    assert body["model"] == "fake-vlm-1" and body["max_completion_tokens"] == 8192
    assert body["response_format"] == {"type": "json_object"}  # the subject-reference templates want JSON
    system, user = body["messages"]
    assert system == {"role": "system", "content": DEFAULT_SYSTEM}
    assert user["role"] == "user"
    content = user["content"]
    assert content[0]["type"] == "text" and "把车换成自行车" in content[0]["text"]
    assert "rewritten_text" in content[0]["text"] and "image0" in content[0]["text"]
    # 3 frames of the video, then the 2 references, each after its "[Image i]:" label
    assert len(content) == 1 + 2 * 5
    for i in range(5):
        assert content[1 + 2 * i] == {"type": "text", "text": f"\n[Image {i}]:"}
        assert content[2 + 2 * i]["type"] == "image_url"
    pictures = [_png_pixels(content[2 + 2 * i]["image_url"]["url"]) for i in range(5)]
    frames = _decode_all(media_dir / "source.mp4")  # 17 frames: evenly spaced, ends included -> 0, 8, 16
    assert len(frames) == 17
    for picture, index in zip(pictures[:3], (0, 8, 16)):
        np.testing.assert_array_equal(picture, frames[index])
    np.testing.assert_array_equal(pictures[3], np.asarray(Image.open(media_dir / "ref0.png").convert("RGB")))
    np.testing.assert_array_equal(pictures[4], np.asarray(Image.open(media_dir / "ref1.png").convert("RGB")))
    assert SENTINEL not in caplog.text


def test_endpoint_t2v_sends_the_director_system_message_and_the_prompt(endpoint):
    from bernini_core.prompt_enhancer import enhance
    from bernini_core.prompt_enhancer.templates import T2V_SYSTEM

    endpoint.script = [("ok", 'Prompt: "Day time, wide shot. A red fox trots through snow."')]
    out = enhance("t2v", "a red fox", backend="openai", client="requests", backoff=0)
    assert out == "Day time, wide shot. A red fox trots through snow."  # label and quotes dropped
    body = endpoint.requests[0]["body"]
    assert body["messages"][0] == {"role": "system", "content": T2V_SYSTEM}
    assert "60 to 200 words" in T2V_SYSTEM and "English" in T2V_SYSTEM
    assert body["messages"][1]["content"] == [{"type": "text", "text": "a red fox"}]
    assert "response_format" not in body


def test_endpoint_5xx_then_200_is_retried(endpoint, caplog):
    from bernini_core.prompt_enhancer import enhance

    endpoint.script = [(503, '{"error": "busy"}'), (500, "oops"), ("ok", "A fox in snow, wide shot.")]
    out = enhance("t2i", "a fox", backend="openai", client="requests", backoff=0)
    assert out == "A fox in snow, wide shot." and len(endpoint.requests) == 3
    assert not _enhancer_warnings(caplog)


@pytest.mark.parametrize("client", _clients())
def test_endpoint_persistent_failure_gives_the_prompt_and_one_warning(endpoint, client, caplog):
    from bernini_core.prompt_enhancer import enhance

    endpoint.script = [(500, '{"error": "down", "seen": "{auth}"}')]
    with caplog.at_level(logging.DEBUG):
        out = enhance("v2v", "make it snow", backend="openai", client=client, attempts=3, backoff=0)
    assert out == "make it snow" and len(endpoint.requests) == 3
    (warning,) = _enhancer_warnings(caplog)
    assert "3 attempt" in warning.getMessage() and "original prompt" in warning.getMessage()
    assert SENTINEL not in caplog.text  # the echoed "Bearer <key>" is redacted


def test_endpoint_timeout_gives_the_prompt(endpoint, caplog):
    from bernini_core.prompt_enhancer import enhance

    endpoint.script = [("sleep", 1.5)]
    start = time.monotonic()
    out = enhance("t2v", "a fox", backend="openai", client="requests", timeout=0.2, attempts=2, backoff=0)
    assert out == "a fox" and time.monotonic() - start < 1.4
    (warning,) = _enhancer_warnings(caplog)
    assert "within 0.2 s" in warning.getMessage()


def test_endpoint_refusal_is_not_retried(endpoint, caplog):
    from bernini_core.prompt_enhancer import enhance

    endpoint.script = [(401, '{"error": "Incorrect API key provided: {auth}"}')]
    assert enhance("t2v", "a fox", backend="openai", client="requests", backoff=0) == "a fox"
    assert len(endpoint.requests) == 1
    (warning,) = _enhancer_warnings(caplog)
    assert "401" in warning.getMessage() and "API key" in warning.getMessage()
    assert SENTINEL not in caplog.text


def test_endpoint_answer_in_another_shape_falls_back_cleanly(endpoint, caplog):
    from bernini_core.prompt_enhancer import enhance

    endpoint.script = [("ok", "The man from image0 walks his dog along a beach at sunset.")]
    out = enhance("r2v", "he walks the dog", backend="openai", client="requests", backoff=0)
    assert out == "The man from image0 walks his dog along a beach at sunset."  # plain text used as is
    endpoint.script = [("ok", '{"note": 1, "other": 2}')]  # JSON without a prompt: nothing usable
    assert enhance("r2v", "he walks", backend="openai", client="requests", backoff=0) == "he walks"
    endpoint.script = [("ok", "<think>reasoning…</think>\n\n")]
    assert enhance("t2v", "a fox", backend="openai", client="requests", backoff=0) == "a fox"
    assert len(_enhancer_warnings(caplog)) == 2


def test_endpoint_settings_follow_the_official_variables(monkeypatch):
    from bernini_core.prompt_enhancer import endpoint_settings

    with pytest.raises(BerniniError) as err:
        endpoint_settings()
    assert "BERNINI_PE_API_KEY" in str(err.value) and "OPENAI_API_KEY" in str(err.value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    settings = endpoint_settings()
    assert (settings.api_key, settings.base_url, settings.model) == ("sk-openai", "http://127.0.0.1:9/v1",
                                                                       "gpt-5.4-2026-03-05")
    monkeypatch.setenv("BERNINI_PE_API_KEY", SENTINEL)
    monkeypatch.setenv("BERNINI_PE_BASE_URL", "https://user:pw@example.test/v1")
    monkeypatch.setenv("BERNINI_PE_MODEL", "env-model")
    settings = endpoint_settings()
    assert (settings.api_key, settings.key_source, settings.model) == (SENTINEL, "BERNINI_PE_API_KEY", "env-model")
    assert SENTINEL not in repr(settings) and "pw" not in settings.shown_url
    assert endpoint_settings(model="explicit", api_key="k2", base_url="http://h:1/v1").model == "explicit"
    with pytest.raises(BerniniError, match="BERNINI_PE_BASE_URL"):
        monkeypatch.setenv("BERNINI_PE_BASE_URL", "ftp://x")
        endpoint_settings()


@pytest.mark.parametrize("call, fragment", [
    (lambda e: e("t2v", "a fox", backend="ollama"), "backend 'ollama'"),
    (lambda e: e("x2v", "a fox", backend="local"), "task_type 'x2v'"),
    (lambda e: e("t2v", 42, backend="local"), "prompt must be a string"),
    (lambda e: e("t2v", "a fox", backend="local"), "planner= "),
    (lambda e: e("t2v", "a fox", backend="local", folder="/nonexistent/qwen"), "does not exist"),
    (lambda e: e("t2v", "a fox", backend="local", api_key="k"), "do not apply to the local backend"),
    (lambda e: e("t2v", "a fox", backend="openai", api_key="k", timeout=0), "timeout"),
    (lambda e: e("t2v", "a fox", backend="openai", api_key="k", base_url="127.0.0.1:8000"), "http(s)"),
    (lambda e: e("v2v", "a fox", {"videos": ["a.mp4"]}, backend="openai", api_key="k"), "unknown key"),
])
def test_bad_input_is_one_clear_error_before_any_request(no_network, call, fragment):
    from bernini_core.prompt_enhancer import enhance

    with pytest.raises(BerniniError, match=None) as err:
        call(enhance)
    assert fragment in str(err.value)
    assert no_network == []


def test_blank_prompt_comes_back_without_a_request(no_network):
    from bernini_core.prompt_enhancer import enhance

    assert enhance("t2v", "   ", backend="openai", api_key="k", base_url="http://127.0.0.1:9/v1") == "   "
    assert no_network == []


# ------------------------------------------------------------------------------------------ templates, frames
def test_frame_indices_follow_the_official_rule():
    from bernini_core.prompt_enhancer.frames import frame_indices

    assert frame_indices(17, 3) == [0, 8, 16]
    assert frame_indices(81, 3) == [0, 40, 80]
    assert frame_indices(10, 3) == [0, round(4.5), 9]  # Python rounds 4.5 to 4, as the official
    assert frame_indices(2, 3) == [0, 0, 1]
    assert frame_indices(9, 1) == [4] and frame_indices(0, 3) == []


def test_each_task_shows_the_official_pictures():
    from bernini_core.prompt_enhancer import request_for

    video = np.random.default_rng(0).random((9, 20, 24, 3)).astype(np.float32)
    ref = np.full((16, 12, 3), 200, np.uint8)
    other = np.zeros((8, 8, 3), np.uint8)
    sources = {"video": [video, video[:5]], "image": ref, "images": [other]}
    counts = {t: len(request_for(t, "x", sources).images) for t in
              ("t2i", "t2v", "v2v", "mv2v", "i2i", "ads2v", "r2v", "rv2v")}
    assert counts == {"t2i": 0, "t2v": 0, "v2v": 6, "mv2v": 6, "i2i": 2, "ads2v": 6, "r2v": 2, "rv2v": 8}
    request = request_for("rv2v", "x", {"video": video, "images": [ref, other]})
    expected_frame = np.round(video[8] * 255).astype(np.uint8)  # frames 0, 4, 8 of 9
    np.testing.assert_array_equal(request.images[2], expected_frame)
    np.testing.assert_array_equal(request.images[3], ref)
    assert "the next 2 image(s)" in request.user_text and request.json_answer
    assert "1 image(s)" in request_for("r2v", "x", {}).user_text  # at least 1, as the official fills it


@pytest.mark.parametrize("answer, json_answer, expected", [
    ('{"rewritten_text": "A"}', True, "A"),
    ('```json\n{"rewritten_text": " B "}\n```', True, "B"),
    ('Here you go: {"rewritten_text": "C"} Enjoy.', True, "C"),
    ('{"prompt": "D"}', True, "D"),
    ('{"a": 1, "b": 2}', True, None),
    ("Just plain words.", True, "Just plain words."),
    ("<think>hmm</think> Final text.", False, "Final text."),
    ("Enhanced prompt: “E”", False, "E"),
    ("```\nF\n```", False, "F"),
    ("   ", False, None),
    (None, False, None),
])
def test_answers_are_read_in_every_shape(answer, json_answer, expected):
    from bernini_core.prompt_enhancer import parse_answer

    assert parse_answer(answer, json_answer) == expected


# ------------------------------------------------------------------------------------------ local backend
@pytest.fixture(scope="module")
def planner_pipe(tiny_bernini_v1_dir):
    """The tiny full-Bernini pipeline with its planner only (fp32, CPU)."""
    from bernini_core import BerniniPipeline

    return BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32", parts=("planner",))


def _expected_pads(height: int, width: int) -> int:
    """Merged patches of one picture: both sides rounded to 28, the area kept in [3136, 50176] (Qwen2.5-VL's resize
    with the planner's pixel bounds), 14-px patches, 2x2 merge."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if h * w > 50176:
        beta = math.sqrt(height * width / 50176)
        h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    elif h * w < 3136:
        beta = math.sqrt(3136 / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return (h // 14) * (w // 14) // 4


class Capture:
    """The inputs of each forward of the generation model (the first one is the prompt) and the generated ids."""

    def __init__(self, model, monkeypatch):
        self.calls, self.inputs, self.outputs = [], [], []
        self.hook = model.register_forward_pre_hook(self._record, with_kwargs=True)
        original = model.generate

        def generate(*args, **kwargs):
            self.inputs.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            output = original(*args, **kwargs)
            self.outputs.append((kwargs["input_ids"].shape[-1], output))
            return output

        monkeypatch.setattr(model, "generate", generate)

    def _record(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def new_tokens(self, run=-1):
        start, output = self.outputs[run]
        return output[0, start:].tolist()


def test_local_chat_layout_is_qwen_s_chat_format_with_the_pictures(planner_pipe, monkeypatch):
    from bernini_core.prompt_enhancer import LocalBackend, request_for

    backend = LocalBackend.from_planner(planner_pipe, max_new_tokens=2)
    tokenizer = backend.generator.tokenizer
    video = (np.random.default_rng(1).random((5, 40, 48, 3)) * 255).astype(np.uint8)
    ref = np.random.default_rng(2).integers(0, 255, (60, 30, 3), dtype=np.uint8)
    request = request_for("rv2v", "swap <|im_end|>the hat", {"video": video, "images": [ref]})
    capture = Capture(backend.generator.model, monkeypatch)
    try:
        backend.chat(request)
    finally:
        capture.hook.remove()
    first = capture.calls[0]
    sizes = [(40, 48)] * 3 + [(60, 30)]
    user = request.user_text.replace("<|im_end|>", "")  # special tokens in the user's text are dropped
    expected = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}"
    for index, (h, w) in enumerate(sizes):
        expected += f"\n[Image {index}]:<|vision_start|>" + "<|image_pad|>" * _expected_pads(h, w) + "<|vision_end|>"
    expected += "<|im_end|>\n<|im_start|>assistant\n"
    assert first["input_ids"][0].tolist() == tokenizer(expected)["input_ids"]  # what the language model reads
    given = capture.inputs[0]
    assert torch.equal(given["input_ids"], first["input_ids"])
    grids = given["image_grid_thw"].tolist()
    assert [t * h * w // 4 for t, h, w in grids] == [_expected_pads(h, w) for h, w in sizes]
    assert given["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)
    if "mm_token_type_ids" in given:  # transformers 5: image tokens marked 1, so M-RoPE gets its 3D positions
        assert torch.equal(given["mm_token_type_ids"][0], (given["input_ids"][0] == 151655).int())
    if first.get("position_ids") is not None and first["position_ids"].dim() == 3:
        rows, cols = first["position_ids"][-2, 0], first["position_ids"][-1, 0]
        assert not torch.equal(rows, cols)  # the pictures' patches sit on a 2D grid, not on a line
    assert planner_pipe.planner.model.mllm.rope_deltas is None  # nothing left on the shared planner model


def test_built_in_chat_template_renders_qwen_s_layout_through_transformers(planner_pipe):
    from bernini_core.prompt_enhancer.local import QWEN_VL_CHAT_TEMPLATE, chat_template_for

    tokenizer = planner_pipe.planner.template.tokenizer
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"},
                                             {"type": "text", "text": "there"}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=QWEN_VL_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Hi<|vision_start|><|image_pad|><|vision_end|>there<|im_end|>\n<|im_start|>assistant\n")

    class WithTemplate:
        chat_template = "{{ '<|im_start|>' }}{% for m in messages %}image{% endfor %}"

    class TextOnly:
        chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"

    assert chat_template_for(WithTemplate()) == WithTemplate.chat_template  # the folder's own VL template wins
    assert chat_template_for(TextOnly()) == QWEN_VL_CHAT_TEMPLATE  # a text-only template cannot place pictures


def test_local_greedy_is_deterministic_capped_and_seeded_sampling_repeats(planner_pipe, monkeypatch, no_network):
    from bernini_core.prompt_enhancer import LocalBackend, request_for

    request = request_for("t2v", "a red fox")
    greedy = LocalBackend.from_planner(planner_pipe, max_new_tokens=3)
    capture = Capture(greedy.generator.model, monkeypatch)
    try:
        first, second = greedy.chat(request), greedy.chat(request)
        rng_state = torch.get_rng_state()
        sampled = LocalBackend.from_planner(planner_pipe, max_new_tokens=3, seed=2 ** 64 - 7)
        third, fourth = sampled.chat(request), sampled.chat(request)
        assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    finally:
        capture.hook.remove()
    assert first == second and third == fourth
    assert capture.new_tokens(0) == capture.new_tokens(1) and capture.new_tokens(2) == capture.new_tokens(3)
    assert all(len(capture.new_tokens(i)) <= 3 for i in range(4))
    assert sum(1 for call in capture.calls) <= 4 * 3  # one forward per new token at most
    tokenizer = greedy.generator.tokenizer
    assert first == tokenizer.decode(capture.new_tokens(0), skip_special_tokens=True)
    assert no_network == []  # the local backend never opens a connection


def test_local_json_template_with_another_answer_falls_back_cleanly(planner_pipe, monkeypatch, caplog):
    from bernini_core.prompt_enhancer import LocalBackend, enhance, parse_answer, request_for

    backend = LocalBackend.from_planner(planner_pipe, max_new_tokens=4)
    request = request_for("r2v", "the dog runs", {"images": [np.zeros((32, 32, 3), np.uint8)]})
    raw = backend.chat(request)  # random weights: certainly not the JSON object
    with caplog.at_level(logging.INFO):
        out = enhance("r2v", "the dog runs", {"images": [np.zeros((32, 32, 3), np.uint8)]}, backend=backend)
    assert isinstance(out, str) and out == (parse_answer(raw, True) or "the dog runs")
    assert "not the JSON object" in caplog.text or not raw.strip()
    monkeypatch.setattr(backend, "chat", lambda request: "")  # an empty answer: the prompt, one warning
    caplog.clear()
    assert enhance("r2v", "the dog runs", backend=backend) == "the dog runs"
    assert len(_enhancer_warnings(caplog)) == 1


def test_a_qwen_folder_loads_with_its_head_and_answers_as_the_planner_does(planner_pipe, tiny_bernini_v1_dir,
                                                                            tmp_path):
    """A plain Qwen2.5-VL folder (HF layout) written from the tiny checkpoint's mllm.* tensors: the same weights
    give the same greedy answer as the planner-backed backend."""
    import shutil

    from safetensors.torch import save_file

    from bernini_core.checkpoints import TensorSource
    from bernini_core.prompt_enhancer import make_backend, request_for

    qwen = tmp_path / "Qwen2.5-VL-tiny"
    shutil.copytree(Path(tiny_bernini_v1_dir) / "mllm", qwen)
    source = TensorSource.open(Path(tiny_bernini_v1_dir) / "bernini", prefix="mllm.")
    save_file({k: source.get(k) for k in source.keys()}, str(qwen / "model.safetensors"))
    request = request_for("t2v", "a red fox")
    from_folder = make_backend("local", folder=qwen, device="cpu", dtype="fp32", max_new_tokens=3)
    from_planner = make_backend("local", planner=planner_pipe, max_new_tokens=3)
    assert from_folder.generator.model.lm_head.weight is from_folder.generator.model.get_input_embeddings().weight
    assert from_folder.chat(request) == from_planner.chat(request)


def test_an_untied_head_is_read_from_the_folder_as_its_own_module(tiny_bernini_v1_dir, tmp_path):
    """The 7B planner's lm_head is untied: it is read from mllm.lm_head.weight of the combined checkpoint (a copy of
    the tiny folder with one more shard holding it), and without the folder the error says what to pass."""
    from safetensors.torch import save_file

    from bernini_core.prompt_enhancer.local import _planner_head

    root = tmp_path / "Bernini-Diffusers"
    (root / "bernini").mkdir(parents=True)
    tiny = Path(tiny_bernini_v1_dir)
    (root / "config.json").symlink_to(tiny / "config.json")
    index = json.loads((tiny / "bernini" / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        (root / "bernini" / shard).symlink_to(tiny / "bernini" / shard)
    head = torch.randn(300, 8)
    save_file({"mllm.lm_head.weight": head}, str(root / "bernini" / "head.safetensors"))
    index["weight_map"]["mllm.lm_head.weight"] = "head.safetensors"
    (root / "bernini" / "model.safetensors.index.json").write_text(json.dumps(index))

    class Config:
        tie_word_embeddings = False

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.embed = torch.nn.Embedding(300, 8)

        def get_input_embeddings(self):
            return self.embed

    module, own = _planner_head(Stub(), root)
    assert own and torch.equal(module.weight, head) and module.weight.dtype == torch.float32
    with pytest.raises(BerniniError, match="folder="):
        _planner_head(Stub(), None)


# ------------------------------------------------------------------------------------------ node
def _load_pack(name):
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _unload_pack(name)
        raise
    return module


def _unload_pack(name):
    import sys

    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        sys.modules.pop(key)


def test_node_shows_the_text_and_runs_the_planner_under_its_comfyui_handle(planner_pipe, comfy, no_network):
    from bernini_core import comfy_bridge, node_api
    from bernini_core.node_models import PlannerModel

    name = "custom_nodes_x_ComfyUI-Bernini_pe_node"
    try:
        BerniniEnhancePrompt = _load_pack(name).NODE_CLASS_MAPPINGS["BerniniEnhancePrompt"]
    finally:
        _unload_pack(name)

    bundle = planner_pipe.planner
    planner = PlannerModel(bundle=bundle, version=bundle.version, dtype=torch.float32, name="")
    frames = torch.rand(5, 32, 32, 3)
    result = BerniniEnhancePrompt().enhance("v2v", "make it snow", "local", 2, False, 0, planner=planner,
                                            source_video=frames)
    (text,) = result["result"]
    assert result["ui"] == {"text": [text]} and isinstance(text, str)
    # the planning stage's patcher (handles live on the module): ComfyUI loaded exactly that one
    handle = comfy_bridge.runtime().handle("planner", bundle.model)
    assert comfy.rec.loads and all(loaded == [handle.patcher] for loaded in comfy.rec.loads)
    with pytest.raises(BerniniError, match="connect the planner"):
        node_api.enhance_prompt("t2v", "a fox", "local")
    with pytest.raises(BerniniError, match="BERNINI_PE_API_KEY"):
        node_api.enhance_prompt("t2v", "a fox", "openai")
    assert no_network == []


def test_nothing_touches_the_network_while_the_node_is_unused(no_network):
    name = "custom_nodes_x_ComfyUI-Bernini_pe_guard"
    try:
        module = _load_pack(name)
        for cls in module.NODE_CLASS_MAPPINGS.values():
            cls.INPUT_TYPES()
        assert "BerniniEnhancePrompt" in module.NODE_CLASS_MAPPINGS
    finally:
        _unload_pack(name)
    assert no_network == []


# ------------------------------------------------------------------------------------------ CLI
SMALL = ["--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "2"]


def test_cli_use_pe_prints_and_saves_the_prompt_and_never_the_key(endpoint, tiny_renderer_dir, tmp_path, capsys,
                                                                  caplog):
    from safetensors import safe_open

    from bernini_core.cli import main

    endpoint.script = [("ok", "Day time, wide shot. A red fox trots through deep snow.")]
    out_dir = tmp_path / "out"
    argv = ["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox", *SMALL,
            "--output", str(out_dir / "fox.mp4"), "--use_pe", "--save_latents", str(out_dir / "fox.safetensors")]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
        assert main(argv) == 0  # a second run: nothing is overwritten
    printed = capsys.readouterr()
    txt = out_dir / "fox.prompt.txt"
    assert txt.read_text(encoding="utf-8") == "Day time, wide shot. A red fox trots through deep snow.\n"
    assert (out_dir / "fox_00001.prompt.txt").is_file()
    assert str(txt) in printed.out.splitlines()
    assert "A red fox trots through deep snow" in caplog.text  # the enhanced prompt is logged
    with safe_open(str(out_dir / "fox.safetensors"), "pt") as handle:
        settings = json.loads(handle.metadata()["bernini_settings"])
    assert settings["prompt_enhancer"] == {"backend": "openai", "original_prompt": "a fox", "enhanced": True,
                                           "prompt": "Day time, wide shot. A red fox trots through deep snow."}
    assert len(endpoint.requests) == 2
    # the key: in no file written, no stdout / stderr line, no log record
    for path in out_dir.rglob("*"):
        assert SENTINEL.encode() not in path.read_bytes(), path
    assert SENTINEL not in printed.out + printed.err + caplog.text


def test_prompt_file_is_never_written_over_another(tmp_path):
    from bernini_core.prompt_enhancer.cli import write_prompt_file

    output = tmp_path / "clip.mp4"
    first = write_prompt_file(output, "one")
    second = write_prompt_file(output, "two")
    assert (first.name, second.name) == ("clip.prompt.txt", "clip.prompt_00001.txt")
    assert first.read_text() == "one\n" and second.read_text() == "two\n"
    assert write_prompt_file(output, "three", overwrite=True) == first and first.read_text() == "three\n"


@pytest.mark.parametrize("extra, fragment", [
    (["--use_pe"], "BERNINI_PE_API_KEY"),
    (["--use_pe", "--pe_backend", "local"], "--pe_local_model"),
    (["--use_pe", "--pe_backend", "local", "--pe_local_model", "/nonexistent/qwen"], "does not exist"),
])
def test_cli_pe_flags_are_checked_before_the_model_loads(tiny_renderer_dir, capsys, no_network, extra, fragment):
    from bernini_core.cli import main

    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "a fox", "--task_type", "t2v", *SMALL,
                 *extra]) == 2
    assert fragment in capsys.readouterr().err
    assert no_network == []
