"""Chat-API models through LiteLLM: any provider LiteLLM knows, or a local OpenAI-compatible server.

A grid names the model by its LiteLLM id (`source: openai/tiny`, `gpt-4o`, ...) and tunes the
client with `options` (all optional):

    api_base            endpoint, e.g. http://127.0.0.1:8000/v1 for a local server
    api_key_env         the NAME of the environment variable holding the key; the key is read from
                        the environment at call time and never stored, cached, logged or written
    max_concurrency     requests in flight at once (default 4)
    requests_per_second a steady cap on request starts, retries included (default: none)
    timeout_s           per request (default 60)
    max_retries         retries after the first try on 429, 408, 5xx, timeouts and dropped
                        connections, with exponential backoff and jitter (default 6)
    backoff_s           first backoff (default 1.0), doubled per retry up to max_backoff_s (30)
    breaker_after       after this many requests in a row failed for good (retries spent), every
                        other request of the model fails at once for the rest of the run: a dead
                        endpoint or a revoked key costs minutes, not hours of backoff (default 5;
                        0: never). Its cells are marked failed and a rerun tries them again.
    cache_dir           where the request cache lives (default $CLFGRID_CACHE/requests)
    cache               false to turn the request cache off (default true)
    structured_outputs  "auto" (default), "json_schema" or "off": see below

Every answer is cached (workers.request_cache) under the model id, revision, endpoint and the
full request, so a repeated or resumed grid sends nothing twice; a cached answer comes back
with `cached: true` and the tokens and cost it had when it was paid for. `cost_usd` is
`litellm.completion_cost` of the response, 0 for models LiteLLM has no price for (local ones).

Constrained decoding on a chat API: there are no log-probs of arbitrary continuations, so
labels cannot be scored. With `structured_outputs: json_schema` (or `auto` when LiteLLM says the
model supports response schemas, e.g. gpt-4o), the request carries a JSON-schema
`response_format` whose fields are enums of the labels (an array of tag enums, one per word, for
slots) and the JSON that comes back is rewritten into the canonical answer. Otherwise (local
servers such as `transformers serve`, which ignores response_format) the request is the free
one and the answer is parsed like any free answer.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from grid.tasks import TaskDef, get_task, tag_set
from workers.request_cache import RequestCache, default_cache_dir, request_key

log = logging.getLogger("clfgrid.litellm")

RETRY_STATUS = {408, 409, 425, 429}


# --- structured outputs (pure) ---------------------------------------------------------------



def answer_schema(task: TaskDef, labels: dict[str, list[str]], n_words: int | None) -> dict[str, Any]:
    """The JSON schema of an answer: an object (APIs want one at the root) with one field per
    sub-task, `answer` for a single-task answer, `task1`, `task2`... for a multi-task one."""
    props: dict[str, Any] = {}
    for i, sub in enumerate(task.subtasks, 1):
        key = f"task{i}" if task.is_multi else "answer"
        if sub.type == "label":
            props[key] = {"type": "string", "enum": list(labels[sub.name])}
        elif sub.type == "word_tags":
            props[key] = {"type": "array", "items": {"type": "string", "enum": list(tag_set(labels[sub.name]))}}
            if n_words is not None:
                props[key].update(minItems=n_words, maxItems=n_words)
        else:
            props[key] = {"type": "string"}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def response_format(task: TaskDef, labels: dict[str, list[str]], n_words: int | None) -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": "answer", "strict": True, "schema": answer_schema(task, labels, n_words)}}


def canonical_from_structured(content: str, task: TaskDef) -> str:
    """The canonical answer text from a structured-output reply; the reply as is if it is not one."""
    try:
        obj = json.loads(content)
    except (TypeError, ValueError):
        return content
    if not isinstance(obj, dict):
        return content
    if task.is_multi:
        return json.dumps({f"task{i}": obj.get(f"task{i}") for i in range(1, len(task.subtasks) + 1)},
                          ensure_ascii=False)
    value = obj.get("answer")
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False) if value is not None else content


# --- the client ------------------------------------------------------------------------------


class _RateLimiter:
    """At most `rate` starts per second, spread evenly; shared by all threads of a backend."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


class APICallError(RuntimeError):
    """A request that failed for good; the message never holds the API key."""


def _retryable(exc: Exception) -> bool:
    import litellm

    if isinstance(exc, (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError,
                        litellm.InternalServerError, litellm.ServiceUnavailableError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status in RETRY_STATUS or status >= 500)


class LiteLLMBackend:
    def __init__(self, spec: dict[str, Any]):
        import litellm

        litellm.suppress_debug_info = True  # no "Give Feedback" banners in the logs
        litellm.drop_params = True  # parameters a provider does not take are dropped, not fatal
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
        opts = dict(spec.get("options") or {})
        self.model = spec.get("model_name") or spec["path"]
        self.revision = spec.get("revision")
        self.api_base = opts.get("api_base")
        self.api_key_env = opts.get("api_key_env")
        self.timeout_s = float(opts.get("timeout_s", 60))
        self.max_retries = int(opts.get("max_retries", 6))
        self.backoff_s = float(opts.get("backoff_s", 1.0))
        self.max_backoff_s = float(opts.get("max_backoff_s", 30))
        self.structured = opts.get("structured_outputs", "auto")
        if self.structured not in ("auto", "json_schema", "off"):
            raise ValueError(f"structured_outputs must be auto, json_schema or off, not {self.structured!r}")
        self.cache = RequestCache(default_cache_dir(opts)) if opts.get("cache", True) else None
        self.limiter = _RateLimiter(opts.get("requests_per_second"))
        self.pool = ThreadPoolExecutor(max_workers=int(opts.get("max_concurrency", 4)))
        self.rng = random.Random(0)
        self.breaker_after = int(opts.get("breaker_after", 5))
        self.failures_in_a_row = 0
        self.last_failure = ""
        self.failure_lock = threading.Lock()
        self.sent = 0  # requests that reached the client (tries included), for tests and logs

    # one request --------------------------------------------------------------------------

    def _schema_supported(self) -> bool:
        if self.structured != "auto":
            return self.structured == "json_schema"
        try:
            import litellm

            return bool(litellm.supports_response_schema(model=self.model))
        except Exception:  # noqa: BLE001 - an unknown model: assume no support
            return False

    def build_request(self, item: dict[str, Any]) -> dict[str, Any]:
        """The request body for one item (what the cache key covers, with the decoding)."""
        decoding = item.get("decoding") or {}
        request: dict[str, Any] = {
            "messages": item["messages"],
            "temperature": decoding.get("temperature", 0.0),
            "max_tokens": decoding.get("max_new_tokens", 64),
        }
        if request["temperature"] > 0:  # a sample per seed: different seeds, different answers (and keys)
            request["seed"] = item.get("seed", 0)
        if decoding.get("mode") == "constrained" and self._schema_supported():
            task = get_task(item["task"])
            words = item.get("words")
            request["response_format"] = response_format(task, item["labels"], len(words) if words else None)
        return request

    def _secret(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _scrub(self, text: str) -> str:
        key = self._secret()
        if key:
            text = text.replace(key, "***")
        return text[:500]

    def _complete(self, request: dict[str, Any]) -> Any:
        import litellm

        key = self._secret()
        if self.api_key_env and not key:
            raise APICallError(f"environment variable {self.api_key_env} (options.api_key_env) is not set")
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            self.sent += 1
            try:
                # drop_params: a provider without `seed` (Claude) is sent the rest
                return litellm.completion(model=self.model, **request, api_base=self.api_base, drop_params=True,
                                          api_key=key or ("none" if self.api_base else None),
                                          timeout=self.timeout_s, num_retries=0, max_retries=0)
            except Exception as exc:  # noqa: BLE001 - classified, scrubbed, retried or raised
                message = self._scrub(f"{type(exc).__name__}: {exc}")
                if not _retryable(exc) or attempt == self.max_retries:
                    raise APICallError(f"{message} (after {attempt + 1} tries)") from None
                sleep = min(self.max_backoff_s, delay) * (0.5 + self.rng.random() / 2)
                log.info("retry %d/%d in %.2fs: %s", attempt + 1, self.max_retries, sleep, message[:120])
                time.sleep(sleep)
                delay *= 2
        raise AssertionError("unreachable")

    def _complete_or_trip(self, request: dict[str, Any]) -> Any:
        """`_complete`, behind the circuit breaker (`breaker_after`)."""
        if self.breaker_after and self.failures_in_a_row >= self.breaker_after:
            raise APICallError(f"circuit open: {self.failures_in_a_row} requests in a row failed for good, "
                               f"so the model's other requests are not sent this run (last: {self.last_failure})")
        try:
            resp = self._complete(request)
        except APICallError as exc:
            with self.failure_lock:
                self.failures_in_a_row += 1
                self.last_failure = str(exc)[:200]
            raise
        with self.failure_lock:
            self.failures_in_a_row = 0
        return resp

    def keyed_request(self, item: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The request body for one item and its cache key (model, revision, endpoint, request)."""
        request = self.build_request(item)
        return request, request_key(self.model, self.revision, self.api_base,
                                    {**request, "decoding": item.get("decoding")})

    def _answer(self, item: dict[str, Any]) -> dict[str, Any]:
        request, key = self.keyed_request(item)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return {**hit, "cached": True}
        resp = self._complete_or_trip(request)
        content = resp.choices[0].message.content or ""
        if "response_format" in request:
            content = canonical_from_structured(content, get_task(item["task"]))
        usage = getattr(resp, "usage", None)
        answer = {"raw_output": content,
                  "n_prompt_tokens": getattr(usage, "prompt_tokens", None),
                  "n_output_tokens": getattr(usage, "completion_tokens", None),
                  "cost_usd": self._cost(resp)}
        if self.cache is not None:
            self.cache.put(key, self.model, answer)
        return {**answer, "cached": False}

    @staticmethod
    def _cost(resp: Any) -> float:
        try:
            import litellm

            return float(litellm.completion_cost(completion_response=resp) or 0.0)
        except Exception:  # noqa: BLE001 - no price known (local models): free
            return 0.0

    # the Backend protocol ---------------------------------------------------------------

    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers in item order; any request that fails for good fails the whole chunk."""
        return list(self.pool.map(self._answer, items))
