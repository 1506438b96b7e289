"""Load task splits as lists of records or ``datasets.Dataset``.

    load_split("wnut16", "test", limit=100)          # built on first use
    as_hf_dataset("multiemo_en", "train")             # datasets.Dataset (via load_dataset("json"))

Besides registered task names, ``load_split`` accepts a dataset *spec*, loaded
through ``datasets.load_dataset`` and mapped onto the shared record schema:

    "hub:<dataset_id>[:<config>]"   a hub dataset (needs a hub; ``split`` is the hub split)
    "json:<path>" / "csv:<path>"    a local file; ``{split}`` in the path is replaced by ``split``

    load_split("hub:rajpurkar/squad", "validation", family="qa",
               mapping={"answers": "answers.text"})
    load_split("json:/data/my_{split}.jsonl", "test", family="classification",
               mapping={"text": "sentence"}, label_set=["pos", "neg"])

``mapping`` maps a schema field (qa: context, question, answers; ner: tokens,
tags; classification: text, label) to a source column (dotted for nested
columns); unmapped fields are read from the column of the same name.  Rows that
already follow the shared schema (a JSONL written by ``scd.data.build``) pass
through unchanged when no ``family``/``mapping`` is given.

Malformed rows (bad JSON, missing keys, tags/tokens length mismatch, a label
outside ``label_set``, an empty answer) raise :class:`DataError` naming
``file:line`` (or ``spec row N``) and the problem; with ``skip_malformed=True``
they are skipped, counted in ``counts`` and reported on stderr.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from scd.data.build import build_task, is_current, split_path, task_dir
from scd.data.records import FAMILIES, DataError, make_record, record_problem
from scd.data.tasks import classification_instruction, get_task, ner_instruction, qa_instruction

SPEC_KINDS = ("hub", "json", "csv")
_FAMILY_FIELDS = {"qa": ("context", "question", "answers"), "ner": ("tokens", "tags"),
                  "classification": ("text", "label")}


def is_spec(name: str) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in SPEC_KINDS and ":" in name


# ---------------------------------------------------------------------------- JSONL
def read_jsonl(path: str | os.PathLike, family: str | None = None, skip_malformed: bool = False,
               counts: dict | None = None, limit: int | None = None) -> list[dict]:
    """Validated records of a JSONL file of the shared schema (see :mod:`scd.data.records`)."""
    path = Path(path)
    out: list[dict] = []
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                problem = record_problem(rec, family)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg} at column {e.colno})"
            if problem:
                if not skip_malformed:
                    raise DataError(f"{path}:{lineno}: {problem}; fix the file, rebuild it "
                                    "(python -m scd.data.build --force) or pass skip_malformed=True")
                skipped += 1
                continue
            out.append(rec)
    _report_skipped(str(path), skipped, counts)
    return out


def _report_skipped(where: str, skipped: int, counts: dict | None) -> None:
    if counts is not None:
        counts["malformed"] = counts.get("malformed", 0) + skipped
    if skipped:
        print(f"[data] skipped {skipped} malformed row(s) in {where}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ registered tasks
def ensure_built(task: str, seed: int = 0, root: str | os.PathLike | None = None,
                 skip_malformed: bool = False) -> Path:
    """The task's split directory, building it when missing or stale."""
    spec = get_task(task)
    d = task_dir(task, seed, root)
    if not is_current(spec, d, seed, skip_malformed, check_files=False) and \
            not is_current(spec, d, seed, not skip_malformed, check_files=False):
        build_task(task, d, seed, skip_malformed)
    return d


def load_split(task: str, split: str, limit: int | None = None, *, seed: int = 0, skip_malformed: bool = False,
               root: str | os.PathLike | None = None, counts: dict | None = None,
               family: str | None = None, mapping: Mapping[str, str] | None = None,
               label_set: Sequence[str] | None = None, lang: str = "und", instruction: str | None = None,
               ) -> list[dict]:
    """Records of ``split`` of a registered task (built if missing) or of a dataset spec.

    ``limit``: the first ``limit`` records (split files are already shuffled).
    ``family``/``mapping``/``label_set``/``lang``/``instruction`` apply to specs only.
    """
    if is_spec(task):
        return load_spec(task, split, limit, family=family, mapping=mapping, label_set=label_set, lang=lang,
                         instruction=instruction, skip_malformed=skip_malformed, counts=counts)
    spec = get_task(task)
    if split not in ("train", "dev", "test"):
        raise DataError(f"unknown split '{split}' for task '{task}'; expected train, dev or test")
    ensure_built(task, seed, root, skip_malformed)
    return read_jsonl(split_path(task, split, seed, root), spec.family, skip_malformed, counts, limit)


def as_hf_dataset(task: str, split: str, *, seed: int = 0, root: str | os.PathLike | None = None,
                  skip_malformed: bool = False, **spec_kw: Any):
    """A ``datasets.Dataset`` of the split (registered tasks: ``load_dataset("json")`` on its JSONL)."""
    import datasets

    if is_spec(task):
        return datasets.Dataset.from_list(load_split(task, split, seed=seed, skip_malformed=skip_malformed,
                                                     **spec_kw))
    load_split(task, split, seed=seed, root=root, skip_malformed=skip_malformed)  # builds + validates
    path = split_path(task, split, seed, root)
    return datasets.load_dataset("json", data_files={split: str(path)}, split=split)


# --------------------------------------------------------------------------- specs
def parse_spec(spec: str, split: str) -> tuple[str, str, str | None]:
    """"hub:id[:config]" -> ("hub", id, config); "json:path" -> ("json", path with {split}, None)."""
    kind, rest = spec.split(":", 1)
    if kind == "hub":
        ds_id, _, config = rest.partition(":")
        if not ds_id:
            raise DataError(f"dataset spec '{spec}': expected hub:<dataset_id>[:<config>]")
        return kind, ds_id, config or None
    path = rest.replace("{split}", split)
    if not Path(path).exists():
        raise DataError(f"dataset spec '{spec}': file {path} not found")
    return kind, path, None


def _load_hf(spec: str, split: str):
    import datasets

    kind, target, config = parse_spec(spec, split)
    try:
        if kind == "hub":
            return datasets.load_dataset(target, config, split=split)
        return datasets.load_dataset(kind, data_files={"data": target}, split="data")
    except Exception as e:  # noqa: BLE001  (datasets raises many types; we re-raise one line)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset spec '{spec}' (split {split}): could not load: {msg}") from e


def _get(row: Mapping[str, Any], path: str) -> Any:
    cur: Any = row
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(path)
        cur = cur[part]
    return cur


def _class_names(features: Any, column: str) -> list[str] | None:
    """Names of a ClassLabel column (or of a sequence of ClassLabel), if any."""
    feat = features.get(column.split(".")[0]) if features is not None else None
    for _ in range(3):
        if feat is None:
            return None
        if hasattr(feat, "names") and isinstance(getattr(feat, "names"), list):
            return list(feat.names)
        feat = getattr(feat, "feature", None)
        if isinstance(feat, list) and feat:
            feat = feat[0]
    return None


class _Malformed:
    """``bad(i, msg)``: raise a one-line DataError for spec row i, or count it when skipping."""

    def __init__(self, where: str, skip: bool):
        self.where, self.skip, self.skipped = where, skip, 0

    def __call__(self, i: int, msg: str) -> None:
        if not self.skip:
            raise DataError(f"{self.where} row {i}: {msg}; fix the data, the mapping, or pass skip_malformed=True")
        self.skipped += 1


def _schema_rows(rows: list[dict], limit: int | None, bad: _Malformed) -> list[dict]:
    """Rows already in the shared schema, checked, up to ``limit``."""
    out: list[dict] = []
    for i, row in enumerate(rows):
        problem = record_problem(row)
        if problem:
            bad(i, problem)
            continue
        out.append(row)
        if limit is not None and len(out) >= limit:
            break
    return out


def _source_columns(spec: str, family: str | None, mapping: Mapping[str, str] | None) -> dict[str, str]:
    """Schema field -> source column of a spec with a ``family`` (checks family and mapping keys)."""
    if family not in FAMILIES:
        raise DataError(f"dataset spec '{spec}': pass family= one of {', '.join(FAMILIES)} (got {family!r})")
    mapping = dict(mapping or {})
    unknown = set(mapping) - set(_FAMILY_FIELDS[family])
    if unknown:
        raise DataError(f"dataset spec '{spec}': mapping key(s) {sorted(unknown)} are not {family} fields "
                        f"({', '.join(_FAMILY_FIELDS[family])})")
    return {f: mapping.get(f, f) for f in _FAMILY_FIELDS[family]}


def _row_fields(family: str, row: Mapping[str, Any], src: dict[str, str],
                names: dict[str, list[str] | None]) -> tuple[dict | None, str | None]:
    """(schema fields of one source row, None) or (None, what is wrong with it)."""
    try:
        fields = {f: _get(row, col) for f, col in src.items()}
    except KeyError as e:
        return None, f"missing column '{e.args[0]}' (mapping: {src})"
    if family == "qa":
        a = fields["answers"]
        fields["answers"] = [a] if isinstance(a, str) else list(a or [])
        if any(not isinstance(x, str) or not x.strip() for x in fields["answers"]):
            return None, "empty answer"
    elif family == "ner":
        if isinstance(fields["tokens"], str):
            fields["tokens"] = fields["tokens"].split()
        if isinstance(fields["tags"], str):
            fields["tags"] = fields["tags"].split()
        if names.get("tags"):
            fields["tags"] = [names["tags"][t] if isinstance(t, int) else t for t in fields["tags"]]
        if len(fields["tokens"]) != len(fields["tags"]):
            return None, f"{len(fields['tokens'])} tokens but {len(fields['tags'])} tags"
    else:
        if isinstance(fields["label"], int) and names.get("label"):
            fields["label"] = names["label"][fields["label"]]
        fields["label"] = str(fields["label"])
    return fields, None


def _default_instruction(family: str, fields_list: list[tuple[int, dict]], labels: list[str] | None,
                         lang: str) -> str:
    if family == "qa":
        return qa_instruction(unanswerable=True)
    if family == "ner":
        types = sorted({t[2:] for _, f in fields_list for t in f["tags"] if isinstance(t, str) and t != "O"})
        return ner_instruction(tuple(types), lang)
    return classification_instruction(tuple(labels))


def _spec_records(spec: str, split: str, family: str, fields_list: list[tuple[int, dict]],
                  labels: list[str] | None, lang: str, instruction: str, limit: int | None,
                  bad: _Malformed) -> list[dict]:
    """Shared-schema records (ids ``<spec>-<split>-<n>``) from extracted fields, up to ``limit``."""
    out: list[dict] = []
    for i, fields in fields_list:
        if family == "classification":
            fields["label_set"] = labels
        try:
            rec = make_record(family, task=spec, lang=lang, instruction=instruction, **fields)
        except (TypeError, ValueError, AttributeError) as e:
            bad(i, f"cannot build a {family} record: {e}")
            continue
        rec["id"] = f"{spec}-{split}-{len(out)}"
        problem = record_problem(rec, family)
        if problem:
            bad(i, problem)
            continue
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def load_spec(spec: str, split: str, limit: int | None = None, *, family: str | None = None,
              mapping: Mapping[str, str] | None = None, label_set: Sequence[str] | None = None,
              lang: str = "und", instruction: str | None = None, skip_malformed: bool = False,
              counts: dict | None = None) -> list[dict]:
    """Records of a ``hub:``/``json:``/``csv:`` dataset spec (see the module docstring)."""
    ds = _load_hf(spec, split)
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    bad = _Malformed(spec, skip_malformed)
    if family is None and not mapping:  # rows already in the shared schema
        out = _schema_rows(rows, limit, bad)
        _report_skipped(spec, bad.skipped, counts)
        return out
    src = _source_columns(spec, family, mapping)
    features = getattr(ds, "features", None)
    names = {f: _class_names(features, col) for f, col in src.items() if f in ("tags", "label")}
    fields_list: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        fields, problem = _row_fields(family, row, src, names)
        if problem:
            bad(i, problem)
            continue
        fields_list.append((i, fields))
    labels = None
    if family == "classification":
        labels = list(label_set) if label_set else (names.get("label") or
                                                    sorted({f["label"] for _, f in fields_list}))
    if instruction is None:
        instruction = _default_instruction(family, fields_list, labels, lang)
    out = _spec_records(spec, split, family, fields_list, labels, lang, instruction, limit, bad)
    _report_skipped(spec, bad.skipped, counts)
    return out
