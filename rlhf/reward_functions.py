"""Rule-based rewards for `reward.functions` (verifiable tasks need no reward model), and how several combine.

A reward function takes three equal-length lists: the decoded prompts, the decoded responses (without special
tokens), and each prompt's dataset row (a dict of every column the data has, with the reference answer the
data format defines under `answer`, None where there is none); it returns one float per response. Extra keyword
arguments come from the config:
`reward.functions=[{_target_: rlhf.reward_functions.exact_match, weight: 1.0, correct: 1.0, wrong: 0.0}]`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from trainer.config import ConfigError

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _reference(row: dict, key: str) -> Optional[str]:
    value = row.get(key)
    return None if value is None else str(value)


def exact_match(prompts: list[str], responses: list[str], rows: list[dict], correct: float = 1.0,
                wrong: float = 0.0, key: str = "answer") -> list[float]:
    """`correct` where the stripped response equals the stripped reference (`row[key]`), else `wrong`."""
    refs = [_reference(row, key) for row in rows]
    return [correct if a is not None and r.strip() == a.strip() else wrong for r, a in zip(responses, refs)]


def numeric_match(prompts: list[str], responses: list[str], rows: list[dict], tolerance: float = 1e-6,
                  correct: float = 1.0, wrong: float = 0.0, key: str = "answer", last: bool = True) -> list[float]:
    """`correct` where the response's last (or, with last=false, first) number is within `tolerance` of the
    reference's (absolute, or relative to the reference for large values), else `wrong`; a response or a
    reference without a number is wrong."""
    out = []
    for response, row in zip(responses, rows):
        ref, got = _NUMBER.findall(_reference(row, key) or ""), _NUMBER.findall(response)
        if not ref or not got:
            out.append(wrong)
            continue
        a, b = float(ref[-1]), float(got[-1] if last else got[0])
        out.append(correct if math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance) else wrong)
    return out


def regex_match(prompts: list[str], responses: list[str], rows: list[dict], pattern: str = r"^\S.*$",
                matched: float = 1.0, unmatched: float = 0.0, full: bool = True) -> list[float]:
    """A format reward: `matched` where the stripped response matches `pattern` (the whole response with
    full=true, anywhere with full=false), else `unmatched`."""
    rx = re.compile(pattern, re.DOTALL)
    test = rx.fullmatch if full else rx.search
    return [matched if test(r.strip()) else unmatched for r in responses]


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something that is not one number per response; the message names
    the function, its place in reward.functions and the prompt."""


@dataclass
class WeightedFunction:
    name: str
    weight: float
    fn: Callable[..., Any]
    index: int  # its place in reward.functions


def function_names(specs: list[dict]) -> list[str]:
    """Each reward.functions entry's name: its `name`, else its function's; a repeated one gets its index."""
    names: list[str] = []
    for i, spec in enumerate(specs):
        name = spec.get("name") or str(spec["_target_"]).rsplit(".", 1)[-1]
        names.append(f"{name}_{i}" if name in names else name)  # the same function twice, with other arguments
    return names


def check_functions(specs: list[dict], key: str = "reward.functions") -> None:
    """Every entry's function imports and takes its keyword arguments: checked in the driver before Ray or any
    model starts, so a misspelt name ends the run at once with one line (its reward actor would find it only
    after the policy loaded, as a failed setup). The reward actor imports the same module path."""
    for i, spec in enumerate(specs):
        where, target = f"{key}[{i}]", str(spec["_target_"])
        module_name, _, attr = target.rpartition(".")
        try:
            module = importlib.import_module(module_name) if module_name else None
        except ImportError as e:
            raise ConfigError(f"{where}._target_: cannot import {module_name!r} for {target!r} ({e}); a module of your "
                              f"own must be importable from where the run starts (or on PYTHONPATH)") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))] if module else []
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
            raise ConfigError(f"{where}._target_: {target!r} is not a function{hint}")
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "weight", "name")}
        try:
            signature = inspect.signature(fn)
        except ValueError:  # no signature to read (a builtin): the call itself will say
            continue
        try:
            signature.bind_partial([], [], [], **kwargs)
        except TypeError as e:
            params = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                               for p in signature.parameters.values())
            raise ConfigError(f"{where}: {target} does not take these arguments ({e}); it takes "
                              f"{attr}({params})") from None


def build_functions(specs: list[dict]) -> list[WeightedFunction]:
    """reward.functions entries -> callables: `weight` and `name` are read here, every other key (`_target_`
    and the function's keyword arguments) goes to Hydra's instantiate."""
    from hydra.utils import instantiate

    out = []
    for i, (spec, name) in enumerate(zip(specs, function_names(specs))):
        kwargs = {k: v for k, v in dict(spec).items() if k not in ("weight", "name")}
        out.append(WeightedFunction(name, float(spec.get("weight", 1.0)), instantiate(kwargs, _partial_=True), i))
    return out


def _first_failing(fn, prompts: list[str], responses: list[str], rows: list[dict]) -> Optional[int]:
    """The first row on which `fn`, called on that row alone, raises (None when none does alone)."""
    for i in range(len(prompts)):
        try:
            fn(prompts[i : i + 1], responses[i : i + 1], rows[i : i + 1])
        except Exception:  # noqa: BLE001
            return i
    return None


def combined_scores(functions: list[WeightedFunction], prompts: list[str], responses: list[str],
                    rows: list[dict], first_index: int = 0) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of every function's scores, and each function's own scores by name. `first_index` is
    the global index of the first prompt, for the error messages."""
    components: dict[str, list[float]] = {}
    for f in functions:
        where = f"reward function {f.name} (reward.functions[{f.index}])"
        try:
            values = list(f.fn(prompts, responses, rows))
        except Exception as e:  # noqa: BLE001  (any error of user code ends the run, named)
            i = _first_failing(f.fn, prompts, responses, rows)
            at = f"prompt {first_index + i}: {prompts[i]!r}" if i is not None else \
                f"the batch of prompts {first_index}..{first_index + len(prompts) - 1}"
            raise RewardFunctionError(f"{where} raised on {at}: {type(e).__name__}: {e}") from e
        if len(values) != len(responses):
            raise RewardFunctionError(f"{where} returned {len(values)} scores for {len(responses)} responses "
                                      f"(prompts {first_index}..{first_index + len(prompts) - 1})")
        scores = []
        for i, v in enumerate(values):
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                raise RewardFunctionError(f"{where} returned {values[i]!r} for prompt {first_index + i}: "
                                          f"{prompts[i]!r}; a score must be a finite number")
            scores.append(v)
        components[f.name] = scores
    total = [sum(f.weight * components[f.name][i] for f in functions) for i in range(len(responses))]
    return total, components
