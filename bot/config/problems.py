"""Problems found in the policy file, and how their key paths are written."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

KeyPath = tuple[str | int, ...]
"""A key's position in the document: table keys and array indices, e.g. ``("policies", 0, "name")``."""
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in the policy file.

    Attributes:
        file: the file as it was named to `load_policy` (or the ``source`` of `parse_policy`).
        line: 1-based line of the offending key, or None when it cannot be located.
        key: dotted key path such as ``teams.billing.calendar`` or ``policies[0].warn_at[1]``;
            empty for problems with the file as a whole (syntax errors).
        message: what was wrong and what was expected.
    """

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The policy file is invalid; `problems` lists every mistake found, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the policy file:"
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])

    def __str__(self) -> str:
        return self._text()


_KEY_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def render_key(path: Sequence[str | int]) -> str:
    """Render a key path as TOML-ish dotted text: ``("policies", 0, "match")`` -> ``policies[0].match``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if isinstance(part, str) else str(part)
        if not _BARE_KEY_RE.match(text):
            escaped = text.replace("\\", "\\\\").replace('"', '\\"')
            # As a TOML basic string writes them: an ESC or NUL in a key never reaches a terminal raw.
            text = '"' + _KEY_CONTROL_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'
        out += f".{text}" if out else text
    return out
