"""Turn datasets into training rows: load, detect format, template, mask, truncate, pack, mix, collate.

Every example becomes `input_ids` plus `labels` that are -100 wherever the loss must not look, so the loss
trains on completions and assistant turns only. An example is first split into consecutive *pieces* of text
(or token ids), each marked trained or not, and each piece is tokenized on its own: the trained span is then
exact by construction, and a prompt tokenizes the same way in training as when it is fed for generation.

Conversational rows go through the tokenizer's chat template. The trained span of assistant turn k is found by
rendering prefixes: it starts where `messages[:k]` rendered with `add_generation_prompt=True` ends and stops
where `messages[:k+1]` ends, so it holds the content and whatever end-of-turn tokens the template emits.
That needs templates whose renders extend each other; one that rewrites earlier turns is refused (DataError).

Rows are packed several to a sequence with `position_ids` restarting at 0 per example and no attention mask:
Transformers' sdpa/eager attention then keeps packed examples from attending to each other (the packing test
checks per-example losses of a packed batch against separate runs).

`python -m trainer.preview` (trainer/preview.py) prints what a config makes of the data.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import jinja2
import torch

from trainer.config import DataConfig, DatasetSpec
from trainer.progress import progress
from trainer.sampling import SeededOrder

IGNORE_INDEX = -100
FORMAT_FIELDS = {
    "prompt_completion": "prompt + completion (strings, or lists of role/content messages)",
    "alpaca": "instruction + output (+ optional input)",
    "sharegpt": "conversations: [{from: system|human|gpt, value}]",
    "messages": "messages: [{role: system|user|assistant, content}]",
    "text": "text (a plain document: every token trained)",
}
DROP_REASONS = ("overlong", "no_trained_tokens", "empty")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_MAP_BATCH = 1000
_TOKENIZE_SLICES = 20  # a large dataset's tokenization bar moves once per slice, every 5%
_POOL_BATCHES = 25  # with num_proc > 1, a slice's least batches per process
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class DataError(ValueError):
    """A user-facing data problem; the message names the file/line/row and what is wrong."""


def _accepted_formats() -> str:
    return "; ".join(f"{name} ({fields})" for name, fields in FORMAT_FIELDS.items())


# ---------------------------------------------------------------------------------------------------- loading


def load_rows(path: str, split: str = "train", name: Optional[str] = None, seed: int = 0) -> datasets.Dataset:
    """Rows of `synthetic:<variant>`, a .json/.jsonl/.parquet file or directory of them, or a Hub dataset.

    A local file is its own split (`split` and `name` apply to synthetic and Hub data only).
    """
    if path.startswith("synthetic:"):
        from trainer.synthetic import load_synthetic

        try:
            return load_synthetic(path, split, seed)
        except ValueError as e:
            raise DataError(str(e)) from None
    files = _local_files(path)
    if files is None:
        try:
            return datasets.load_dataset(path, name, split=split)
        except Exception as e:  # the Hub client raises many types; all mean "cannot get this dataset"
            raise DataError(f"{path}: cannot load as a Hub dataset (split {split!r}): {e}") from None
    builder = _FILE_BUILDERS[files[0].suffix]
    _check_file_contents(files, builder)
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except datasets.exceptions.DatasetsError as e:
        if builder == "json":
            _raise_first_json_error(files)  # datasets' own message names neither file nor line
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot load: {cause}") from None


def _local_files(path: str) -> Optional[list[Path]]:
    """The data files `path` names, or None when it can only be a Hub dataset name."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in _FILE_BUILDERS and f.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no .json, .jsonl or .parquet files")
        if len({_FILE_BUILDERS[f.suffix] for f in files}) > 1:
            raise DataError(f"{path}: directory mixes JSON and parquet files; keep one kind per directory")
        return files
    if p.is_file():
        if p.suffix not in _FILE_BUILDERS:
            raise DataError(f"{path}: unsupported file type {p.suffix!r}; expected .json, .jsonl or .parquet")
        return [p]
    if p.suffix in _FILE_BUILDERS or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory")
    return None


def _check_file_contents(files: list[Path], builder: str) -> None:
    """Refuse an empty file, and JSON that is not UTF-8: datasets loads either without a word (no rows; or
    text that breaks much later, in the tokenizer, with no file named)."""
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty file (0 bytes)")
        if builder != "json":
            continue
        decoder, lineno = codecs.getincrementaldecoder("utf-8")(), 1
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    line = lineno + e.object.count(b"\n", 0, e.start)  # e.object: bytes held over + chunk
                    raise DataError(f"{f}:{line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); "
                                    f"re-encode the file as UTF-8") from None
                lineno += chunk.count(b"\n")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{f}:{lineno}: not UTF-8 text (the file ends inside a character)") from None


def _raise_first_json_error(files: list[Path]) -> None:
    """Find the first malformed line and raise a DataError naming file and 1-based line number."""
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e})") from None
        doc_error = None
        if f.suffix == ".json":
            try:
                json.loads(text)
                continue  # one JSON document (a list of rows)
            except json.JSONDecodeError as e:
                doc_error = e
        first = True
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                # Not JSON lines either when a .json file's first line fails: report where the document breaks.
                err, where = (doc_error, doc_error.lineno) if doc_error is not None and first else (e, lineno)
                raise DataError(f"{f}:{where}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{f}:{lineno}: expected a JSON object per line, got {type(value).__name__}")
            first = False


# ---------------------------------------------------------------------------------------------------- formats


def _matching_formats(row: dict) -> list[str]:
    """Formats whose fields `row` has; null fields count as absent (datasets fills missing columns with None)."""
    def has(key):
        return row.get(key) is not None

    out = []
    messages = row.get("messages")
    if isinstance(messages, list):
        first = messages[0] if messages and isinstance(messages[0], dict) else {}
        out.append("sharegpt" if first.get("from") is not None else "messages")
    if isinstance(row.get("conversations"), list):
        out.append("sharegpt")
    if has("prompt") and has("completion"):
        out.append("prompt_completion")
    if has("instruction") and has("output"):
        out.append("alpaca")
    if isinstance(row.get("text"), str):  # last: instruction datasets often carry their rendered text beside
        out.append("text")
    return out


def detect_format(row: dict) -> str:
    """The format of one row: prompt_completion | alpaca | sharegpt | messages | text."""
    found = _matching_formats(row)
    if not found:
        fields = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"cannot detect the format of a row with fields {fields}; accepted formats: {_accepted_formats()}")
    return found[0]


def _check_format(row: dict, fmt: str, first: Optional[str] = None) -> str:
    """The row's format: `fmt`, or with fmt=auto the detected one, which must be `first` (row 0's) when given:
    a source whose rows differ in schema is refused rather than trained as whatever each row looks like."""
    fields = sorted(k for k, v in row.items() if v is not None)
    if fmt == "auto":
        found = detect_format(row)
        if first is not None and found != first:
            raise DataError(f"its fields {fields} are format {found!r} but row 0 is {first!r} "
                            f"({FORMAT_FIELDS[first]}); every row of a source needs the same fields")
        return found
    if fmt not in _matching_formats(row):
        raise DataError(f"row does not have the fields of format {fmt!r} ({FORMAT_FIELDS[fmt]}); it has {fields}")
    return fmt


def checked_message(role, content, where: str) -> dict:
    """{role, content} with both checked to be strings (null content is empty); errors name `where`."""
    if not isinstance(role, str):
        raise DataError(f"{where}: message role must be a string, got {role!r}")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise DataError(f"{where}: message content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def to_messages(row: dict, fmt: str, system_prompt: Optional[str] = None) -> list[dict]:
    """A conversational row as [{role, content}]; `system_prompt` is added where the row has no system turn."""
    if fmt == "messages":
        messages = [checked_message(m.get("role"), m.get("content"), "messages") for m in row["messages"]]
    elif fmt == "sharegpt":
        turns = row["conversations"] if isinstance(row.get("conversations"), list) else row["messages"]
        messages = []
        for turn in turns:
            role = _SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise DataError(f"unknown sharegpt speaker {turn.get('from')!r}; accepted: "
                                f"{', '.join(_SHAREGPT_ROLES)}")
            messages.append(checked_message(role, turn.get("value"), "conversations"))
    elif fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, checked_message("assistant", row["output"], "output")]
    elif fmt == "prompt_completion":
        if not (isinstance(row["prompt"], list) and isinstance(row["completion"], list)):
            raise DataError("prompt and completion must both be strings or both be lists of messages")
        messages = [checked_message(m.get("role"), m.get("content"), "prompt/completion")
                    for m in row["prompt"] + row["completion"]]
    else:
        raise DataError(f"unknown format {fmt!r}; accepted formats: {_accepted_formats()}")
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


# ---------------------------------------------------------------------------------------------------- tokenizing


@dataclass
class _Pieces:
    """One example as consecutive (text or token ids, trained) pieces, and its last answer text (None for a plain
    document: no prompt to generate from)."""

    pieces: list[tuple]
    answer: Optional[str]


@dataclass(frozen=True)
class Templater:
    """What splitting rows into pieces needs from a tokenizer, looked up once per batch.

    `render` is the tokenizer's compiled chat template called the way `apply_chat_template(tokenize=False)`
    calls it; going direct skips that method's per-call message normalisation, which took 2/3 of
    tokenization time (our messages are already plain role/content dicts; a test checks both agree).
    """

    template: Optional[str]
    special_tokens: dict
    bos: list[int]
    eos: list[int]
    terminators: tuple[str, ...]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import _compile_jinja_template  # lru-cached per template

        return _compile_jinja_template(self.template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens)


def templater(tokenizer) -> Templater:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    try:
        template = tokenizer.get_chat_template()  # resolves a dict of named templates to the default one
    except ValueError:
        template = None
    return Templater(template, dict(tokenizer.special_tokens_map),
                      [] if bos is None else [bos], [] if eos is None else [eos], tuple(tokenizer.all_special_tokens))


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: {a[max(0, i - 20):i + 20]!r} vs {b[max(0, i - 20):i + 20]!r}"


def _chat_pieces(messages: list[dict], t: Templater) -> Optional[_Pieces]:
    # An opening assistant turn (a greeting) has nothing to answer, so it is context, not a target.
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]
    if not any(messages[k]["content"].strip() for k in assistant):
        return None
    full = t.render(messages, False)
    pieces, pos = [], 0
    for k in assistant:
        start = t.render(messages[:k], True)
        end = full if k == len(messages) - 1 else t.render(messages[:k + 1], False)
        for prefix, what in ((start, f"messages[:{k}] with add_generation_prompt=True"), (end, f"messages[:{k + 1}]")):
            if not full.startswith(prefix):
                raise DataError(f"chat template problem: the rendering of {what} is not a prefix of the whole "
                                f"conversation ({_first_difference(prefix, full)}), so the assistant span cannot be "
                                f"masked; the template rewrites earlier turns; set data.chat_template to one that does not")
        s, e = len(start), len(end)
        if s < pos or e < s:
            raise DataError(f"chat template problem: assistant turn {k} renders before the previous turn ends")
        span = full[s:e]
        if span.rstrip() != span and span.rstrip().endswith(t.terminators):
            e = s + len(span.rstrip())  # the newline after an end-of-turn token is formatting, not the answer
        pieces += [(full[pos:s], False), (full[s:e], True)]
        pos = e
    pieces.append((full[pos:], False))
    return _Pieces([p for p in pieces if p[0]], messages[assistant[-1]]["content"])


def example_pieces(row: dict, fmt: str, t: Templater, system_prompt: Optional[str]) -> Optional[_Pieces]:
    """Split a row into pieces; None when it has nothing to learn (no completion / assistant text)."""
    if fmt == "text":  # language modelling (TRL's `text` rows): the document is the target
        if not row["text"].strip():
            return None
        return _Pieces([(t.bos, False), (row["text"], True), (t.eos, True)], None)
    if fmt == "prompt_completion" and isinstance(row["prompt"], str):
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(completion, str):
            raise DataError("prompt and completion must both be strings or both be lists of messages")
        if not completion.strip():
            return None
        return _Pieces([(t.bos, False), (prompt, False), (completion, True), (t.eos, True)], completion)
    if t.template is None:
        raise DataError("conversational data needs a chat template; the tokenizer has none (set data.chat_template)")
    return _chat_pieces(to_messages(row, fmt, system_prompt), t)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # same ids as tokenizer(texts), with less Python per piece (many short pieces)
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_pieces(tokenizer, examples: list[_Pieces]) -> list[list[tuple[list[int], bool]]]:
    """Tokenize the text pieces of many examples in one call."""
    texts = [p for ex in examples for p, _ in ex.pieces if isinstance(p, str)]
    ids = iter(_encode(tokenizer, texts))
    return [[(next(ids) if isinstance(p, str) else list(p), trained) for p, trained in ex.pieces] for ex in examples]


def _assemble(pieces: list[tuple[list[int], bool]], max_length: int, overlong: str) -> tuple[Optional[dict], str]:
    """(example or None, status) where status is kept | truncated | one of DROP_REASONS."""
    input_ids = [t for ids, _ in pieces for t in ids]
    labels = [t if trained else IGNORE_INDEX for ids, trained in pieces for t in ids]
    if labels:
        # Nothing in the example predicts its first token; in a packed row the previous example would.
        labels[0] = IGNORE_INDEX
    status = "kept"
    if len(input_ids) > max_length:
        if overlong == "drop":
            return None, "overlong"
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    if all(t == IGNORE_INDEX for t in labels):
        return None, "no_trained_tokens"
    return {"input_ids": input_ids, "labels": labels}, status


def _prompt_ids(pieces: list[tuple[list[int], bool]]) -> list[int]:
    """Token ids before the last run of trained pieces: the prompt for generating the last answer."""
    first = max(i for i, (_, trained) in enumerate(pieces) if trained)
    while first > 0 and pieces[first - 1][1]:
        first -= 1
    return [t for ids, _ in pieces[:first] for t in ids]


def tokenize_example(row: dict, fmt: str, tokenizer, max_length: int, overlong: str,
                     system_prompt: Optional[str] = None) -> Optional[dict]:
    """{"input_ids", "labels"} for one row (labels -100 on untrained tokens), or None when it is dropped."""
    planned = example_pieces(row, _check_format(row, fmt), templater(tokenizer), system_prompt)
    if planned is None:
        return None
    return _assemble(encode_pieces(tokenizer, [planned])[0], max_length, overlong)[0]


def _tokenize_batch(batch: dict, *, fmt, first_format, tokenizer, max_length, overlong, system_prompt, with_prompts,
                    code_hash) -> dict:
    """datasets.map function: errors are returned per row (not raised) so the caller can name the row.

    `code_hash` is unused here: it is in the arguments so that datasets' cache of this map (for file-backed
    data) is invalidated when this module changes; datasets hashes module functions by name, not code.
    """
    t = templater(tokenizer)
    planned, errors = plan_rows(batch, lambda row: example_pieces(row, _check_format(row, fmt, first_format), t,
                                                                     system_prompt))
    encoded = iter(encode_pieces(tokenizer, [p for p in planned if p is not None]))
    out = {"input_ids": [], "labels": [], "status": [], "error": errors}
    if with_prompts:
        out.update(prompt_ids=[], answer=[])
    for p, err in zip(planned, errors):
        pieces = next(encoded) if p is not None else None
        example, status = _assemble(pieces, max_length, overlong) if p is not None else (None, "error" if err else "empty")
        out["input_ids"].append(example["input_ids"] if example else [])
        out["labels"].append(example["labels"] if example else [])
        out["status"].append(status)
        if with_prompts:
            answered = p is not None and p.answer is not None
            out["prompt_ids"].append(_prompt_ids(pieces) if answered else [])
            out["answer"].append(p.answer if answered else "")
    return out


def _check_generation_prompt(t: Templater) -> None:
    """A template that ignores add_generation_prompt would train on the assistant header and never prompt for it."""
    probe = [{"role": "user", "content": "hi"}]
    try:
        same = t.render(probe, True) == t.render(probe, False)
    except jinja2.TemplateError:
        return  # templates with stricter rules (e.g. a mandatory system turn) are checked per row instead
    if same:
        raise DataError("chat template problem: it ignores add_generation_prompt, so the assistant header "
                        "cannot be told apart from the answer; set data.chat_template to one that handles it")


def _tokenize_dataset(ds: datasets.Dataset, fmt: str, tokenizer, cfg: DataConfig, source: str,
                      with_prompts: bool = False) -> dict[str, list]:
    """Tokenize every row (datasets.map, cfg.num_proc processes); columns as Python lists."""
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    t = templater(tokenizer)
    if t.template is not None and not isinstance(ds[0].get("prompt"), str):  # rows that go through the template
        _check_generation_prompt(t)
    features = {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
                "status": datasets.Value("string")}
    if with_prompts:
        features.update(prompt_ids=datasets.Sequence(datasets.Value("int32")), answer=datasets.Value("string"))
    first_format = None
    if fmt == "auto":
        try:
            first_format = detect_format(ds[0])
        except DataError as e:
            raise DataError(f"{source}: row 0: {e}") from None
    fn = functools.partial(_tokenize_batch, fmt=fmt, first_format=first_format, tokenizer=tokenizer, max_length=cfg.max_length,
                           overlong=cfg.overlong, system_prompt=cfg.system_prompt, with_prompts=with_prompts,
                           code_hash=_CODE_HASH)
    out = map_rows(ds, fn, features, cfg.num_proc, source)
    if all(status == "empty" for status in out["status"]):
        raise DataError(f"{source}: none of its {len(ds)} rows has an answer to learn from (a non-empty "
                        f"completion/output, or an assistant turn after the first message)")
    return out


def plan_rows(batch: dict[str, list], plan: Callable[[dict], Any]) -> tuple[list, list[str]]:
    """`plan(row)` for every row of a datasets batch, and per row an error text ("" when fine).

    A DataError or chat template error becomes that row's error instead of being raised, so that `map_rows`
    can name the row (inside datasets.map the row index is unknown).
    """
    results, errors = [], []
    for values in zip(*batch.values()):
        row = dict(zip(batch, values))
        try:
            results.append(plan(row))
            errors.append("")
        except DataError as e:
            results.append(None)
            errors.append(str(e))
        except jinja2.TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            results.append(None)
            errors.append(f"chat template error: {e}")
    return results, errors


def map_rows(ds: datasets.Dataset, fn: Callable[[dict], dict], features: dict, num_proc: int,
             source: str) -> dict[str, list]:
    """`ds.map(fn)` in batches (num_proc processes) into `features` plus the string column `error` that `fn`
    returns per row; columns as Python lists. The first row with an error raises a DataError naming `source`
    and the row index.

    A large dataset is mapped in up to 20 contiguous slices so that rank 0 shows a bar over the rows
    (trainer.progress: a line every few percent in a log); datasets' own bar stays off, as it would print on
    every rank and, in a log, a carriage-return update per batch. A dataset under two slices' worth (a batch, or
    with num_proc > 1 `_POOL_BATCHES` batches per process) is one map, as before."""
    features = datasets.Features({**features, "error": datasets.Value("string")})
    # With num_proc > 1 each map starts a pool (~0.5 s on 2 cores): a slice then holds enough batches to hide it.
    min_rows = _MAP_BATCH if num_proc <= 1 else _MAP_BATCH * num_proc * _POOL_BATCHES
    slices = max(1, min(_TOKENIZE_SLICES, len(ds) // min_rows))
    bounds = [len(ds) * i // slices for i in range(slices + 1)]
    out: dict[str, list] = {name: [] for name in features}
    with _datasets_bars_off(), progress(total=len(ds), desc=f"tokenizing {source}", unit="row",
                                        enabled=int(os.environ.get("RANK", 0)) == 0) as bar:
        for start, end in zip(bounds, bounds[1:]):
            part = ds if slices == 1 else ds.select(range(start, end))
            mapped = part.map(fn, batched=True, batch_size=_MAP_BATCH, remove_columns=ds.column_names,
                              features=features, num_proc=num_proc if num_proc > 1 else None)[:]
            for name, column in mapped.items():
                out[name].extend(column)
            bar.update(end - start)
    bad = [i for i, e in enumerate(out["error"]) if e]
    if bad:
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise DataError(f"{source}: row {bad[0]}: {out['error'][bad[0]]}{more}")
    return out


@contextlib.contextmanager
def _datasets_bars_off():
    was_on = not datasets.are_progress_bars_disabled()
    if was_on:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------------- packing


def _single_row(example: dict) -> dict:
    n = len(example["input_ids"])
    return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"]), "position_ids": list(range(n))}


def best_fit_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group items of the given lengths into rows of <= max_length: the indices in each row.

    Best fit in input order (each item goes to the open row it fills most tightly), so the result is
    deterministic and rows keep roughly the input's (shuffled) order.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length {max_length}; truncate or drop it first")
        j = bisect.bisect_left(free, (n, -1))
        room, r = free.pop(j) if j < len(free) else (max_length, len(rows))
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        if room > n:
            bisect.insort(free, (room - n, r))
    return rows


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples into rows of <= max_length tokens (`best_fit_rows`); position_ids restart at 0 for every example."""
    packed = []
    for members in best_fit_rows([len(ex["input_ids"]) for ex in examples], max_length):
        parts = [_single_row(examples[i]) for i in members]
        packed.append({k: [t for p in parts for t in p[k]] for k in ("input_ids", "labels", "position_ids")})
    return packed


def collate(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad rows into (B, T) input_ids / labels / position_ids; no attention_mask.

    Padding gets labels -100 and positions 0, 1, ... of a segment of its own, so with packed-sequence
    detection from position_ids no real token attends to a pad (and pads only to each other).
    """
    longest = max(len(r["input_ids"]) for r in rows)
    T = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else longest
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        position_ids[b, :n] = torch.tensor(r["position_ids"])
        position_ids[b, n:] = torch.arange(T - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# ---------------------------------------------------------------------------------------------------- building


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows each member contributes: round(total * w_i / sum(w)) with total = sum of member sizes."""
    total, wsum = sum(sizes), sum(weights)
    return [round(total * w / wsum) for w in weights]


def sample_mixture(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(member, row) pairs in training order, deterministic by seed.

    A member is sampled without replacement up to its size, then cycled with a fresh shuffle per pass.
    """
    picks = []
    for m, (size, n) in enumerate(zip(sizes, mixture_counts(sizes, weights))):
        if n:
            picks += [(m, i) for i in SeededOrder(size, seed, f"mixture_member_{m}").take(0, n)]
    return [picks[j] for j in SeededOrder(len(picks), seed, "mixture").permutation(0)] if picks else []


@dataclass
class DataStats:
    """What happened to the training rows (and how many eval rows and prompts came out)."""

    rows: int = 0  # source rows drawn for training (after mixing)
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packed_sequences: int = 0  # training rows (packed or not)
    packing_efficiency: float = 0.0  # tokens / (packed_sequences * max_length)
    members: list[dict] = field(default_factory=list)  # per mixture member: path, split, weight, rows, kept
    eval_source: Optional[str] = None  # data.eval_path [eval_split], None when eval is off
    eval_examples: int = 0
    eval_prompts: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.dropped.items())
        lines = [
            f"train: {self.rows} rows -> {self.kept} examples (dropped: {dropped}; truncated {self.truncated})",
            f"tokens: {self.tokens} ({self.trained_tokens} trained, "
            f"{self.trained_tokens / max(self.tokens, 1):.1%})",
            f"sequences: {self.packed_sequences} (packing efficiency {self.packing_efficiency:.1%})",
        ]
        for m in self.members:
            lines.append(f"  {m['path']} [{m['split']}] weight {m['weight']:g}: {m['rows']} rows, {m['kept']} kept")
        source = self.eval_source or "none (data.eval_path=null)"
        lines.append(f"eval: {source}: {self.eval_examples} examples, {self.eval_prompts} generation prompts")
        return "\n".join(lines)


@dataclass
class EvalPrompt:
    """A held-out prompt for greedy generation, scored by exact match against `answer`."""

    prompt_ids: list[int]
    answer: str
    prompt_text: str
    family: Optional[str] = None
    phrasing: Optional[str] = None  # seen | heldout instruction wording
    family_split: Optional[str] = None  # trained | heldout task family
    # The dataset row it came from (every column), with the reference answer under "answer" unless the data has
    # a column of that name: what an RL reward function reads.
    row: dict = field(default_factory=dict)


@dataclass
class SupervisedData:
    """Everything a supervised stage trains and evaluates on, ready for `collate`."""

    train: list[dict]  # rows {"input_ids", "labels", "position_ids"}, each <= max_length tokens
    eval: list[dict]  # held-out rows for eval loss, one example each
    eval_prompts: list[EvalPrompt]  # for generation exact match, in source order
    stats: DataStats


def describe_source(path: str, split: str) -> str:
    """How errors name a source: a local file is its own split."""
    return path if Path(path).expanduser().exists() else f"{path} [{split}]"


def build_supervised_data(cfg: DataConfig, tokenizer, seed: int) -> SupervisedData:
    """Load, mix, tokenize, filter, shuffle and pack the training data; tokenize eval rows and prompts."""
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template  # also what an exported model will carry
    members = cfg.mixture or [DatasetSpec(path=cfg.path, format=cfg.format, split=cfg.split, name=cfg.name)]
    loaded = [load_rows(m.path, m.split, m.name) for m in members]
    tokenized = [_tokenize_dataset(ds, m.format, tokenizer, cfg, describe_source(m.path, m.split))
                 for ds, m in zip(loaded, members)]
    stats = DataStats(members=[{"path": m.path, "split": m.split, "weight": m.weight, "rows": 0, "kept": 0}
                               for m in members])
    examples = []
    for m, i in sample_mixture([len(ds) for ds in loaded], [m.weight for m in members], seed):
        status = tokenized[m]["status"][i]
        stats.members[m]["rows"] += 1
        if status in DROP_REASONS:
            stats.dropped[status] += 1
            continue
        stats.members[m]["kept"] += 1
        stats.truncated += status == "truncated"
        examples.append({"input_ids": tokenized[m]["input_ids"][i], "labels": tokenized[m]["labels"][i]})
    stats.rows, stats.kept = sum(s["rows"] for s in stats.members), len(examples)
    if not examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped.items())
        raise DataError(f"no training examples left after filtering ({stats.rows} rows; dropped {reasons}); "
                        f"check data.max_length / data.overlong and that rows have completions or assistant turns")
    train = pack_examples(examples, cfg.max_length) if cfg.packing else [_single_row(e) for e in examples]
    stats.tokens = sum(len(e["input_ids"]) for e in examples)
    stats.trained_tokens = sum(t != IGNORE_INDEX for e in examples for t in e["labels"])
    stats.packed_sequences = len(train)
    stats.packing_efficiency = stats.tokens / (len(train) * cfg.max_length)
    eval_rows, eval_prompts = _build_eval(cfg, tokenizer)
    stats.eval_examples, stats.eval_prompts = len(eval_rows), len(eval_prompts)
    stats.eval_source = describe_source(cfg.eval_path, cfg.eval_split) if cfg.eval_path is not None else None
    return SupervisedData(train, eval_rows, eval_prompts, stats)


def _build_eval(cfg: DataConfig, tokenizer) -> tuple[list[dict], list[EvalPrompt]]:
    if cfg.eval_path is None:
        return [], []
    ds = load_rows(cfg.eval_path, cfg.eval_split, cfg.name if cfg.eval_path == cfg.path else None)
    out = _tokenize_dataset(ds, cfg.eval_format, tokenizer, cfg, describe_source(cfg.eval_path, cfg.eval_split),
                            with_prompts=True)
    rows = [_single_row({"input_ids": ids, "labels": labels})
            for ids, labels, status in zip(out["input_ids"], out["labels"], out["status"]) if status not in DROP_REASONS]
    return rows, _eval_prompts(ds, out, tokenizer, cfg.max_length)


def build_prompts(cfg: DataConfig, tokenizer, path: str, split: str, fmt: str = "auto",
                  name: Optional[str] = None) -> list[EvalPrompt]:
    """The prompts of a dataset in any supported format, templated exactly as SFT templates them,
    each with its reference answer (what PPO samples from and scores exact match against).
    Prompts of `cfg.max_length` tokens or more are left out."""
    ds = load_rows(path, split, name)
    out = _tokenize_dataset(ds, fmt, tokenizer, cfg, describe_source(path, split), with_prompts=True)
    prompts = _eval_prompts(ds, out, tokenizer, cfg.max_length)
    if not prompts:
        lengths = [len(ids) for ids in out["prompt_ids"] if ids]
        if not lengths:
            raise DataError(f"{describe_source(path, split)}: no row has a prompt to answer (plain `text` documents "
                            f"have none)")
        shortest = f"; the shortest of its {len(lengths)} prompts has {min(lengths)} tokens"
        raise DataError(f"{describe_source(path, split)}: no prompts shorter than data.max_length={cfg.max_length}"
                        f"{shortest}; raise data.max_length or shorten the prompts")
    return prompts


def _eval_prompts(ds: datasets.Dataset, out: dict, tokenizer, max_length: int) -> list[EvalPrompt]:
    rows = ds.to_list()
    meta = {k: [row.get(k) for row in rows] for k in ("family", "phrasing", "family_split")}
    return [EvalPrompt(ids, answer, tokenizer.decode(ids), family, phrasing, family_split, {"answer": answer, **row})
            for ids, answer, family, phrasing, family_split, row
            in zip(out["prompt_ids"], out["answer"], meta["family"], meta["phrasing"], meta["family_split"], rows)
            if ids and len(ids) < max_length]


def unpack_row(row: dict) -> list[dict]:
    """The examples of a packed row ({"input_ids", "labels"} each), split where position_ids restart at 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [{k: row[k][a:b] for k in ("input_ids", "labels")} for a, b in zip(starts, starts[1:])]
