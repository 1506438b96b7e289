"""Teacher contexts: the example with a reference answer in its prompt, and demonstrations.

The in-context teacher is the same model that sees, in its user turn, a reference
answer (UniSD, arXiv 2605.06597; SDFT of Shenfeld et al.).  The wording is ours::

    <input>

    A reference answer to this request:
    <reference>

    Study the reference answer, then answer the request above yourself.

Prompts are rendered with :func:`scd.data.prompts.render_prompt` on a copy of the
example whose ``input`` carries that block, so chat templates, few-shot turns and
the plain fallback format all work unchanged.

Negative (wrong) demonstrations for the contrastive teacher are another training
example's answer of the same task with a different target (``wrong_reference``):
plausible in form, wrong in content.  We do not generate wrong answers with a model.
"""
from __future__ import annotations

import random
from typing import Sequence

from scd.data.prompts import render_prompt

REFERENCE_TEMPLATE = ("{input}\n\nA reference answer to this request:\n{reference}\n\n"
                      "Study the reference answer, then answer the request above yourself.")


def check_template(template: str) -> str:
    for field in ("{input}", "{reference}"):
        if field not in template:
            raise ValueError(f"reference template must contain {field}, got {template!r}")
    return template


def with_reference(example: dict, reference: str, template: str = REFERENCE_TEMPLATE) -> dict:
    """A copy of ``example`` whose input shows ``reference`` (the answer is not changed)."""
    return {**example, "input": template.replace("{input}", example["input"]).replace("{reference}", reference)}


def teacher_prompt(example: dict, tokenizer, *, reference: str | None = None, shots: Sequence[dict] = (),
                   template: str = REFERENCE_TEMPLATE) -> str:
    """The teacher's prompt text: the example with ``reference`` (default its own target) and shots."""
    ref = example["target"] if reference is None else reference
    return render_prompt(with_reference(example, ref, template), tokenizer, shots=tuple(shots))


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def wrong_reference_index(i: int, examples: Sequence[dict], seed: int, *, _by_task: dict | None = None) -> int | None:
    """Index of another example of the same task whose target differs from example i's.

    Deterministic in (seed, i); None when the task has no example with a different target.
    """
    ex = examples[i]
    own = _norm(ex["target"])
    pool = (_by_task or {}).get(ex.get("task"))
    if pool is None:
        pool = [j for j, o in enumerate(examples) if o.get("task") == ex.get("task")]
    rng = random.Random(f"wrong\x00{seed}\x00{i}")
    for _ in range(32):  # rejection sampling: cheap when targets are diverse
        j = pool[rng.randrange(len(pool))]
        if j != i and _norm(examples[j]["target"]) != own:
            return j
    cands = [j for j in pool if j != i and _norm(examples[j]["target"]) != own]
    return cands[rng.randrange(len(cands))] if cands else None


def wrong_reference_table(examples: Sequence[dict], seed: int) -> list[int | None]:
    """``wrong_reference_index`` for every example."""
    by_task: dict = {}
    for j, o in enumerate(examples):
        by_task.setdefault(o.get("task"), []).append(j)
    return [wrong_reference_index(i, examples, seed, _by_task=by_task) for i in range(len(examples))]
