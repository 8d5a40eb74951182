"""grid/registry.py: every family's trainer and answerer, and every backend's class, is a path that
loads; and the plan's built-in rules come from the table."""

from __future__ import annotations

import pytest

from grid.registry import BACKENDS, FAMILIES, load, planned

PATHS = sorted({(f"family {name}", path) for name, info in FAMILIES.items()
                for path in (info.trainer, info.answerer) if path}
               | {(f"backend {name}", path) for name, info in BACKENDS.items()
                  for path in (info.factory, info.batch_api, info.batch_api_serves) if path})


@pytest.mark.parametrize(("owner", "path"), PATHS)
def test_every_path_of_the_registry_loads(owner, path):
    assert callable(load(path)), (owner, path)


def test_every_family_names_known_backends_and_modes():
    for name, info in FAMILIES.items():
        assert info.backends and set(info.backends) <= set(BACKENDS), name
        assert set(info.finetune_modes) <= {"none", "full", "lora"}, name
        assert (info.trainer is None) == (info.finetune_modes == ("none",)), name


def test_a_batch_api_comes_with_its_rule():
    """A backend that sends some requests through Ray's own batch API says which (grid/execute.py
    splits a model's cells by it), and an own Python names the variable that overrides it."""
    for name, info in BACKENDS.items():
        assert (info.batch_api is None) == (info.batch_api_serves is None), name
        assert info.default_python is None or info.python_env, name


def test_the_built_in_rules():
    """The paper's grid: encoders are fine-tuned (full) and prompted with no examples; API models
    are never fine-tuned; decoders get every combination."""
    assert planned("encoder", "full", 0) and not planned("encoder", "full", 5) and not planned("encoder", "none", 0)
    assert planned("api", "none", 5) and not planned("api", "lora", 0)
    assert all(planned("decoder", mode, shots) for mode in ("none", "full", "lora") for shots in (0, 5))


def test_load_names_what_is_missing():
    with pytest.raises(AttributeError, match="no_such"):
        load("grid.registry:no_such")
