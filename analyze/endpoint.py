"""A chat model behind an OpenAI-compatible HTTP endpoint (vLLM, llama.cpp's server, Ollama, a
hosted API): POST ``<base>/chat/completions``, the answer's first choice back as text.

Only the standard library: autointerp is optional, and nothing here is imported, let alone
contacted, unless a user names an endpoint. The key comes from the environment (never a flag,
so it stays out of shell histories and of the records written beside the scores).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class EndpointError(ValueError):
    """An endpoint that cannot be used: unreachable, a rejected key, an answer of another shape."""


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait: a number of seconds or an HTTP date; None if
    absent or unreadable (then the client's own backoff decides)."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff(retry: int) -> float:
    """The wait before retry ``retry + 1`` when the server says nothing: 1, 2, 4, ... 30 s."""
    return min(30.0, 2.0**retry)


class ChatEndpoint:
    """``complete(messages)`` -> the model's answer; deterministic settings (temperature 0).

    RETRIED: a 429 (rate limit) or a 5xx answer is retried up to ``retries`` times (8), waiting
    what the answer's Retry-After asks (seconds or an HTTP date) or else 1, 2, 4, ... 30 s; an
    answer that asks more than ``max_wait`` (60 s) at once, or a wait that would take the total
    past ``wait_budget`` (300 s), gives up at once. A connection that fails (refused, dropped,
    timed out) is retried ``connect_retries`` times (2: 1 s, then 2 s), since a wrong URL should
    not hold a run for minutes. Any other answer (400, 404, ...) fails at once; each failure is
    an ``EndpointError`` saying what the server answered and why the client stopped.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 200,
        timeout: float = 120.0,
        retries: int = 8,
        connect_retries: int = 2,
        max_wait: float = 60.0,
        wait_budget: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise EndpointError(
                f"endpoint={base_url!r} is not an http(s) URL; give the API's base, e.g. "
                "http://127.0.0.1:8000/v1 (requests go to <base>/chat/completions)"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key_env = model, key_env
        self.max_tokens, self.timeout = max_tokens, timeout
        self.retries, self.connect_retries = retries, connect_retries
        self.max_wait, self.wait_budget, self.sleep = max_wait, wait_budget, sleep
        self.calls = 0

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The answer; retried within one stated budget (RETRIED, the class's docstring)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        waited = 0.0
        busy = unreachable = 0  # retries so far: after a 429 or 5xx, after a failed connection
        while True:
            try:
                with urllib.request.urlopen(self._request(body), timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise EndpointError(
                        f"{self.url} refused the request ({exc.code}): set the API key in "
                        f"${self.key_env}, or name the variable that holds it (key_env=NAME)"
                    ) from None
                detail = exc.read().decode("utf-8", "replace")[:300]
                answered = f"{self.url} answered {exc.code} for model {self.model!r}: {detail}"
                if exc.code != 429 and exc.code < 500:
                    raise EndpointError(answered) from None
                asked = retry_after((exc.headers or {}).get("Retry-After"))
                wait = backoff(busy) if asked is None else asked
                tries = f"{busy + 1} tries, {waited:.0f} s of waiting"
                if busy == self.retries:
                    raise EndpointError(f"{answered} (gave up after {tries})") from None
                if asked is not None and asked > self.max_wait:
                    raise EndpointError(
                        f"{answered} (gave up after {tries}: Retry-After asks {asked:.0f} s, "
                        f"more than the {self.max_wait:.0f} s this client waits at once)"
                    ) from None
                if waited + wait > self.wait_budget:
                    raise EndpointError(
                        f"{answered} (gave up after {tries}: the next wait, {wait:.0f} s, "
                        f"would pass the {self.wait_budget:.0f} s budget)"
                    ) from None
                busy += 1
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if unreachable == self.connect_retries:
                    reason = getattr(exc, "reason", exc)
                    raise EndpointError(
                        f"cannot reach {self.url} ({reason}); check that the server is running "
                        "and the URL is the API's base (e.g. http://127.0.0.1:8000/v1)"
                    ) from None
                wait = backoff(unreachable)
                unreachable += 1
            except json.JSONDecodeError:
                raise EndpointError(f"{self.url} answered with text that is not JSON") from None
            self.sleep(wait)
            waited += wait
        self.calls += 1
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"{self.url} answered without choices[0].message.content: is it an "
                f"OpenAI-compatible chat endpoint? ({json.dumps(data)[:200]})"
            ) from None
