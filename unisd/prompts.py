"""Teacher contexts: the example with a reference answer in its prompt, and demonstrations.

The in-context teacher is the same model that sees, in its user turn, a reference
answer (UniSD, arXiv 2605.06597; SDFT of Shenfeld et al.).  Two wordings are named in
:data:`TEMPLATES` (a component's ``template:`` takes a name or a text with ``{input}`` and
``{reference}``):

* ``released`` (the default) -- the released UniSD code's (Ahren09/UniSD
  src/data/teacher_text.py:17-24, src/const.py:59)::

      <input>

      This is an example for a response to the question:
      <reference>

      Carefully study the reference solution, then solve the problem below with your own approach.

* ``ours`` -- the wording of every run before issue 20 ("A reference answer to this
  request: ... Study the reference answer, then answer the request above yourself.").

Prompts are rendered with :func:`scd.data.prompts.render_prompt` on a copy of the
example whose ``input`` carries that block, so chat templates, few-shot turns and
the plain fallback format all work unchanged.

The agreement teachers' released context (:func:`agreement_example`; src/data/scienceqa.py:151-202)
puts solved examples of OTHER questions ("## Reference Samples (DO NOT SOLVE THESE)") before
the student's own prompt, and no reference answer of the example itself.

Negative (wrong) demonstrations for the contrastive teacher are another training
example's answer of the same task with a different target (``wrong_reference``):
plausible in form, wrong in content.  We do not generate wrong answers with a model.
"""
from __future__ import annotations

import random
from typing import Sequence

from scd.core.registry import did_you_mean
from scd.data.prompts import has_chat_template, render_prompt

RELEASED_INSTRUCTION = "Carefully study the reference solution, then solve the problem below with your own approach."
TEMPLATES = {
    "released": "{input}\n\nThis is an example for a response to the question:\n{reference}\n\n" + RELEASED_INSTRUCTION,
    "ours": ("{input}\n\nA reference answer to this request:\n{reference}\n\n"
             "Study the reference answer, then answer the request above yourself."),
}
REFERENCE_TEMPLATE = TEMPLATES["released"]

# released agreement context (src/data/scienceqa.py:161-165, 185-193, 195-200)
DEMO_HEADER = ("## Reference Samples (DO NOT SOLVE THESE)\n"
               "The following are solved examples from OTHER questions, provided only as reference.\n"
               "Do NOT copy their answers. Do NOT mention these examples in your final answer.\n\n")
DEMO_BLOCK = "### [REFERENCE ONLY #{n}]\nReference Question:\n{input}\n\nReference Answer:\n{target}\n"
DEMO_SEPARATOR = ("\n-----\n## Task to Solve (ONLY ANSWER THIS TASK)\n"
                  "Now solve ONLY the following task. Output ONLY the answer for THIS task.\n\n")


def check_template(template: str) -> str:
    """A template name of :data:`TEMPLATES` or a text with ``{input}`` and ``{reference}``; else ValueError."""
    if template in TEMPLATES:
        return template
    if "{" not in template:
        raise ValueError(f"unknown template '{template}'{did_you_mean(template, list(TEMPLATES))}; "
                         f"known: {', '.join(TEMPLATES)} (or a text with {{input}} and {{reference}})")
    for field in ("{input}", "{reference}"):
        if field not in template:
            raise ValueError(f"reference template must contain {field}, got {template!r}")
    return template


def template_text(template: str) -> str:
    """The text of a template name (a text is returned as it is)."""
    return TEMPLATES.get(template, template)


def with_reference(example: dict, reference: str, template: str = "released") -> dict:
    """A copy of ``example`` whose input shows ``reference`` (the answer is not changed)."""
    text = template_text(template)
    return {**example, "input": text.replace("{input}", example["input"]).replace("{reference}", reference)}


def teacher_prompt(example: dict, tokenizer, *, reference: str | None = None, shots: Sequence[dict] = (),
                   template: str = "released") -> str:
    """The teacher's prompt text: the example with ``reference`` (default its own target) and shots."""
    ref = example["target"] if reference is None else reference
    return render_prompt(with_reference(example, ref, template), tokenizer, shots=tuple(shots))


def demo_block(demos: Sequence[dict]) -> str:
    """Header, the solved demonstrations and the separator of the released agreement context."""
    refs = [DEMO_BLOCK.format(n=n, input=d["input"], target=d["target"]) for n, d in enumerate(demos, 1)]
    return DEMO_HEADER + "\n".join(refs) + DEMO_SEPARATOR


def agreement_prompt(example: dict, demos: Sequence[dict], tokenizer, *, shots: Sequence[dict] = ()) -> str:
    """An agreement teacher's prompt as released: :func:`demo_block` before the student's own
    user turn (its instruction and input), no reference answer of ``example``.

    With few-shot ``shots`` the instruction stays in the first turn, as in the student prompt.
    """
    block = demo_block(demos)
    instruction = example["instruction"].strip()
    if shots or not instruction:
        return render_prompt({**example, "input": block + example["input"]}, tokenizer, shots=tuple(shots))
    text = render_prompt({**example, "instruction": "", "input": f"{block}{instruction}\n\n{example['input']}"},
                         tokenizer)
    return text if has_chat_template(tokenizer) else text.lstrip("\n")


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
