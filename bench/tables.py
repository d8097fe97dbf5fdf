"""The docs' benchmark tables, generated from the result files in bench/results/ (no hand-copied numbers).

    python -m bench.tables           # rewrite every generated table in README.md and docs/benchmarks.md
    python -m bench.tables --check   # exit 1 naming each table that differs from what its file gives

A generated table sits between two markers in a doc, the first naming the result file (under bench/results/) and
optionally the view:

    <!-- table: sft_vs_trl.json ratios -->
    ...whatever is here is replaced...
    <!-- /table -->

Views (the default is the file's own: `ratios` for a vs-TRL file, `pipeline` for a default_pipeline one):

- `ratios` (a bench.harness.compare file): where and how it was measured, then per tuneforge system x TRL system the
  paired ratio (median, min-max over the repeats) of every count per second, the headline count's medians on each
  side and the difference of the final values;
- `medians` (the same files): each system's medians (bench.harness.medians_table);
- `pipeline` (bench.default_pipeline files): its `--table` rendering (bench.default_pipeline.tables);
- `summary` (the same files): a line per stage, its wall time and what it reached (the README's table;
  bench.default_pipeline.summary_table);
- `floor` (bench.ppo_floor files): its tables (bench.ppo_floor.floor_tables);
- `floor_shares` (vs-TRL files of a run with `--floor`): every system's share of the floor timed in each repeat
  (bench.harness.floor_share_table).

What an older file does not hold (the parameter count, whether the tree was clean, how busy the machine was) is
shown as "unrecorded", never guessed; paired ratios missing from an older file are computed from its runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional

if not __package__:  # run as `python bench/tables.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (ROOT, UNRECORDED, Comparison, changes_no_measurement, medians_table,  # noqa: E402
                           paired_ratios, paired_table)

RESULTS = ROOT / "bench" / "results"
DOCS = ("README.md", "docs/benchmarks.md")
# One generated table: its opening marker (with the spec), the generated text, the closing marker.
MARKED = re.compile(r"(?P<open><!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)", re.S)


# ---------------------------------------------------------------------------------------------------- provenance


def tree_state(code: Optional[dict]) -> str:
    """"clean tree", "dirty tree" or unrecorded. Files written before `code.clean` existed left bench/ and
    docs/benchmarks.md out of `changed_files`, so an empty list there does not prove a clean tree."""
    code = code or {}
    if code.get("clean") is not None:
        # Files written before `changes_no_measurement` counted result files and docs against `clean`.
        return "clean tree" if code["clean"] or changes_no_measurement(code["changed_files"]) else "dirty tree"
    return "dirty tree" if code.get("changed_files") else f"tree state {UNRECORDED}"


def provenance(name: str, result: dict) -> str:
    """One line: the file, the commit and whether its tree was clean, the machine, the model's size, how many runs
    started on a busy machine, and the command."""
    code, machine = result.get("code") or {}, result.get("machine") or {}
    commit = (code.get("commit") or UNRECORDED)[:7]
    parameters = result.get("parameters")
    runs = result.get("runs")
    loaded = result.get("loaded_runs")
    facts = [f"commit {commit} ({tree_state(code)})",
             f"{machine.get('cpu', UNRECORDED)}, {machine.get('logical_cores', '?')} cores, "
             f"{machine.get('threads', '?')} threads",
             f"parameters: {UNRECORDED if parameters is None else format(parameters, ',')}"]
    if runs is not None:
        facts.append(f"runs started on a busy machine: {UNRECORDED if loaded is None else f'{loaded} of {len(runs)}'}")
    elif result.get("busy_cores_before") is not None:  # one measurement (bench.ppo_floor)
        facts.append(f"{'busy' if result['loaded'] else 'quiet'} machine at the start "
                     f"({result['busy_cores_before']:.2f} cores used by others)")
    if result.get("allocator"):  # bench.ppo_floor files since c7630b8
        facts.append(result["allocator"])
    command = f"`{result['command']}`" if result.get("command") else f"command {UNRECORDED}"
    return f"`bench/results/{name}`: " + "; ".join(facts) + f"; {command}"


# ---------------------------------------------------------------------------------------------------- views


def comparison_of(result: dict) -> Comparison:
    """The `Comparison` of the bench whose command wrote this file (`python -m bench.<name> ...`)."""
    found = re.match(r"python -m bench\.(\w+)", result.get("command", ""))
    if found is None:
        raise ValueError(f"no bench.<name> in the file's command {result.get('command')!r}")
    module = importlib.import_module(f"bench.{found.group(1)}")
    return next(v for v in vars(module).values() if isinstance(v, Comparison) and v.name == found.group(1))


def with_paired(result: dict, c: Comparison) -> dict:
    """The file, with paired ratios computed from its runs where it predates them (the same function wrote them
    into later files)."""
    if result.get("paired"):
        return result
    return {**result, "paired": paired_ratios(result["runs"], c.counts, c.trl_systems, c.reference_systems)}


def ratios_view(name: str, result: dict) -> str:
    c = comparison_of(result)
    return provenance(name, result) + "\n\n" + paired_table(with_paired(result, c), c)


def medians_view(name: str, result: dict) -> str:
    return provenance(name, result) + "\n\n" + medians_table(result, comparison_of(result))


def pipeline_view(name: str, result: dict) -> str:
    from bench.default_pipeline import tables

    return provenance(name, result) + "\n\n" + tables(result)


def summary_view(name: str, result: dict) -> str:
    from bench.default_pipeline import summary_table

    return provenance(name, result) + "\n\n" + summary_table(result)


def floor_share_view(name: str, result: dict) -> str:
    from bench.harness import floor_share_table

    return provenance(name, result) + "\n\n" + floor_share_table(result, comparison_of(result).trl_systems)


def floor_view(name: str, result: dict) -> str:
    from bench.ppo_floor import floor_tables

    return provenance(name, result) + "\n\n" + floor_tables(result)


VIEWS: dict[str, Callable[[str, dict], str]] = {"ratios": ratios_view, "medians": medians_view,
                                                "pipeline": pipeline_view, "summary": summary_view,
                                                "floor": floor_view, "floor_shares": floor_share_view}


def is_comparison(result: dict) -> bool:
    """Written by bench.harness.compare (a tuneforge-vs-TRL bench)."""
    return {"runs", "medians", "vs_trl"} <= result.keys()


def default_view(result: dict) -> str:
    if is_comparison(result):
        return "ratios"
    if "stages" in result:
        return "pipeline"
    if "floors_core_s" in result:
        return "floor"
    raise ValueError("no view knows this file's format")


def render(spec: str, results: Path = RESULTS) -> str:
    """The text a table with this spec ("FILE [VIEW]") holds."""
    name, *view = spec.split()
    path = results / name
    if not path.is_file():
        raise ValueError(f"no result file {path}")
    result = json.loads(path.read_text())
    view_name = view[0] if view else default_view(result)
    if view_name not in VIEWS:
        raise ValueError(f"unknown view {view_name!r} in {spec!r}; choose from {', '.join(VIEWS)}")
    return VIEWS[view_name](name, result)


# ---------------------------------------------------------------------------------------------------- docs


def body(spec: str, results: Path = RESULTS) -> str:
    """What stands between a table's markers: its rendering, set off by blank lines so Markdown sees a table."""
    return f"\n{render(spec, results)}\n\n"


def regenerate(text: str, results: Path = RESULTS) -> str:
    """The doc with every generated table rendered afresh from the result files."""
    return MARKED.sub(lambda m: m["open"] + body(m["spec"], results) + m["close"], text)


def stale(text: str, results: Path = RESULTS) -> list[str]:
    """The tables of this doc ("line N: SPEC") whose text differs from what their files give."""
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m['spec']}" for m in MARKED.finditer(text)
            if m["body"] != body(m["spec"], results)]


def specs(text: str) -> list[str]:
    return [m["spec"] for m in MARKED.finditer(text)]


def unshown(docs: dict[str, str], results: Path = RESULTS) -> list[str]:
    """The vs-TRL result files no table names: a new comparison has to show up in the docs."""
    named = {spec.split()[0] for text in docs.values() for spec in specs(text)}
    return sorted(p.name for p in results.glob("*.json")
                  if p.name not in named and is_comparison(json.loads(p.read_text())))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its file")
    args = p.parse_args(argv)
    docs = {name: (ROOT / name).read_text() for name in DOCS}
    problems = []
    for name, text in docs.items():
        try:
            if args.check:
                problems += [f"{name}, {where}: differs from its result file" for where in stale(text)]
                continue
            fresh = regenerate(text)
        except ValueError as err:  # a marker naming a file that is not there, or a view that does not exist
            print(f"error: {name}: {err}", file=sys.stderr)
            return 2
        if fresh != text:
            (ROOT / name).write_text(fresh)
            print(f"rewrote {len(specs(text))} tables in {name}")
    problems += [f"bench/results/{name}: no table in {' or '.join(DOCS)} names it" for name in unshown(docs)]
    for line in problems:
        print(line, file=sys.stderr)
    if problems and args.check:
        print("run `python -m bench.tables` to regenerate the tables", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
