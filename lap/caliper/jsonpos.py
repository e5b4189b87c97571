"""Where in the document a JSON syntax error sits, as a JSON path.

Used only when the body fails to parse, so that an error inside ``data[3]`` is
reported against that item.  A small forgiving scanner walks the text up to the
error offset and keeps the stack of open objects/arrays and current keys.
"""

from __future__ import annotations

import json
import re

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def join(path: str, key: str | int) -> str:
    """Append an object key or array index to a JSON path ("$.data[3].actor")."""
    if type(key) is int:
        return f"{path}[{key}]"
    if _IDENT.match(key):
        return f"{path}.{key}"
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'{path}["{escaped}"]'


def locate(text: str, offset: int) -> list[str | int]:
    """The keys/indexes leading to the value being read at ``offset`` of ``text``."""
    stack: list[list] = []  # [kind, key_or_index, expecting_key]
    i = 0
    end = min(offset, len(text))
    while i < end:
        c = text[i]
        if c == '"':
            j = i + 1
            chars = []
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and j + 1 < len(text):
                    chars.append(text[j : j + 2])
                    j += 2
                else:
                    chars.append(text[j])
                    j += 1
            if stack and stack[-1][0] == "obj" and stack[-1][2]:
                raw = "".join(chars)
                try:
                    key = json.loads('"' + raw + '"')
                except ValueError:
                    key = raw
                stack[-1][1] = key
            i = j + 1
            continue
        if c == "{":
            stack.append(["obj", None, True])
        elif c == "[":
            stack.append(["arr", 0, False])
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == ":":
            if stack and stack[-1][0] == "obj":
                stack[-1][2] = False
        elif c == ",":
            if stack:
                if stack[-1][0] == "arr":
                    stack[-1][1] += 1
                else:
                    stack[-1][2] = True
                    stack[-1][1] = None
        i += 1
    return [frame[1] for frame in stack if frame[1] is not None]


def path_of(keys: list[str | int]) -> str:
    path = "$"
    for key in keys:
        path = join(path, key)
    return path
