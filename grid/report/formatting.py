"""The texts of the report's numbers, the same in the Markdown and the HTML page (the page's
template escapes them; the Markdown escapes its own table cells)."""

from __future__ import annotations

from typing import Any


def _unit(metric: str, value: float, sign: str = "+") -> str:
    """A difference of `metric`: points (1 decimal), or nats (2 decimals) for gold_logprob."""
    return f"{value:{sign}.2f}" if metric == "gold_logprob" else f"{100 * value:{sign}.1f}"


def diff_text(result: dict[str, Any]) -> str:
    """A - B in points (gold_logprob: nats), with its CI when the test gives one."""
    metric = result.get("metric", "")
    diff = _unit(metric, result["diff"])
    if result.get("ci_low") is not None:
        diff += f" [{_unit(metric, result['ci_low'])}, {_unit(metric, result['ci_high'])}]"
    return diff


def mde_text(result: dict[str, Any]) -> str:
    """The smallest |A - B| (points; gold_logprob: nats) the test detects at alpha 0.05 with 80%
    power; – where the cells never disagree (McNemar has no discordant pair to power it)."""
    mde = result.get("mde")
    return "–" if mde is None else _unit(result.get("metric", ""), mde, sign="")


def p_text(p: float) -> str:
    """A significance test's p value."""
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def raw_p_text(result: dict[str, Any]) -> str:
    """A test's own p; a permutation p at its floor 1/(1 + B) as "< 1/B" (it says only that no
    permutation of B was as extreme)."""
    if result.get("p_floor"):
        return f"< 1/{result['n_resamples']}"
    return p_text(result["p_value"])


def adjusted_p_text(result: dict[str, Any]) -> str:
    """The family-adjusted p, with a star under 0.05; the raw p's floor where adjustment kept it."""
    adjusted = result.get("p_adjusted")
    if adjusted is None:
        return "–"
    text = p_text(adjusted)
    if result.get("p_floor") and adjusted == result["p_value"]:
        text = raw_p_text(result)
    return text + ("*" if result["significant"] else "")


def seeds_text(comp: Any) -> str:
    """The seeds a comparison pooled, and per seed A - B (points; gold_logprob: nats) with the
    t-test's p."""
    if len(comp.seeds) < 2 or not comp.per_seed_diff:
        return ", ".join(str(s) for s in comp.seeds)
    diffs = ", ".join(f"s{s} {_unit(comp.metric, d)}" for s, d in zip(comp.seeds, comp.per_seed_diff))
    return f"{diffs}; t-test p {'–' if comp.p_seeds is None else p_text(comp.p_seeds)}"


def test_text(result: dict[str, Any], long_names: bool) -> str:
    """The test and its counts: `mcnemar-exact (n10=.., n01=..)`, or the page's longer names."""
    strata = f", {result['strata']} strata" if result.get("strata", 1) > 1 else ""
    if result["test"] == "mcnemar-exact":
        name = "exact McNemar" if long_names else result["test"]
        return f"{name} (n10={result['n10']}, n01={result['n01']}{strata})"
    name = "paired permutation" if long_names else result["test"]
    return f"{name} (B={result['n_resamples']}, seed {result['seed']}{strata})"


def reference_text(row: dict[str, Any]) -> str:
    """A forgetting row's reference score and model, or – without one."""
    return "–" if row["reference"] is None else f"{100 * row['reference']:.1f} ({row['reference_model']})"


def skill_delta_text(row: dict[str, Any], metric: str) -> str:
    """A forgetting row's difference in a skill metric: points for rates, nats for gold log-prob."""
    value = row.get(f"{metric}_delta")
    if value is None:
        return "–"
    return f"{value:+.2f}" if metric == "gold_logprob" else f"{100 * value:+.1f}"


def delta_text(row: dict[str, Any]) -> str:
    return "–" if row["delta"] is None else f"{100 * row['delta']:+.1f}"


# --- the merge study -----------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def with_ci(t: tuple[float, float, float] | None, signed: bool = False) -> str:
    """(value, low, high) in percent, or points when `signed`."""
    if t is None:
        return "–"
    v, lo, hi = (100 * x for x in t)
    return (f"{v:+.1f} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{v:.1f} [{lo:.1f}, {hi:.1f}]")


def p_star(p: float) -> str:
    """The merge study's p: two digits, and * under 0.05."""
    return f"{p:.2g}" + ("*" if p < 0.05 else "")


def describe_variant(s: dict[str, Any]) -> str:
    """What a merge-study variant is, in words."""
    if s["kind"] == "merge":
        how = s["method"] + (f" w={s['weight']:g}" if s["weight"] is not None else "")
        how += f" d={s['density']:g}" if s["density"] is not None else ""
        inputs = s["parent"] or "the fine-tunes on " + ", ".join(s["seen_tasks"])  # several inputs: their tasks
        return f"merge: {how} of {inputs}"
    if s["kind"] == "made":
        return "fine-tune on the mixture of " + ", ".join(s["seen_tasks"])
    return {"reference": "the reference (untuned)", "fine-tune": "fine-tune on " + ", ".join(s["seen_tasks"]),
            "model": "a model of the grid"}[s["kind"]]


SUMMARY_HEADER = ("Model", "What it is", "Seen", "Seen − ref", "Unseen", "Unseen − ref", "Held-out",
                  "Held-out − ref")


def summary_cells(s: dict[str, Any]) -> list[str]:
    """One merge-study summary row's texts, under SUMMARY_HEADER."""
    return [s["variant"], describe_variant(s), with_ci(s.get("seen")), with_ci(s.get("seen_delta"), True),
            with_ci(s.get("unseen")), with_ci(s.get("unseen_delta"), True), with_ci(s.get("held_out")),
            with_ci(s.get("held_out_delta"), True)]
