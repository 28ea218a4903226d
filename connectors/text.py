"""HTML to plain text for connectors: what a Mastodon status or a blog comment says, without markup.

One shared helper so every channel stores the same kind of text: paragraphs become blank-line
separated blocks, ``<br>`` a line break, links their visible text (a Mastodon mention link stays
``@user``, a shortened link shows its full address), entities are unescaped, and scripts, styles
and other invisible elements are dropped. Built on the standard library's ``html.parser``, which
never raises on broken markup.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]

# Elements that end a block of text (a blank line between paragraphs, a line break for the rest).
_PARAGRAPHS = frozenset({"p", "blockquote", "pre", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6"})
_LINES = frozenset(
    {"div", "li", "tr", "dt", "dd", "figure", "figcaption", "section", "article", "header", "footer"}
)
# Elements whose content is never shown.
_HIDDEN = frozenset({"script", "style", "template", "head", "title", "noscript", "iframe", "object"})
_VOID = frozenset(
    {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}
)

_PARAGRAPH = "\x00P"  # markers, resolved in `_finish`
_LINE = "\x00L"
_SPACES = re.compile(r"[ \t\r\n\f\v]+")


class _TextCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self.hidden += 1
            return
        if self.hidden:
            return
        if tag == "br":
            self.parts.append("\n")
        elif tag == "hr":
            self.parts.append(_PARAGRAPH)
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(_SPACES.sub(" ", alt))
        elif tag in _PARAGRAPHS:
            self.parts.append(_PARAGRAPH)
            if tag == "pre":
                self.pre += 1
        elif tag in _LINES:
            self.parts.append(_LINE)
            if tag == "li":
                self.parts.append("- ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self.hidden = max(self.hidden - 1, 0)
            return
        if self.hidden:
            return
        if tag in _PARAGRAPHS:
            self.parts.append(_PARAGRAPH)
            if tag == "pre":
                self.pre = max(self.pre - 1, 0)
        elif tag in _LINES:
            self.parts.append(_LINE)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        data = data.replace("\x00", "")
        if self.pre:
            self.parts.append(data.replace("\r\n", "\n"))
        else:
            self.parts.append(_SPACES.sub(" ", data))


def _finish(parts: list[str]) -> str:
    text = "".join(parts)

    # Resolve block markers: any run of markers and whitespace becomes one break,
    # a blank line if a paragraph marker is in it, else a line break.
    def block_break(match: re.Match[str]) -> str:
        return "\n\n" if _PARAGRAPH in match.group(0) else "\n"

    text = re.sub(r"[ \t]*(?:\x00[PL][ \t\n]*)+", block_break, text)
    lines = [line.strip(" \t") for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def html_to_text(html: str | None) -> str:
    """Plain text of an HTML fragment (a Mastodon status, a blog comment, a feed summary).

    Args:
        html: the markup; plain text without tags passes through with entities unescaped
            and runs of whitespace collapsed.

    Returns:
        The visible text: paragraphs separated by a blank line, ``<br>`` as a line break,
        list items as ``- item`` lines, links as their text, images as their alt text.
    """
    if not html:
        return ""
    collector = _TextCollector()
    collector.feed(html)
    collector.close()
    return _finish(collector.parts)
