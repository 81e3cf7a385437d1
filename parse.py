r"""Text to action: find the value of the last "action" key in a model's answer.

The model is asked for a JSON answer whose last field is "action", but what it
writes is free text: the JSON may sit in a code fence, be followed by prose,
be cut off by the token limit, or use single quotes or no quotes at all. We
read the value of the LAST "action" key and accept it only when it equals one
legal action string exactly (after trimming spaces and quotes), so "10" is
never read as "1" and "+ or -" names no action. When nothing legal is found
the caller plays a random legal action and counts a format failure (the paper).

Formats ACTION_RE accepts (the value read is in <>):
    {"action": "<10>"}    {'action': '<hit>'}    "Action" : <+>, ...    action: <stand>
    ```json\n{"thoughts": "...", "action": "<=>"}\n```  followed by any text
    {"thoughts": "...", "action": "<*>      (cut off: no closing quote or brace)

Choices:
1. Case-insensitive comparison: "Hit" and "HIT" are "hit". The actions are
   symbols, digits, "stand" and "hit", so this merges nothing.
2. Cut-off text is read as written: '{"action": "+' (no closing quote) reads
   "+". The action played is then exactly the tokens the model sampled, even
   if '"action": "1' was cut before a "0" would have come.
3. An unquoted value runs to the next ',' '}' quote, newline or the end:
   'action: hit }' reads "hit", 'action: hit.' reads "hit." (not legal).
"""
import re
from typing import Sequence

ACTION_RE = re.compile(
    r"""(?<!\w)["']?action["']?\s*:    # the key, quoted or not, any case, then ':'
    (?=\s*(?:                          # the value sits in a lookahead so it never swallows a later key
        "([^"\n]*)"                    # 1: double-quoted
      | '([^'\n]*)'                    # 2: single-quoted
      | ["']?([^,}\n"']*)              # 3: unquoted, or cut off after the opening quote
    ))""",
    re.IGNORECASE | re.VERBOSE,
)
TRIM = " \t\r\f\v\"'"  # trimmed off both ends of a value before comparing


def parse_action(text: str, actions: Sequence[str]) -> tuple[int | None, tuple[int, int] | None]:
    """Return (index into actions or None, (start, end) of the value in text or None).

    text[start:end] is the value without its quotes or surrounding spaces. The span
    is given whenever an "action" key is found, even if its value is not legal; it is
    None only when there is no "action" key at all.
    """
    assert len(actions) > 0, "need at least one legal action"
    lowered = [a.lower() for a in actions]
    assert len(set(lowered)) == len(lowered), f"actions must be distinct (case-insensitively): {actions}"
    matches = list(ACTION_RE.finditer(text))
    if not matches:
        return None, None
    match = matches[-1]  # the last "action" key wins
    group = match.lastindex  # exactly one of the three value groups took part
    value, start = match.group(group), match.start(group)
    start += len(value) - len(value.lstrip(TRIM))
    value = value.strip(TRIM)
    span = (start, start + len(value))
    index = lowered.index(value.lower()) if value.lower() in lowered else None
    return index, span
