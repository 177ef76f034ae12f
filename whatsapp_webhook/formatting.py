"""Reply formatting: WhatsApp marks instead of Markdown, and long replies split at natural boundaries.

Both functions are linear (split_message n log n) in the length of the text: an LLM reply is untrusted
input, and a regex that rescans the rest of a line from every candidate position (an unclosed "*", a
run of "[" or backticks) would freeze the worker for minutes on a long hostile reply.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable

_FENCE = re.compile(r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)")  # unclosed: to the end
_SENTINELS = re.compile("[\ue000-\ue004]")  # the private-use characters used below as tokens and marks
_TOKEN = re.compile("\ue000(\\d+)\ue001")
_BACKTICKS = re.compile(r"`+")
_CODE_TEXT = re.compile(r"[^`\n]+")
_LINK_TEXT_END = re.compile(r"[\]\n]")
_LINK_URL = re.compile(r"((?:[^()\s]|\([^()\s]*\))+)\)")  # after "](": one level of parens, e.g. Wikipedia
# Trailing punctuation/marks usually belong to the sentence, not to the URL.
_BARE_URL = re.compile(r"(?:https?://|www\.)[^\s<>]*[^\s<>.,;:!?'\")\]*_~]")
_HEADING_START = re.compile(r"[ \t]{0,3}#{1,6}([ \t]+)")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){3,}")


def _sub_inline_code(text: str, keep: Callable[[str], str]) -> str:
    """Stash inline code: what re.sub(r"(`+)[^`\\n]+\\1", ...) does, without retrying inside backtick runs."""
    out: list[str] = []
    done, pos = 0, text.find("`")
    while pos != -1:
        run = _BACKTICKS.match(text, pos)
        assert run is not None
        code = _CODE_TEXT.match(text, run.end())
        close = _BACKTICKS.match(text, code.end()) if code else None
        if code is None or close is None:  # no code, or a line end before any closing run
            pos = text.find("`", run.end())
            continue
        # A run of n opens a span closed by n backticks; a shorter closing run pairs with the run's tail.
        start = max(pos, run.end() - len(close[0]))
        end = code.end() + run.end() - start
        out += [text[done:start], keep(text[start:end])]
        done, pos = end, text.find("`", end)
    return "".join([*out, text[done:]])


def _sub_links(text: str, opener: str, replace: Callable[[str, str], str], *, empty_text: bool) -> str:
    """What re.sub(r"<opener>([^\\]\\n]*)\\]\\(<url>\\)", ...) does, but each text is scanned once: when one
    opener fails, every later opener before the same "]" (or line end) fails the same way."""
    out: list[str] = []
    done, pos = 0, text.find(opener)
    while pos != -1:
        first = pos + len(opener)
        stop = _LINK_TEXT_END.search(text, first)
        last = stop.start() if stop else len(text)
        url = _LINK_URL.match(text, last + 2) if text.startswith("](", last) else None
        if url is None or (last == first and not empty_text):
            pos = text.find(opener, last)
            continue
        out += [text[done:pos], replace(text[first:last], url[1])]
        done = url.end()
        pos = text.find(opener, done)
    return "".join([*out, text[done:]])


def _sub_emphasis(text: str, marks: str, out: str) -> str:
    """What re.sub(r"(?<![\\w c])MARKS(?![\\s c])([^\\n]+?)(?<![\\s c])MARKS(?![\\w c])", ...) does (c is the
    mark's character), pairing each opening mark with the first closing one on its line in one pass:
    the regex rescanned the rest of the line from every unclosed mark."""
    c, escaped, width = re.escape(marks[0]), re.escape(marks), len(marks)
    openers = [m.start() for m in re.finditer(rf"(?<![\w{c}])(?={escaped}(?![\s{c}]))", text)]
    closers = [m.start() for m in re.finditer(rf"(?<![\s{c}])(?={escaped}(?![\w{c}]))", text)]
    pieces: list[str] = []
    done = closer = 0
    line_end = -1  # the first "\n" at or after the current opener's text (or the end)
    for start in openers:
        if start < done:
            continue
        inner = start + width
        if inner > line_end:
            line_end = text.find("\n", inner)
            line_end = len(text) if line_end == -1 else line_end
        while closer < len(closers) and closers[closer] <= inner:  # at least one character inside
            closer += 1
        if closer < len(closers) and (end := closers[closer]) < line_end:
            pieces += [text[done:start], out, text[inner:end], out[::-1]]
            done = end + width
    return "".join([*pieces, text[done:]])


def _heading_text(line: str) -> str | None:
    """m[1] of re.fullmatch(r"[ \\t]{0,3}#{1,6}[ \\t]+(.+?)(?:[ \\t]+#+)?[ \\t]*", line), computed directly:
    the lazy group retried the closing pattern across every long run of blanks."""
    m = _HEADING_START.match(line)
    if m is None:
        return None
    first = m.end()
    if first == len(line):  # only blanks after the hashes: the text is the last blank, if one is spare
        return line[-1] if len(m[1]) > 1 else None
    trailing = len(line.rstrip(" \t"))  # where the trailing blanks begin
    end = max(first + 1, trailing)
    hashes = len(line[:trailing].rstrip("#"))  # a closing "###" run, preceded by blanks
    blanks = len(line[:hashes].rstrip(" \t"))
    if hashes < trailing and blanks < hashes and max(first + 1, blanks) < hashes:
        end = max(first + 1, blanks)
    return line[first:end]


def markdown_to_whatsapp(text: str) -> str:
    """Convert LLM-style Markdown to WhatsApp formatting; code is never modified."""
    stash: list[str] = []

    def keep(s: str) -> str:
        # Opaque tokens shield code and URLs from every regex that runs afterwards.
        stash.append(s)
        return f"\ue000{len(stash) - 1}\ue001"

    # The reply's own private-use characters are stashed first, so they can never pose as our tokens.
    text = _SENTINELS.sub(lambda m: keep(m[0]), text)
    # Marks we emit are placeholders so later passes (e.g. italic) cannot re-read them.
    bold, ital, strike = "\ue002", "\ue003", "\ue004"
    text = _FENCE.sub(lambda m: keep(m[0]), text)
    text = _sub_inline_code(text, keep)
    text = _sub_links(text, "![", lambda alt, url: f"{alt}: {keep(url)}" if alt else keep(url), empty_text=True)
    text = _sub_links(text, "[", lambda s, url: keep(url) if s == url else f"{s} ({keep(url)})", empty_text=False)
    text = _BARE_URL.sub(lambda m: keep(m[0]), text)

    lines = []
    for line in text.split("\n"):
        if "|" in line and "-" in line and re.fullmatch(r"[\s|:-]+", line):
            continue  # table separator row carries no content
        if re.fullmatch(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*", line):
            line = ""  # horizontal rule
        elif (heading := _heading_text(line)) is not None:
            line = bold + heading.replace("**", "") + bold  # inner ** would close the bold early
        elif line.lstrip().startswith("|"):
            line = " | ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
        else:
            # "* item" would otherwise read as an unclosed WhatsApp bold mark.
            line = re.sub(r"^([ \t]*)[*+-][ \t]+", r"\1• ", line)
        lines.append(line)
    text = "\n".join(lines)

    # Longest marks first so "**" is never taken as two italics. Simplified flanking rule:
    # no space just inside the marks and no word char just outside (WhatsApp ignores
    # intra-word marks anyway, and it keeps 2*3*4 and snake_case intact).
    for marks, out in (("***", bold + ital), ("**", bold), ("__", bold), ("~~", strike), ("*", ital), ("_", ital)):
        text = _sub_emphasis(text, marks, out)
    for mark, char in ((bold, "*"), (ital, "_"), (strike, "~")):
        text = text.replace(mark, char)
    text = _BLANK_LINES.sub("\n\n\n", text)  # 3+ blank lines -> 2

    def restore(m: re.Match[str]) -> str:
        return _TOKEN.sub(restore, stash[int(m[1])])  # link URLs may hold inline-code tokens

    return _TOKEN.sub(restore, text).strip()


_PARAGRAPH_BREAK = re.compile(r"(?=\n[ \t]*\n)")
_LINE_BREAK = re.compile(r"(?=\n)")
_SENTENCE_END = re.compile(r"[.!?…]+")
_AFTER_SENTENCE = re.compile(r"[\"'”’»)\]]*(?=\s)")
_SPACE = re.compile(r"(?=\s)")
_WHITESPACE = re.compile(r"\s*")


def split_message(text: str, max_chars: int = 1500) -> list[str]:
    """Split text into stripped, non-empty parts of <= max_chars at the most natural boundary."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    text = text.strip()

    def after_space(pos: int) -> int:
        """Where the run of whitespace starting at pos ends."""
        space = _WHITESPACE.match(text, pos)
        assert space is not None  # r"\s*" matches (possibly empty) at every position
        return space.end()

    # Blocks that fit in one part must never be cut; oversized ones have to be.
    blocked = [m.span() for m in _FENCE.finditer(text) if len(m[0]) <= max_chars]

    def allowed(cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The cuts (position, reach) outside every fitting block: blocks and cuts are both in order."""
        kept, block = [], 0
        for cut in cuts:
            while block < len(blocked) and blocked[block][1] <= cut[0]:
                block += 1
            if block == len(blocked) or not blocked[block][0] < cut[0]:
                kept.append(cut)
        return kept

    # Every boundary of each kind (best kind first) is found once, not again for each part (which made a
    # text of many code blocks quadratic). Each is (position, reach): it may end a part starting at s if
    # reach > s + 1, as when each part's text was searched from its second character: a sentence end
    # only if its punctuation reaches past the part's first character.
    sentences = []
    for m in _SENTENCE_END.finditer(text):
        if after := _AFTER_SENTENCE.match(text, m.end()):
            sentences.append((after.end(), m.end()))
    kinds = [
        allowed([(c, c + 1) for c in (m.start() for m in pattern.finditer(text))])
        for pattern in (_PARAGRAPH_BREAK, _LINE_BREAK)
    ]
    kinds += [allowed(sentences), allowed([(m.start(), m.start() + 1) for m in _SPACE.finditer(text)])]
    positions = [[cut for cut, _ in kind] for kind in kinds]

    def best_cut(start: int) -> int:
        limit = start + max_chars
        for kind, at in zip(kinds, positions, strict=True):
            latest = bisect_right(at, limit) - 1  # greedy: the latest boundary of the best kind
            if latest >= 0 and kind[latest][1] > start + 1:  # reach is at most position + 1
                return at[latest]
        return limit  # only a single word longer than max_chars gets here

    parts: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = best_cut(start)
        parts.append(text[start:cut].rstrip())
        start = after_space(cut)
    return [*parts, text[start:]] if text else []
