"""The checks of a merge that need mergekit or the weights, run before any work.

What a merge says, and the checks that need neither, are the grid's (grid/merges.py). Here:
mergekit's own parse of a template (a grid's merges are parsed when the grid is loaded, by
`check_merges`), and, once paths are known (`validate`, at merge time), a missing model or models
whose architectures or vocabularies differ. Every problem is one MergeError line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grid.merges import PLACEHOLDER, MergeError, check_template, fail, model_fields


def mergekit_check(cfg: dict[str, Any], where: str = "merge config") -> None:
    """mergekit's own parse of a config (placeholders or paths): no file is read."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        MergeConfiguration.model_validate(cfg)
    except (ValidationError, RuntimeError, ValueError) as exc:
        text = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else _pyd(exc)
        raise MergeError(f"{where}: mergekit rejects it: {text}") from None



def _pyd(exc: Any) -> str:
    err = exc.errors()[0]
    return f"field {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def _read_config(path: str, field: str, where: str) -> dict[str, Any]:
    folder = Path(path)
    if not folder.is_absolute() and not folder.exists():
        # A hub id: the local HF cache when offline.
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
        except Exception:  # noqa: BLE001 - whatever the hub client raises, the model is not at hand
            raise fail(where, field, f"model {path} is neither a folder nor a hub id in the local cache") from None
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise fail(where, field, f"LoRA adapter {path} names no base_model_name_or_path")
        return _read_config(base, field, where)
    if not (folder / "config.json").is_file():
        raise fail(where, field, f"model {path} does not exist (no config.json)")
    return json.loads((folder / "config.json").read_text())


SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size")


def check_models(cfg: dict[str, Any], where: str = "merge config") -> None:
    """Every model exists and all share architecture, shapes and vocabulary (reads config.json only)."""
    fields = model_fields(cfg)
    first_field, first = None, None
    for field, path in fields:
        if path is None or PLACEHOLDER.match(str(path)):
            raise fail(where, field, f"no model path ({path!r})")
        conf = _read_config(str(path), field, where)
        conf = {**conf.get("text_config", {}), **conf}
        shape = {k: conf.get(k) for k in SHAPE_KEYS}
        shape["architectures"] = tuple(conf.get("architectures") or ())
        if first is None:
            first_field, first = field, shape
            continue
        for key, value in shape.items():
            if value != first[key]:
                what = "vocabulary size" if key == "vocab_size" else key
                raise fail(where, field, f"{what} {value} differs from {first_field}'s {first[key]} "
                                          f"(models merged must share architecture and vocabulary)")


def validate(cfg: dict[str, Any], where: str = "merge config"):
    """Every check, then mergekit's own parse: the MergeConfiguration to run."""
    from mergekit.config import MergeConfiguration

    check_template(cfg, where)
    mergekit_check(cfg, where)
    check_models(cfg, where)
    return MergeConfiguration.model_validate(cfg)


def check_merges(config: Any) -> None:
    """mergekit's parse of every merge of a grid config, when it is loaded (grid/run.py)."""
    for j, spec in enumerate(config.merges):
        mergekit_check(spec.template()[0], where=f"merges.{j} ({spec.name})")
