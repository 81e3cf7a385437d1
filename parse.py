r"""Text to action: the value of the last "action" key in a model's answer, if it is exactly one legal action.

The model is asked for JSON whose last field is "action", but it writes free text: the JSON may sit in a code
fence, be followed by prose, be cut off by the token limit, or use single quotes or none. ACTION_RE reads
    {"action": "<10>"}   {'action': '<hit>'}   "Action" : <+>, ...   action: <stand>   {"action": "<*>  (cut off)
(the value read in <>). Choices:
1. The value is compared, trimmed of spaces and quotes, with each legal action case-insensitively ("Hit" is
   "hit"), and must equal one exactly: "10" is never read as "1", and "+ or -" names no action.
2. Cut-off text is read as written: '{"action": "+' reads "+", so the action played is the tokens sampled.
3. An unquoted value runs to the next ',' '}' quote, newline or the end: 'action: hit.' reads "hit." (not legal).
When nothing legal is found the caller plays a random legal action and counts a format failure (the paper).
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
    """(index into actions or None, (start, end) of the value in text or None). text[start:end] is the value without
    quotes or surrounding spaces; the span is given whenever an "action" key is found, its value legal or not."""
    assert len(actions) > 0, "need at least one legal action"
    lowered = [a.lower() for a in actions]
    assert len(set(lowered)) == len(lowered), f"actions must be distinct (case-insensitively): {actions}"
    matches = list(ACTION_RE.finditer(text))
    if not matches:
        return None, None
    match = matches[-1]  # the last "action" key wins
    group = match.lastindex  # exactly one of the three value groups took part
    value = match.group(group)
    start = match.start(group) + len(value) - len(value.lstrip(TRIM))
    value = value.strip(TRIM)
    index = lowered.index(value.lower()) if value.lower() in lowered else None
    return index, (start, start + len(value))
