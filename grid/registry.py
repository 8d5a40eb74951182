"""What each model family and each inference backend is, and what it can do: one table of each.

The config's checks, the plan's skip rules and the wiring that runs jobs (grid/execute.py,
workers/predict.py) read these tables instead of testing names, so a new backend or trainer is
one entry here and the code it names (README, "Add a backend or a trainer"). Code is named by
a dotted path, "module:attribute", and imported only where it runs: planning a grid imports
nothing from workers/ (tests/test_layering.py).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FamilyInfo:
    """A model family: how its cells are made, trained and answered."""

    backends: tuple[str, ...]  # the backends that can serve it
    finetune_modes: tuple[str, ...]  # fine-tune modes its cells may have; the others are not planned
    shots: tuple[int, ...] | None  # the shots it is prompted with; None: any
    prompted: bool  # reads prompts and answers in text; else answers from its heads (decodings ignored)
    trainer: str | None  # runs a FinetuneJob (grid/jobs.py) and returns its metrics
    answerer: str | None = None  # answers without a backend (its own heads): built from the model spec
    # its weights are loaded by the grid's own workers (its size counts, it may take a GPU); else
    # a hosted model behind an API
    local_weights: bool = True
    # its prompt is rendered in the cell's prompt format with its own tokenizer's chat template;
    # else it is sent the prompt's text as the user message (an API applies its own template)
    templated: bool = False


@dataclass(frozen=True)
class BackendInfo:
    """An inference backend: the class that answers a model group's requests (workers/predict.py)."""

    factory: str  # built from the model group's spec (family, path, dtype, options, ...)
    label_logprobs: bool  # scores every label of a choice: what calibrated decoding corrects
    local_tokenizer: bool  # holds the model's tokenizer: a text budget can count its tokens
    heads: bool = False  # answers from a fine-tune's classification heads (decoding `head`)
    python_env: str | None = None  # a variable naming another Python for its actors (its own pins)
    default_python: str | None = None  # that Python when the variable is unset, if it exists (the checkout's)
    requires: str | None = None  # the module its actors import: checked in their Python before any work
    # Ray's own batch-inference API serves some of its requests: `batch_api_serves(decoding)`
    # says which, `batch_api(...)` answers them (grid/execute.py); the rest go to `factory`'s actors
    batch_api: str | None = None
    batch_api_serves: str | None = None


FAMILIES: dict[str, FamilyInfo] = {
    "decoder": FamilyInfo(backends=("transformers", "vllm", "litellm"), finetune_modes=("none", "full", "lora"),
                          shots=None, prompted=True, trainer="workers.train_decoder:run", templated=True),
    "encoder": FamilyInfo(backends=("transformers",), finetune_modes=("full",), shots=(0,), prompted=False,
                          trainer="workers.train_encoder:run", answerer="workers.predict:EncoderBackend.from_spec"),
    "api": FamilyInfo(backends=("litellm",), finetune_modes=("none",), shots=None, prompted=True, trainer=None,
                      local_weights=False),
}

BACKENDS: dict[str, BackendInfo] = {
    "transformers": BackendInfo("workers.transformers_backend:TransformersBackend.from_spec",
                                label_logprobs=True, local_tokenizer=True, heads=True),
    "vllm": BackendInfo("workers.vllm_backend:VLLMBackend", label_logprobs=True, local_tokenizer=True,
                        python_env="CLFGRID_VLLM_PYTHON", default_python=".venv-vllm/bin/python", requires="vllm",
                        batch_api="workers.vllm_backend:generation_answers",
                        batch_api_serves="workers.vllm_backend:through_batch_api"),
    "litellm": BackendInfo("workers.litellm_backend:LiteLLMBackend", label_logprobs=False, local_tokenizer=False),
}


def own_python(backend: str) -> str | None:
    """The Python a backend's actors run in, if not the driver's: the one its variable names,
    else its default beside the checkout where that exists (grid/execute.backend_python checks it)."""
    info = BACKENDS[backend]
    python = os.environ.get(info.python_env) if info.python_env else None
    if not python and info.default_python:
        default = Path(__file__).resolve().parents[1] / info.default_python
        python = str(default) if default.exists() else None
    return python or None


def planned(family: str, finetune: str, shots: int) -> bool:
    """Whether a model of `family` gets cells with this fine-tune mode and shots at all."""
    info = FAMILIES[family]
    return finetune in info.finetune_modes and (info.shots is None or shots in info.shots)


def load(path: str) -> Any:
    """The object a "module:attribute.attribute" path names."""
    module, _, attribute = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target
