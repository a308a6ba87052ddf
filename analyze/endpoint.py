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


class EndpointError(ValueError):
    """An endpoint that cannot be used: unreachable, a rejected key, an answer of another shape."""


class ChatEndpoint:
    """``complete(messages)`` -> the model's answer; deterministic settings (temperature 0)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 200,
        timeout: float = 120.0,
        retries: int = 2,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise EndpointError(
                f"endpoint={base_url!r} is not an http(s) URL; give the API's base, e.g. "
                "http://127.0.0.1:8000/v1 (requests go to <base>/chat/completions)"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key_env = model, key_env
        self.max_tokens, self.timeout, self.retries = max_tokens, timeout, retries
        self.calls = 0

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        for attempt in range(self.retries + 1):
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
                if exc.code < 500 or attempt == self.retries:
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise EndpointError(
                        f"{self.url} answered {exc.code} for model {self.model!r}: {detail}"
                    ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise EndpointError(
                        f"cannot reach {self.url} ({reason}); check that the server is running "
                        "and the URL is the API's base (e.g. http://127.0.0.1:8000/v1)"
                    ) from None
            except json.JSONDecodeError:
                raise EndpointError(f"{self.url} answered with text that is not JSON") from None
            time.sleep(2.0**attempt)  # a server error or a dropped connection: try again later
        self.calls += 1
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"{self.url} answered without choices[0].message.content: is it an "
                f"OpenAI-compatible chat endpoint? ({json.dumps(data)[:200]})"
            ) from None
