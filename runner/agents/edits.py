"""Turn an agent's reply into a new `train.py`, and check it before anything is committed.

The reply format is fixed by `program.md`:

- the whole new file in one fenced block (```python ... ```), or
- one or more search/replace blocks::

      <<<<<<< SEARCH
      lines copied exactly from the current train.py
      =======
      lines to put instead
      >>>>>>> REPLACE

- then a line ``DESCRIPTION: one line``.

`apply_reply(reply, current)` returns ``(new_text, description)`` and raises `EditError` with a
reason a person (or the agent, in a "fix it" round) can act on. It validates the result with
`validate(new_text, current)`: parses as Python, at most 64 KB and 2000 lines, not empty, and
changes some code. A reply that names a file other than `train.py` (a `diff --git` or `---`/`+++`
header, a ``*** Update File:`` line, a fenced block labelled with another file name, a
``# file: prepare.py`` first line) is rejected: only `train.py` may change.

Everything here treats the reply as untrusted text: nothing is executed, only parsed.
"""

from __future__ import annotations

import ast
import re

MAX_BYTES = 64 * 1024
MAX_LINES = 2000
MAX_DESCRIPTION = 120
MAX_REPLY = 256 * 1024       # characters of a reply that are parsed at all
MAX_BLOCKS = 64              # SEARCH/REPLACE blocks, and fenced blocks, in one reply
TARGET_NAME = "train.py"
OTHER_FILE = "touches a file other than train.py"


class EditError(ValueError):
    """The reply cannot be turned into a valid train.py; str(e) says why."""


# ---- descriptions ----


def clean_line(text: str, limit: int = MAX_DESCRIPTION) -> str:
    """One printable line of at most `limit` characters: control characters dropped, runs of
    whitespace collapsed, markdown emphasis and surrounding quotes stripped."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    text = " ".join(text.split())
    text = text.strip("*_` ")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


_DESCRIPTION = re.compile(r"^[ \t>*_#-]*DESCRIPTION\**[ \t]*[:：]\**[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)


def extract_description(reply: str) -> str:
    """The last `DESCRIPTION:` line outside code (the last anywhere if none is outside); else the
    first non-empty line of the reply outside code blocks; else "(no description)"."""
    outside = _strip_code(reply)
    for text in (outside, reply):
        found = [m.group(1) for m in _DESCRIPTION.finditer(text) if clean_line(m.group(1))]
        if found:
            return clean_line(found[-1])
    for line in outside.splitlines():
        line = clean_line(line)
        if line and not line.startswith(("```", "~~~")):
            return line
    return "(no description)"


# ---- locating edits in the reply ----

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)(?:\n|^)(?P=fence)[ \t]*$",
                    re.MULTILINE | re.DOTALL)
_SR_BLOCK = re.compile(
    r"^[ \t]*<{5,9}[ \t]*SEARCH[^\n]*\n(?P<search>.*?)^[ \t]*={5,9}[ \t]*\n(?P<replace>.*?)"
    r"^[ \t]*>{5,9}[ \t]*REPLACE[^\n]*(?:\n|\Z)",
    re.MULTILINE | re.DOTALL)
_SR_START = re.compile(r"^[ \t]*<{5,9}[ \t]*SEARCH", re.MULTILINE)
_SR_END = re.compile(r"^[ \t]*>{5,9}[ \t]*REPLACE", re.MULTILINE)

_PY_LANGS = {"", "python", "python3", "py", "py3"}
_OTHER_LANGS = {"text", "txt", "bash", "sh", "shell", "console", "diff", "patch", "json", "yaml",
                "yml", "toml", "ini", "markdown", "md", "log", "output", "plaintext", "csv"}

# Lines in the reply that name a file: unified-diff and apply_patch headers.
_FILE_HEADERS = [
    re.compile(r"^diff --git\s+(?:a/)?(?P<path>\S+)", re.MULTILINE),
    re.compile(r"^(?:---|\+\+\+)[ \t]+(?:[ab]/)?(?P<path>[^\s]+)", re.MULTILINE),
    re.compile(r"^\*\*\*[ \t]*(?:Update|Add|Delete|Move)[ \t]+File:[ \t]*(?P<path>\S+)",
               re.MULTILINE | re.IGNORECASE),
    re.compile(r"^\*\*\*[ \t]*Move to:[ \t]*(?P<path>\S+)", re.MULTILINE | re.IGNORECASE),
]
# A first line of a block (or the line just before a SEARCH block) that names a file.
_FILE_COMMENT = re.compile(r"^[ \t]*(?:#|//)[ \t]*(?:file(?:name)?|path)[ \t]*[:=][ \t]*(?P<path>\S+)",
                           re.IGNORECASE)
_FILENAME = re.compile(r"[\w./\\-]*[\w-]\.[A-Za-z][\w]{0,5}$")


def _strip_code(reply: str) -> str:
    text = _SR_BLOCK.sub("\n", reply)
    return _FENCE.sub("\n", text)


def _is_target(path: str) -> bool:
    path = path.strip().strip("`'\"").replace("\\", "/").rstrip(":,;")
    return path.rsplit("/", 1)[-1] == TARGET_NAME


def _looks_like_path(token: str) -> bool:
    token = token.strip().strip("`'\"").rstrip(":,;")
    return token != "/dev/null" and bool(_FILENAME.search(token) or "/" in token)


def check_single_file(reply: str) -> None:
    """Raise EditError if the reply names a file other than train.py."""
    for pattern in _FILE_HEADERS:
        for m in pattern.finditer(reply):
            path = m.group("path")
            if _looks_like_path(path) and not _is_target(path):
                raise EditError(f"{OTHER_FILE} ({path.strip()!r} in {m.group(0).strip()[:60]!r})")
    for m in _FENCE.finditer(reply):
        info = m.group("info").strip()
        _check_fence_info(info)
        first = m.group("body").split("\n", 1)[0]
        _check_file_comment(first)
    for m in _SR_START.finditer(reply):            # a "# file: x" line just before a SEARCH
        before = reply[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        _check_file_comment(before)
    for m in _SR_BLOCK.finditer(reply):             # or the first line inside it
        _check_file_comment(m.group("search").split("\n", 1)[0])


def _check_fence_info(info: str) -> None:
    # ```python prepare.py  /  ```prepare.py  /  ```python:prepare/prepare.py  /  ```py title="x.py"
    for token in re.split(r"[\s:=\"']+", info):
        if token and token.lower() not in _PY_LANGS | _OTHER_LANGS and _looks_like_path(token):
            if not _is_target(token):
                raise EditError(f"{OTHER_FILE} (a code block labelled {info[:60]!r})")


def _check_file_comment(line: str) -> None:
    m = _FILE_COMMENT.match(line)
    if m and _looks_like_path(m.group("path")) and not _is_target(m.group("path")):
        raise EditError(f"{OTHER_FILE} ({line.strip()[:60]!r})")


def _apply_search_replace(reply: str, current: str) -> str:
    blocks = list(_SR_BLOCK.finditer(reply))
    starts, ends = len(_SR_START.findall(reply)), len(_SR_END.findall(reply))
    if not blocks or len(blocks) != starts or len(blocks) != ends:
        raise EditError(f"malformed SEARCH/REPLACE block: {starts} SEARCH marker(s), {ends} REPLACE "
                        f"marker(s), {len(blocks)} complete block(s); each block needs "
                        "'<<<<<<< SEARCH', '=======', '>>>>>>> REPLACE' on their own lines")
    text = current if current.endswith("\n") else current + "\n"
    n = len(blocks)
    for i, m in enumerate(blocks, 1):
        search, replace = m.group("search"), m.group("replace")
        label = f"SEARCH/REPLACE block {i} of {n}"
        if not search.strip():
            raise EditError(f"{label}: the SEARCH part is empty")
        hits = _line_matches(text, search)
        count = len(hits)
        if count == 1:
            text = text[:hits[0]] + replace + text[hits[0] + len(search):]
            continue
        if count > 1:
            raise EditError(f"{label}: the SEARCH part matches {count} times; include more "
                            "surrounding lines so it matches exactly once")
        # No exact match: allow only differences in trailing whitespace, and only if unique.
        new = _replace_loose(text, search, replace)
        if new is None:
            first = next((ln.strip() for ln in search.splitlines() if ln.strip()), "")
            raise EditError(f"{label}: the SEARCH part does not match the current train.py "
                            f"exactly (it starts {first[:60]!r}); copy the lines exactly")
        text = new
    return text


def _line_matches(text: str, search: str) -> list[int]:
    """Where `search` occurs starting at the beginning of a line."""
    hits, i = [], text.find(search)
    while i >= 0:
        if i == 0 or text[i - 1] == "\n":
            hits.append(i)
        i = text.find(search, i + 1)
    return hits


def _replace_loose(text: str, search: str, replace: str) -> str | None:
    """Match `search` line by line ignoring trailing whitespace; None unless exactly once."""
    lines = text.split("\n")
    want = [ln.rstrip() for ln in search.rstrip("\n").split("\n")]
    stripped = [ln.rstrip() for ln in lines]
    hits = [i for i in range(len(lines) - len(want) + 1) if stripped[i:i + len(want)] == want]
    if len(hits) != 1:
        return None
    i = hits[0]
    rep = replace[:-1] if replace.endswith("\n") else replace
    new_lines = lines[:i] + (rep.split("\n") if rep or replace else []) + lines[i + len(want):]
    return "\n".join(new_lines)


def _whole_file(reply: str) -> str:
    blocks = []
    for m in _FENCE.finditer(reply):
        lang = m.group("info").strip().split()[0].lower() if m.group("info").strip() else ""
        lang = lang.split(":", 1)[0]
        if lang in _PY_LANGS or _is_target(lang):
            blocks.append(m.group("body"))
    if not blocks:
        if re.search(r"^(`{3,}|~{3,})", reply, re.MULTILINE):
            raise EditError("a fenced code block is not closed (or is not a python block); the reply "
                            "may have been cut off")
        raise EditError("no edit found: expected the whole train.py in one ```python block, or "
                        "SEARCH/REPLACE blocks")
    if len(blocks) > 1:
        raise EditError(f"{len(blocks)} python code blocks; expected exactly one holding the whole "
                        "train.py (or use SEARCH/REPLACE blocks)")
    return blocks[0]


def apply_reply(reply: str, current: str) -> tuple[str, str]:
    """The new train.py and a one-line description from an agent's reply; raises EditError."""
    if not isinstance(reply, str) or not reply.strip():
        raise EditError("empty reply")
    reply = reply.replace("\r\n", "\n").replace("\r", "\n")
    current_n = current.replace("\r\n", "\n")
    if len(reply) > MAX_REPLY:
        raise EditError(f"the reply is too long: {len(reply)} characters (limit {MAX_REPLY})")
    if (len(_SR_START.findall(reply)) > MAX_BLOCKS
            or len(re.findall(r"^(?:`{3,}|~{3,})", reply, re.MULTILINE)) > 2 * MAX_BLOCKS):
        raise EditError(f"too many blocks in the reply (limit {MAX_BLOCKS})")
    check_single_file(reply)
    if _SR_START.search(reply) or _SR_END.search(reply):
        new_text = _apply_search_replace(reply, current_n)
    else:
        new_text = _whole_file(reply)
    if new_text and not new_text.endswith("\n"):
        new_text += "\n"
    validate(new_text, current_n)
    return new_text, extract_description(reply)


def validate(new_text: str, current: str) -> None:
    """Raise EditError unless `new_text` is an acceptable replacement for `current`."""
    if not isinstance(new_text, str) or not new_text.strip():
        raise EditError("the new train.py is empty")
    size = len(new_text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise EditError(f"the new train.py is too large: {size} bytes (limit {MAX_BYTES})")
    lines = new_text.count("\n") + (0 if new_text.endswith("\n") else 1)
    if lines > MAX_LINES:
        raise EditError(f"the new train.py is too long: {lines} lines (limit {MAX_LINES})")
    first = next((ln for ln in new_text.splitlines() if ln.strip()), "")
    _check_file_comment(first)
    try:
        tree = ast.parse(new_text, filename="train.py")
    except SyntaxError as exc:
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        raise EditError(f"the new train.py does not parse as Python: {where}: {exc.msg}") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise EditError(f"the new train.py does not parse as Python: {exc}") from None
    if new_text == current:
        raise EditError("the new train.py is identical to the current one: it changes nothing")
    try:
        same = ast.dump(tree) == ast.dump(ast.parse(current))
    except (SyntaxError, ValueError, RecursionError):
        same = False
    if same:
        raise EditError("the new train.py changes no code, only comments or formatting")
