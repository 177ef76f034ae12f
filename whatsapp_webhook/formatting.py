"""Reply formatting: WhatsApp marks instead of Markdown, and long replies split at natural boundaries."""

from __future__ import annotations

import re


def markdown_to_whatsapp(text: str) -> str:
    """Convert LLM-style Markdown to WhatsApp formatting; code is never modified."""
    stash: list[str] = []

    def keep(s: str) -> str:
        # Opaque tokens shield code and URLs from every regex that runs afterwards.
        stash.append(s)
        return f"\ue000{len(stash) - 1}\ue001"

    # Marks we emit are placeholders so later passes (e.g. italic) cannot re-read them.
    bold, ital, strike = "\ue002", "\ue003", "\ue004"
    fence = r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)"  # unclosed: to the end
    text = re.sub(fence, lambda m: keep(m[0]), text)
    text = re.sub(r"(`+)[^`\n]+\1", lambda m: keep(m[0]), text)
    url = r"((?:[^()\s]|\([^()\s]*\))+)"  # one level of parens, e.g. Wikipedia links
    text = re.sub(rf"!\[([^\]\n]*)\]\({url}\)", lambda m: f"{m[1]}: {keep(m[2])}" if m[1] else keep(m[2]), text)
    text = re.sub(rf"\[([^\]\n]+)\]\({url}\)", lambda m: keep(m[2]) if m[1] == m[2] else f"{m[1]} ({keep(m[2])})", text)
    # Trailing punctuation/marks usually belong to the sentence, not to the URL.
    text = re.sub(r"(?:https?://|www\.)[^\s<>]*[^\s<>.,;:!?'\")\]*_~]", lambda m: keep(m[0]), text)

    lines = []
    for line in text.split("\n"):
        if "|" in line and "-" in line and re.fullmatch(r"[\s|:-]+", line):
            continue  # table separator row carries no content
        if re.fullmatch(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*", line):
            line = ""  # horizontal rule
        elif m := re.fullmatch(r"[ \t]{0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*", line):
            line = bold + m[1].replace("**", "") + bold  # inner ** would close the bold early
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
        c, escaped = re.escape(marks[0]), re.escape(marks)

        def close(g: re.Match[str], out: str = out) -> str:
            return out + g[1] + out[::-1]

        text = re.sub(rf"(?<![\w{c}]){escaped}(?![\s{c}])([^\n]+?)(?<![\s{c}]){escaped}(?![\w{c}])", close, text)
    for mark, char in ((bold, "*"), (ital, "_"), (strike, "~")):
        text = text.replace(mark, char)
    text = re.sub(r"\n(?:[ \t]*\n){3,}", "\n\n\n", text)  # 3+ blank lines -> 2
    token = re.compile("\ue000(\\d+)\ue001")

    def restore(m: re.Match[str]) -> str:
        return token.sub(restore, stash[int(m[1])])  # link URLs may hold inline-code tokens

    return token.sub(restore, text).strip()


def split_message(text: str, max_chars: int = 1500) -> list[str]:
    """Split text into stripped, non-empty parts of <= max_chars at the most natural boundary."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    text = text.strip()
    # Best boundary first; each match ends where the current part may end.
    breaks = [re.compile(p) for p in (r"(?=\n[ \t]*\n)", r"(?=\n)", r"[.!?…]+[\"'”’»)\]]*(?=\s)", r"(?=\s)")]
    fence = r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)"
    ws = re.compile(r"\s*")

    def after_space(pos: int) -> int:
        """Where the run of whitespace starting at pos ends."""
        space = ws.match(text, pos)
        assert space is not None  # r"\s*" matches (possibly empty) at every position
        return space.end()

    # Blocks that fit in one part must never be cut; oversized ones have to be.
    blocked = [m.span() for m in re.finditer(fence, text) if len(m[0]) <= max_chars]

    def best_cut(start: int) -> int:
        limit = start + max_chars
        # Lookaheads only inspect whitespace, so the scan can stop after the run at limit.
        end = after_space(limit)
        for pattern in breaks:
            cuts = [
                c
                for m in pattern.finditer(text, start + 1, end)
                if (c := m.end()) <= limit and not any(a < c < b for a, b in blocked)
            ]
            if cuts:
                return cuts[-1]  # greedy: the latest boundary of the best kind
        return limit  # only a single word longer than max_chars gets here

    parts: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = best_cut(start)
        parts.append(text[start:cut].rstrip())
        start = after_space(cut)
    return [*parts, text[start:]] if text else []
