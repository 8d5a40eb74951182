"""The Ray Data inference stage: an actor that holds one model and answers chunks of requests.

The grid sends one row per chunk: `cell_id`, `chunk` and `items` (a JSON list of requests, all
from one cell). Chunks, not single rows, are the unit because a chunk is cut from the cell's
rows the same way every time: the model sees the same batches in an interrupted and an
uninterrupted run, so their predictions are equal to the last bit.

A backend turns a list of requests into answers. Each request carries `prompt` (text for local
models), `messages` (for chat APIs), `text`/`words` (for encoders), and the decoding options;
each answer has `raw_output`, `n_prompt_tokens`, `n_output_tokens`, and where the backend
scores every label of a label sub-task (constrained score decoding, encoder and decoder heads)
`label_logprobs` ({sub-task: {label: log-prob}}, grid.metrics.label_scores keeps them).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

import numpy as np

from grid.registry import BACKENDS, FAMILIES, load
from workers.artifacts import fetch

log = logging.getLogger("clfgrid.predict")


class Backend(Protocol):
    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


def make_backend(spec: dict[str, Any]) -> Backend:
    """Build the backend a model group names (`family`, `backend`, `path`, `dtype`, `options`):
    its family's own answerer (encoder heads), else its backend's class (grid/registry.py)."""
    factory = FAMILIES[spec["family"]].answerer or BACKENDS[spec["backend"]].factory
    return load(factory)(spec)


class EncoderBackend:
    """Encoders answer from their heads, in the canonical answer format, with their label heads'
    log-probs."""

    def __init__(self, predictor: Any):
        self.predictor = predictor

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> EncoderBackend:
        from workers.encoder import EncoderPredictor

        return cls(EncoderPredictor(spec["path"], device=spec.get("device", "cpu")))

    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**a, "n_prompt_tokens": None, "n_output_tokens": None} for a in self.predictor.answers(items)]


class Predictor:
    """The Ray Data actor: loads the model once, answers chunks, never lets one chunk kill the rest.

    A chunk that raises is tried again `retries` times; then its requests come back with
    `error` set, and the grid records that cell as failed while the other cells go on.
    """

    def __init__(self, spec: dict[str, Any], retries: int = 2):
        # a fine-tuned model on an object store: into this node's cache, once per node
        self.backend = make_backend({**spec, "path": fetch(spec["path"])})
        self.retries = retries

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for items_json in batch["items"]:
            results.append(json.dumps(self._answer(json.loads(items_json))))
        return {"cell_id": batch["cell_id"], "chunk": batch["chunk"], "results": np.array(results, dtype=object)}

    def _answer(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        error = None
        for attempt in range(self.retries + 1):
            start = time.perf_counter()
            try:
                answers = self.backend.generate(items)
            except Exception as exc:  # noqa: BLE001 - any failure is recorded, not raised
                error = f"{type(exc).__name__}: {exc}"
                log.warning("chunk failed (try %d of %d): %s", attempt + 1, self.retries + 1, error)
                continue
            latency = (time.perf_counter() - start) / max(len(items), 1)
            return [{**a, "latency_s": latency, "error": None} for a in answers]
        return [{"raw_output": None, "n_prompt_tokens": None, "n_output_tokens": None,
                 "latency_s": None, "error": error} for _ in items]
