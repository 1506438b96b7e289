"""Prompt/target rendering for causal LMs, and parsing of NER outputs.

    msgs   = build_messages(example, shots)        # chat messages (shots = extra user/assistant turns)
    prompt = render_prompt(example, tokenizer)     # chat template + generation prompt, or a plain format
    target = render_target(example, tokenizer)     # target text + end-of-turn / eos text
    parse_entities("person: Ada; geo-loc: Paris") -> [("person", "Ada"), ("geo-loc", "Paris")]
    entities_to_bio(tokens, entities)              -> BIO tags (seqeval input)

Plain format (tokenizers without a chat template)::

    <instruction>\\n\\n<shot input>\\n\\nAnswer: <shot target>\\n\\n<input>\\n\\nAnswer:

and the target is ``" " + target + eos``.  ``prompt + target`` is exactly the
text a full conversation renders to, so SFT labels line up with generation.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Sequence

from scd.data.records import ENTITY_SEP, NO_ENTITIES

ANSWER_PREFIX = "Answer:"
_SENTINEL = "\u2063SCD_TARGET\u2063"


# ------------------------------------------------------------------------ messages
def build_messages(example: dict, shots: Sequence[dict] = ()) -> list[dict]:
    """[{role, content}]: the instruction opens the first user turn; each shot is a
    user (input) + assistant (target) pair before the example's own user turn."""
    instruction = example["instruction"].strip()
    msgs: list[dict] = []
    for shot in (*shots, example):
        content = f"{instruction}\n\n{shot['input']}" if instruction and not msgs else shot["input"]
        msgs.append({"role": "user", "content": content})
        if shot is not example:
            msgs.append({"role": "assistant", "content": shot["target"]})
    return msgs


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(example: dict, tokenizer: Any = None, shots: Sequence[dict] = ()) -> str:
    """The text before the answer (chat template with ``add_generation_prompt`` when available)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(build_messages(example, shots), tokenize=False,
                                             add_generation_prompt=True)
    parts = [example["instruction"].strip()]
    for shot in shots:
        parts += [shot["input"], f"{ANSWER_PREFIX} {shot['target']}"]
    parts += [example["input"], ANSWER_PREFIX]
    return "\n\n".join(parts)


_SUFFIX_CACHE: dict[tuple, tuple[str, str]] = {}


def _assistant_wrap(tokenizer: Any) -> tuple[str, str]:
    """(text before, text after) the assistant content in the chat template, cut after eos."""
    key = (id(tokenizer), tokenizer.chat_template, getattr(tokenizer, "eos_token", None))
    if key not in _SUFFIX_CACHE:
        msgs = [{"role": "user", "content": "x"}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
        eos = getattr(tokenizer, "eos_token", None) or ""
        if full.startswith(prompt) and _SENTINEL in full:
            before, after = full[len(prompt):].split(_SENTINEL, 1)
            if eos and eos in after:
                after = after[: after.index(eos) + len(eos)]
        else:  # templates that rewrite earlier turns: fall back to target + eos
            before, after = "", eos
        _SUFFIX_CACHE[key] = (before, after)
    return _SUFFIX_CACHE[key]


def render_target(example: dict, tokenizer: Any = None) -> str:
    """The answer text the model should generate after :func:`render_prompt`, with its end marker."""
    if has_chat_template(tokenizer):
        before, after = _assistant_wrap(tokenizer)
        return f"{before}{example['target']}{after}"
    eos = getattr(tokenizer, "eos_token", None) or ""
    return f" {example['target']}{eos}"


def render_example(example: dict, tokenizer: Any = None, shots: Sequence[dict] = ()) -> tuple[str, str]:
    return render_prompt(example, tokenizer, shots), render_target(example, tokenizer)


def select_shots(pool: Sequence[dict], k: int, seed: int = 0, exclude_id: str | None = None) -> list[dict]:
    """``k`` examples from ``pool`` in a seeded order (sha256 of seed and id; stable across runs)."""
    if k <= 0:
        return []
    cand = [ex for ex in pool if ex.get("id") != exclude_id]
    cand.sort(key=lambda ex: hashlib.sha256(f"{seed}\x00{ex.get('id')}".encode("utf-8")).hexdigest())
    return cand[:k]


# --------------------------------------------------------------------- NER parsing
_ITEM_SPLIT = re.compile(r";(?:\s+|$)|\n+")
_TYPE_RE = re.compile(r"^[\w][\w.\-/]{0,39}$", re.UNICODE)


def parse_entities(text: str, types: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """``"type: text; type: text"`` -> [(type, text)] (types lower-cased).

    Tolerant of surrounding whitespace, case, newlines as separators, bullets and
    balanced quotes around the text; ``"none"``, an empty string or text without ``type: text`` items gives
    ``[]``.  A piece without a valid ``type:`` prefix is glued back onto the
    previous item (entity text that itself contains ``"; "``).  With ``types``,
    items of other types are dropped.
    """
    if not isinstance(text, str):
        return []
    t = text.strip()
    if t.strip(" .\"'").lower() in ("", NO_ENTITIES):
        return []
    allowed = {x.lower(): x for x in types} if types is not None else None
    out: list[list[str]] = []
    for piece in _ITEM_SPLIT.split(t):
        typ, sep, ent = piece.partition(":")
        typ = typ.strip().strip("-*•\"'`").strip().lower()
        valid = bool(sep) and bool(_TYPE_RE.match(typ)) and (allowed is None or typ in allowed)
        if valid:
            out.append([allowed[typ] if allowed else typ, ent.strip()])
        elif out and piece.strip():
            out[-1][1] = f"{out[-1][1]}{ENTITY_SEP}{piece.strip()}"
    cleaned = []
    for typ, ent in out:
        ent = ent.strip()
        if len(ent) >= 2 and ent[0] == ent[-1] and ent[0] in "\"'`":  # balanced quotes around the text
            ent = ent[1:-1].strip()
        if ent and ent.lower() != NO_ENTITIES:
            cleaned.append((typ, ent))
    return cleaned


def _norm(s: str, fold: bool = True) -> str:
    s = " ".join(s.split())
    return s.casefold() if fold else s


def _find_span(norm_tokens: list[str], want: str, used: list[bool], start: int) -> tuple[int, int] | None:
    n = len(norm_tokens)
    for i in range(start, n):
        if used[i] or not norm_tokens[i] or not want.startswith(norm_tokens[i]):
            continue
        joined, j = norm_tokens[i], i + 1
        while True:
            if joined == want:
                if not any(used[i:j]):
                    return i, j
                break
            if j >= n or len(joined) >= len(want) or not want.startswith(joined):
                break
            joined = f"{joined} {norm_tokens[j]}" if norm_tokens[j] else joined
            j += 1
    return None


def entities_to_bio(tokens: Sequence[str], entities: Iterable[Any]) -> list[str]:
    """Map predicted entity strings back to token spans -> BIO tags.

    ``entities``: (type, text) pairs or {type, text} dicts, in predicted order.
    Each entity takes the first unused token sequence equal to its text
    (whitespace-insensitive), searching from the end of the previous match first
    (targets list entities in order of appearance) and then from the start; a
    case-sensitive match is preferred, then a case-insensitive one.
    Entities whose text is not in the sentence cannot be placed and are ignored
    (an evaluation that must penalise them has to count them separately).
    """
    exact_tokens = [_norm(t, fold=False) for t in tokens]
    folded_tokens = [_norm(t) for t in tokens]
    tags = ["O"] * len(tokens)
    used = [False] * len(tokens)
    pos = 0
    for ent in entities:
        typ, text = (ent["type"], ent["text"]) if isinstance(ent, dict) else (ent[0], ent[1])
        exact, folded = _norm(text, fold=False), _norm(text)
        if not folded or not typ:
            continue
        span = (_find_span(exact_tokens, exact, used, pos) or _find_span(exact_tokens, exact, used, 0)
                or _find_span(folded_tokens, folded, used, pos) or _find_span(folded_tokens, folded, used, 0))
        if span is None:
            continue
        i, j = span
        tags[i] = f"B-{typ}"
        for k in range(i + 1, j):
            tags[k] = f"I-{typ}"
        for k in range(i, j):
            used[k] = True
        pos = j
    return tags
