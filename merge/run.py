"""Run one merge with mergekit's Python API on CPU; standalone or as a grid's merge cell.

    python -m merge.run merge/task_arithmetic.yaml OUT --bind base=PATH --bind instruct=PATH \
        --bind finetuned=PATH [--dry-run]

Every check (merge/config.py) runs before any tensor is read. A LoRA adapter folder (peft's
adapter_config.json, no config.json) is first merged into its base with `merge_and_unload`.
The output folder appears whole or not at all (written to a temporary name, then renamed), with
`mergekit_config.yml` (the resolved config) beside the weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grid.errors import GridError
from grid.merges import MergeError, load_recipe, substitute
from merge.config import validate


def materialize_adapter(path: str, workdir: Path) -> str:
    """A LoRA adapter folder becomes a full model (peft merge_and_unload); any other path is kept."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return path
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = workdir / f"unloaded-{folder.name}"
    if not (out / "config.json").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def merge(cfg: dict[str, Any], out_dir: str | Path, where: str = "merge config",
          random_seed: int = 0) -> dict[str, Any]:
    """Validate, then merge into `out_dir`; returns {seconds, config} (the resolved mergekit config).
    `random_seed` seeds the randomized methods (DARE's drop masks)."""
    import torch
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    work = out.with_name(out.name + ".inputs")  # LoRA adapters merged into their base, if any
    start = time.perf_counter()
    threads = torch.get_num_threads()
    root = logging.getLogger()
    level = root.level
    try:
        config = validate(cfg, where)  # raises MergeError before any tensor is read
        resolved = dict(cfg)
        if resolved.get("base_model"):
            resolved["base_model"] = materialize_adapter(str(resolved["base_model"]), work)
        resolved["models"] = [{**m, "model": materialize_adapter(str(m["model"]), work)} for m in cfg["models"]]
        if resolved != cfg:
            config = validate(resolved, where)
        root.setLevel(max(level, logging.WARNING))  # mergekit logs its every step at INFO on the root logger
        run_merge(config, str(tmp), MergeOptions(cuda=False, device="cpu", copy_tokenizer=True,
                                                 write_model_card=False, quiet=True, random_seed=random_seed))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        root.setLevel(level)
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": time.perf_counter() - start, "config": config.model_dump(mode="json", exclude_none=True)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merge.run", description="run one merge recipe (mergekit, CPU)")
    p.add_argument("recipe", help="a mergekit YAML, e.g. merge/task_arithmetic.yaml")
    p.add_argument("out", help="output folder")
    p.add_argument("--bind", action="append", default=[], metavar="NAME=PATH",
                   help="fill the recipe's ${NAME} with a model path or hub id")
    p.add_argument("--dry-run", action="store_true", help="check everything, merge nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        values = {}
        for item in args.bind:
            name, sep, value = item.partition("=")
            if not sep:
                raise MergeError(f"--bind {item}: write NAME=PATH")
            values[name] = value
        cfg = substitute(load_recipe(args.recipe), values)
        if args.dry_run:
            validate(cfg, args.recipe)
            print(f"ok: {args.recipe} would merge {len(cfg['models'])} models by {cfg['merge_method']}")
            return 0
        result = merge(cfg, args.out, args.recipe)
        print(f"merged into {args.out} in {result['seconds']:.1f}s")
        return 0
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
