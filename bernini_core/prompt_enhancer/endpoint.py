"""The endpoint backend: an OpenAI-compatible chat-completions service, as the official ``--use_pe`` uses it
(official ``bernini/prompt_enhancer.py`` ``PromptEnhancer.__init__`` / ``_chat`` / ``_build_messages``;
docs/prompt_enhancer.md §4).

Settings come from the official environment variables or from arguments, never from a file: the key is held in
memory only, kept out of every log line and error message (``_redact``), and no file is written here. The request
goes through the ``openai`` package when it is installed (the optional ``[pe]`` extra), else through ``requests``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from ..errors import BerniniError
from .frames import describe, png_base64
from .templates import EnhanceRequest

log = logging.getLogger("bernini.prompt_enhancer")

KEY_VARIABLES = ("BERNINI_PE_API_KEY", "OPENAI_API_KEY")  # official order: the Bernini one first
URL_VARIABLES = ("BERNINI_PE_BASE_URL", "OPENAI_BASE_URL")
MODEL_VARIABLE = "BERNINI_PE_MODEL"
DEFAULT_MODEL = "gpt-5.4-2026-03-05"  # official DEFAULT_MODEL
DEFAULT_BASE_URL = "https://api.openai.com/v1"  # what the openai package uses when no base URL is set
MAX_ATTEMPTS = 8  # official MAX_RETRIES (attempts in all)
MAX_COMPLETION_TOKENS = 8192  # official max_completion_tokens
DEFAULT_TIMEOUT_S = 120.0
CLIENTS = ("auto", "openai", "requests")
_RETRIED_STATUS = {408, 409, 429}  # and every 5xx: the service may answer next time


class EnhanceFailed(Exception):
    """The backend gave no answer (the caller keeps the user's prompt and warns once). The message is redacted."""


@dataclass(frozen=True)
class EndpointSettings:
    """Where and what to ask. ``api_key`` never appears in repr() or in any message."""

    base_url: str
    model: str
    api_key: str = field(repr=False)
    key_source: str = "argument"  # the variable the key came from, or "argument"

    @property
    def shown_url(self) -> str:
        """The base URL without user:password@ (a URL may carry credentials)."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def endpoint_settings(model: Optional[str] = None, api_key: Optional[str] = None, base_url: Optional[str] = None,
                      env: Optional[Mapping[str, str]] = None) -> EndpointSettings:
    """The settings the official enhancer reads: each argument, else its environment variable(s) in the official
    order, else the default (no key: a BerniniError naming the variables)."""
    env = os.environ if env is None else env

    def first(names):
        for name in names:
            value = (env.get(name) or "").strip()
            if value:
                return value, name
        return None, None

    key_source = "argument"
    if api_key is None or not str(api_key).strip():
        api_key, key_source = first(KEY_VARIABLES)
    if not api_key:
        raise BerniniError("prompt enhancer (openai backend): no API key; set BERNINI_PE_API_KEY (or OPENAI_API_KEY) "
                           "in the environment ComfyUI / the CLI runs in. A local server that needs no key takes any "
                           "value, e.g. BERNINI_PE_API_KEY=none. Or use the local backend, which needs neither key "
                           "nor network.")
    url_source = "base_url"
    if base_url is None or not str(base_url).strip():
        base_url, url_source = first(URL_VARIABLES)
    base_url = (base_url or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        where = url_source or "the default"
        raise BerniniError(f"prompt enhancer: base URL {base_url!r} (from {where}) is not an http(s) URL; give one "
                           "such as https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model = (model or "").strip() or (env.get(MODEL_VARIABLE) or "").strip() or DEFAULT_MODEL
    return EndpointSettings(base_url=base_url, model=model, api_key=str(api_key).strip(), key_source=key_source)


def _redact(text, key: str, limit: int = 300) -> str:
    """An error text fit for a log line: the key (and any bearer token) replaced, one line, at most `limit` chars."""
    text = " ".join(str(text).split())
    if key:
        text = text.replace(key, "***")
    words = text.split(" ")
    text = " ".join("***" if i and words[i - 1].lower() == "bearer" else w for i, w in enumerate(words))
    return text if len(text) <= limit else text[:limit] + "…"


def chat_messages(request: EnhanceRequest) -> list[dict]:
    """The official message layout: the system message, then one user message whose content is the text, then for
    each picture a "\\n[Image i]:" text part and the picture as a PNG data URL (``_build_messages``)."""
    content = [{"type": "text", "text": request.user_text}]
    for index, picture in enumerate(request.images):
        content.append({"type": "text", "text": f"\n[Image {index}]:"})
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(picture)}})
    return [{"role": "system", "content": request.system}, {"role": "user", "content": content}]


class _Retry(Exception):
    """A failure worth another attempt (no answer, a timeout, 408/409/429/5xx, an answer of the wrong shape)."""


class EndpointBackend:
    """Asks an OpenAI-compatible endpoint; ``chat`` returns the answer text or raises EnhanceFailed after
    ``attempts`` tries (back-off ``backoff`` × min(attempt, 5) seconds between them, as the official sleeps), each
    bounded by ``timeout`` seconds. A 4xx other than 408/409/429 (a wrong key, an unknown model) is not retried."""

    name = "openai"

    def __init__(self, settings: Optional[EndpointSettings] = None, *, model: Optional[str] = None,
                 api_key: Optional[str] = None, base_url: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S,
                 attempts: int = MAX_ATTEMPTS, backoff: float = 1.0, client: str = "auto",
                 max_completion_tokens: int = MAX_COMPLETION_TOKENS):
        self.settings = settings or endpoint_settings(model=model, api_key=api_key, base_url=base_url)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise BerniniError(f"prompt enhancer: timeout {timeout!r} must be a positive number of seconds.")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise BerniniError(f"prompt enhancer: attempts {attempts!r} must be a whole number of at least 1.")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not math.isfinite(backoff) \
                or backoff < 0:
            raise BerniniError(f"prompt enhancer: backoff {backoff!r} must be a number of seconds ≥ 0.")
        if client not in CLIENTS:
            raise BerniniError(f"prompt enhancer: client {client!r} must be one of {', '.join(CLIENTS)}.")
        self.timeout, self.attempts, self.backoff = float(timeout), attempts, float(backoff)
        self.client = _pick_client(client)
        self.max_completion_tokens = int(max_completion_tokens)

    def describe(self) -> str:
        return f"{self.settings.shown_url} (model {self.settings.model})"

    def payload(self, request: EnhanceRequest) -> dict:
        """The request body: model, messages, max_completion_tokens, and the JSON response format where the
        template asks for the JSON object (official ``_chat``)."""
        body = {"model": self.settings.model, "messages": chat_messages(request),
                "max_completion_tokens": self.max_completion_tokens}
        if request.json_answer:
            body["response_format"] = {"type": "json_object"}
        return body

    def chat(self, request: EnhanceRequest) -> str:
        body = self.payload(request)
        log.info("prompt enhancer: asking %s with %s", self.describe(), describe(request.images))
        send = self._send_openai if self.client == "openai" else self._send_requests
        last = "no attempt"
        for attempt in range(1, self.attempts + 1):
            try:
                return send(body)
            except _Retry as exc:
                last = str(exc)
                log.debug("prompt enhancer: attempt %d/%d failed: %s", attempt, self.attempts, last)
            if attempt < self.attempts and self.backoff:
                time.sleep(self.backoff * min(attempt, 5))
        raise EnhanceFailed(f"{self.describe()} gave no answer in {self.attempts} attempt(s) (last: {last})")

    # ------------------------------------------------------------------ clients
    def _failure(self, status: Optional[int], detail) -> Exception:
        detail = _redact(detail, self.settings.api_key)
        if status is None or status in _RETRIED_STATUS or status >= 500:
            return _Retry(f"HTTP {status}: {detail}" if status else detail)
        hint = " (check the API key)" if status in (401, 403) else " (check the model name)" if status == 404 else ""
        return EnhanceFailed(f"{self.describe()} refused the request: HTTP {status}{hint}: {detail}")

    def _send_requests(self, body: dict) -> str:
        import requests

        url = self.settings.base_url + "/chat/completions"
        headers = {"Authorization": f"Bearer {self.settings.api_key}", "Content-Type": "application/json"}
        try:
            response = requests.post(url, json=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            raise _Retry(f"no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise _Retry(_redact(f"connection failed: {type(exc).__name__}", self.settings.api_key)) from None
        if response.status_code >= 400:
            raise self._failure(response.status_code, response.text[:500])
        try:
            return _content(response.json())
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("the answer is not a chat completion") from None

    def _send_openai(self, body: dict) -> str:
        import openai

        # no retries inside the client: the loop in chat() is the one retry policy
        client = openai.OpenAI(api_key=self.settings.api_key, base_url=self.settings.base_url, max_retries=0,
                               timeout=self.timeout)
        try:
            with client:
                completion = client.chat.completions.create(**body)
        except openai.APITimeoutError:
            raise _Retry(f"no answer within {self.timeout:g} s") from None
        except openai.APIConnectionError as exc:
            raise _Retry(_redact(f"connection failed: {type(exc).__name__}", self.settings.api_key)) from None
        except openai.APIStatusError as exc:
            raise self._failure(exc.status_code, getattr(exc, "message", "") or "") from None
        except openai.OpenAIError as exc:
            raise _Retry(_redact(f"{type(exc).__name__}: {exc}", self.settings.api_key)) from None
        try:
            return completion.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise _Retry("the answer is not a chat completion") from None


def _content(data) -> str:
    message = data["choices"][0]["message"]
    content = message.get("content")
    if isinstance(content, list):  # some servers answer in parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _pick_client(client: str) -> str:
    """"openai" when asked for or installed (auto), else "requests"."""
    if client == "auto":
        try:
            import openai  # noqa: F401
        except ImportError:
            return "requests"
        return "openai"
    if client == "openai":
        try:
            import openai  # noqa: F401
        except ImportError:
            raise BerniniError("prompt enhancer: client 'openai' needs the openai package: pip install "
                               "'bernini[pe]' (or openai), or use client 'requests'.") from None
    return client
