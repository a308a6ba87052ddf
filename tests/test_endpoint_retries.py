"""The autointerp client's retries, against a scripted stub server on 127.0.0.1 that each test
starts and stops: 429 and 5xx are retried, waiting what Retry-After asks (seconds or an HTTP
date) or the client's backoff, within a bounded budget; other answers fail at once. The client's
sleep is recorded instead of slept, so the waits are read exactly and the tests take no time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler

import pytest

from local_http import LocalServer
from unsuperpose.analyze.endpoint import ChatEndpoint, EndpointError, backoff, retry_after

OK = (200, {}, json.dumps({"choices": [{"message": {"content": "an answer"}}]}))


class Stub(LocalServer):
    """Answers the i-th POST with script[i] (status, headers, body); the last one repeats."""

    def __init__(self, script):
        self.script, self.seen = list(script), 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                status, headers, body = stub.script[min(stub.seen, len(stub.script) - 1)]
                stub.seen += 1
                data = body.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def client(url, **kw):
    waits: list[float] = []
    return ChatEndpoint(url, "m", sleep=waits.append, **kw), waits


def ask(chat):
    return chat.complete([{"role": "user", "content": "hi"}])


def test_a_429_is_retried_after_the_seconds_retry_after_asks():
    script = [(429, {"Retry-After": "7"}, "slow down"), (429, {"Retry-After": "2"}, ""), OK]
    with Stub(script) as stub:
        chat, waits = client(stub.url)
        assert ask(chat) == "an answer"
    assert waits == [7.0, 2.0] and stub.seen == 3 and chat.calls == 1


def test_5xx_without_retry_after_backs_off_and_an_http_date_is_honoured():
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    script = [(503, {}, "down"), (500, {}, "oops"), (502, {"Retry-After": later}, ""), OK]
    with Stub(script) as stub:
        chat, waits = client(stub.url)
        assert ask(chat) == "an answer"
    assert waits[:2] == [1.0, 2.0] and 15 < waits[2] <= 20


def test_retries_stop_at_the_budget_of_tries_and_say_so():
    with Stub([(429, {}, "rate limited")]) as stub:
        chat, waits = client(stub.url, retries=3)
        with pytest.raises(EndpointError, match=r"answered 429 .*gave up after 4 tries"):
            ask(chat)
    assert stub.seen == 4 and waits == [1.0, 2.0, 4.0]


def test_retries_stop_before_the_wait_budget_is_passed():
    with Stub([(503, {"Retry-After": "40"}, "")]) as stub:
        chat, waits = client(stub.url, wait_budget=100)
        with pytest.raises(EndpointError, match=r"answered 503 .*would pass the 100 s budget"):
            ask(chat)
    assert waits == [40.0, 40.0] and stub.seen == 3


def test_a_retry_after_longer_than_the_client_waits_gives_up_at_once():
    with Stub([(429, {"Retry-After": "3600"}, "come back in an hour")]) as stub:
        chat, waits = client(stub.url)
        with pytest.raises(EndpointError, match=r"Retry-After asks 3600 s, more than the 60 s"):
            ask(chat)
    assert waits == [] and stub.seen == 1


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_client_errors_are_not_retried(status):
    with Stub([(status, {}, "bad request"), OK]) as stub:
        chat, waits = client(stub.url)
        with pytest.raises(EndpointError, match=f"answered {status} .*bad request"):
            ask(chat)
    assert stub.seen == 1 and waits == []


def test_retry_after_reads_seconds_dates_and_nonsense():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("5") == 5.0 and retry_after("0.5") == 0.5 and retry_after("-3") == 0.0
    assert retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert retry_after(None) is None and retry_after("soon") is None and retry_after("") is None
    assert [backoff(i) for i in range(7)] == [1, 2, 4, 8, 16, 30, 30]
