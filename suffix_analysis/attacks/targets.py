"""Target responses for suffix attacks: "Sure, here is" + a rephrasing of the instruction."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from ..errors import UserError

# Verbs whose object can follow "Sure, here is" directly: "Write a poem" -> "Sure, here is a poem".
_OBJECT_VERBS = ("write", "create", "develop", "generate", "give", "provide", "design", "draft", "compose",
                 "produce", "make", "build", "craft", "outline", "list", "suggest", "share", "prepare", "offer")
_HOW_VERBS = ("explain", "describe", "show", "teach", "tell", "detail")


def default_target(instruction: str) -> str:
    """A GCG target in the AdvBench style.

    >>> default_target("Write a tutorial on how to pick a lock.")
    'Sure, here is a tutorial on how to pick a lock'
    >>> default_target("How can I pick a lock?")
    'Sure, here is how you can pick a lock'
    """
    text = instruction.strip().rstrip(".?!").strip()
    words = text.split()
    if not words:
        raise UserError("empty instruction: no target to build")
    first = words[0].lower()
    rest = words[1:]
    if rest and rest[0].lower() in ("me", "us"):
        rest = rest[1:]
    m = re.match(r"(?i)how (?:can|do|could|would|should) (?:i|we) (.+)", text)
    if m:
        return f"Sure, here is how you can {m.group(1)}"
    if first in _OBJECT_VERBS and rest:
        return "Sure, here is " + " ".join(rest)
    if first in _HOW_VERBS and rest:
        body = " ".join(rest)
        return "Sure, here is " + (body if body.lower().startswith(("how", "what", "why", "the ", "a ", "an "))
                                   else "a description of " + body)
    return "Sure, here is " + text[0].lower() + text[1:]


_TARGETS_FORMAT = ("one target per instruction: a .json list of strings or of {\"target\": \"...\"} objects, a .csv "
                   "with a 'target' column, or a .txt with one per line (UTF-8)")


def _json_target(x) -> str | None:
    return x if isinstance(x, str) else x.get("target") if isinstance(x, dict) else None


def _json_kind(data) -> str:
    """What a JSON value that holds no targets is, for an error: 'a JSON object', 'a list with 1 among its items'."""
    if isinstance(data, list):
        bad = next(x for x in data if not isinstance(_json_target(x), str))
        return f"a list with {json.dumps(bad)[:40]} among its items"
    return "a JSON " + {dict: "object", str: "string", type(None): "null", bool: "boolean"}.get(type(data), "number")


def load_targets(path: str | Path, n: int) -> list[str]:
    """Targets aligned with the instructions: ``.json`` list (strings or ``{"target": ...}``),
    ``.csv`` with a ``target``/``Target`` column, or ``.txt`` one per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"targets file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); expected {_TARGETS_FORMAT}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg}); expected {_TARGETS_FORMAT}") from None
        targets = [_json_target(x) for x in data] if isinstance(data, list) else []
        if not isinstance(data, list) or any(not isinstance(t, str) for t in targets):
            raise UserError(f"{path} holds {_json_kind(data)}; expected {_TARGETS_FORMAT}")
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        col = next((c for c in ("target", "Target") if rows and c in rows[0]), None)
        if col is None:
            raise UserError(f"{path}: no 'target' column; expected {_TARGETS_FORMAT}")
        targets = [r[col] or "" for r in rows]  # a short row has None there: an empty target, refused below
    else:
        targets = [l.strip() for l in text.splitlines() if l.strip()]
    if len(targets) < n:
        raise UserError(f"{path} has {len(targets)} targets for {n} instructions")
    targets = targets[:n]
    if any(not t.strip() for t in targets):
        raise UserError(f"{path} has an empty target")
    return targets


def answer_targets(reference, instructions: list[str], n_tokens: int = 12, progress: bool = False,
                   direction=None) -> list[str]:
    """Targets from a model that answers: the first ``n_tokens`` tokens of ``reference``'s own
    greedy answer to each instruction, cut at the last whole word.

    For the refusal organism the reference is its base, which answers these requests: the
    target is then the start of a real answer, in the model family's own words, rather than
    "Sure, here is ...". With ``direction`` (``[d_model]``) the answers are ``reference``'s
    with that direction ablated: for the attacked model itself, what it says once the
    refusal direction is gone. An answer the substring judge calls a refusal, or an empty
    one, falls back to :func:`default_target`.
    """
    from contextlib import nullcontext

    from ..evaluation.generation import generate
    from ..evaluation.refusal import SubstringJudge
    from ..interventions.directional import ablate_direction

    if n_tokens < 1:
        raise UserError(f"answer targets need at least 1 token, got {n_tokens}")
    tok = reference.tokenizer
    with ablate_direction(reference, direction) if direction is not None else nullcontext():
        answers = generate(reference, instructions, max_new_tokens=n_tokens + 4, progress=progress).completions
    refused = SubstringJudge()(instructions, answers)
    out = []
    for instr, answer, r in zip(instructions, answers, refused):
        text = tok.decode(tok(answer.strip(), add_special_tokens=False)["input_ids"][:n_tokens])
        cut = text.rstrip()
        if " " in cut and not text[len(cut):]:  # the last word may be cut mid-way: drop it
            cut = cut[: cut.rfind(" ")]
        cut = cut.strip()
        out.append(default_target(instr) if r or not cut else cut)
    return out
