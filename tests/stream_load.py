"""Load for the autoscaling tests: long streamed completions kept in flight from threads with the
official ``openai`` client, each worker starting a new request when its stream ends."""

from __future__ import annotations

import threading
import time

from openai import OpenAI


class StreamLoad:
    """``concurrency`` streamed completions (``ignore_eos``, ``max_tokens`` tokens each) in flight
    against ``base_url`` (ending in ``/v1``) until the ``with`` block ends or ``max_seconds`` pass.

    Attributes:
        completed: streams read to their end.
        errors: ``repr`` of each failed request (the worker retries after a second); callers
            assert on them.
    """

    def __init__(self, base_url: str, model: str, concurrency: int, *, prompt: str, max_tokens: int,
                 max_seconds: float | None = None) -> None:
        self.client = OpenAI(base_url=base_url, api_key="unused", timeout=300, max_retries=0)
        self.model, self.prompt, self.max_tokens = model, prompt, max_tokens
        self.stop_flag = threading.Event()
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]
        self.completed = 0
        self.errors: list[str] = []

    def _running(self) -> bool:
        return not self.stop_flag.is_set() and (self.deadline is None or time.monotonic() < self.deadline)

    def _worker(self) -> None:
        while self._running():
            try:
                stream = self.client.completions.create(model=self.model, prompt=self.prompt,
                                                        max_tokens=self.max_tokens, temperature=0, stream=True,
                                                        extra_body={"ignore_eos": True})
                for _ in stream:
                    if self.stop_flag.is_set():
                        stream.close()
                        break
                self.completed += 1
            except Exception as exc:  # recorded; the test asserts on them
                self.errors.append(repr(exc))
                time.sleep(1)

    def __enter__(self) -> StreamLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=120)
