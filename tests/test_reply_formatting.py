"""Reply formatting: Markdown to WhatsApp marks, and splitting long replies into parts (pure functions)."""

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whatsapp_webhook.formatting import markdown_to_whatsapp as md
from whatsapp_webhook.formatting import split_message

FENCE = re.compile(r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)")


# --------------------------------------------------------------------------- markdown_to_whatsapp


@pytest.mark.parametrize("src, want", [
    ("**bold**", "*bold*"),
    ("__bold__", "*bold*"),
    ("a **b c** d", "a *b c* d"),
    ("**a** and **b**", "*a* and *b*"),
    ("*italic*", "_italic_"),
    ("_italic_", "_italic_"),
    ("~~strike~~", "~strike~"),
    ("***both***", "*_both_*"),
    ("**bold** then *it*", "*bold* then _it_"),
    ("**bold with *it* inside**", "*bold with _it_ inside*"),
    ("*it with **bold** inside*", "_it with *bold* inside_"),
    ("**negrito _itálico_**", "*negrito _itálico_*"),
    ("~~**both**~~", "~*both*~"),
])
def test_inline_emphasis(src, want):
    assert md(src) == want


def test_converted_bold_never_becomes_italic():
    out = md("**one** **two** *three*")
    assert out == "*one* *two* _three_"
    assert "_one_" not in out


@pytest.mark.parametrize("src, want", [
    ("(*nota*),", "(_nota_),"),
    ("*sim*!", "_sim_!"),
    ("\"**aspas**\"", "\"*aspas*\""),
    ("**Atenção:** leia", "*Atenção:* leia"),
    ("fim *aqui*.", "fim _aqui_."),
    ("¿*qué*?", "¿_qué_?"),
])
def test_emphasis_next_to_punctuation(src, want):
    assert md(src) == want


@pytest.mark.parametrize("src", [
    "2 * 3 * 4",
    "2*3*4",
    "a * b",
    "x**2 + y**2",
    "2 ** 10",
    "my_var_name and other_var",
    "snake__case__name",
    "~~ not strike ~~",
    "**",
    "a **** b",
    "foo*bar* baz",
    "pre**fix** word",
    "a~~b~~ c",
    "_ spaced _",
    "file_name_v2.txt",
    "R$ 10 * 2",
])
def test_no_false_emphasis(src):
    assert md(src) == src


@pytest.mark.parametrize("level", range(1, 7))
def test_headings_all_levels(level):
    assert md("#" * level + " Heading text") == "*Heading text*"


@pytest.mark.parametrize("src, want", [
    ("# Título com acentuação 🎉", "*Título com acentuação 🎉*"),
    ("## **Already bold**", "*Already bold*"),
    ("### Closed heading ###", "*Closed heading*"),
    ("## Use *this*", "*Use _this_*"),
    ("#hashtag", "#hashtag"),
    ("####### seven", "####### seven"),
    ("text # not heading", "text # not heading"),
    ("intro\n## Sub\nbody", "intro\n*Sub*\nbody"),
])
def test_heading_edge_cases(src, want):
    assert md(src) == want


@pytest.mark.parametrize("src, want", [
    ("[text](https://url.com)", "text (https://url.com)"),
    ("[https://url.com](https://url.com)", "https://url.com"),
    ("Veja [o site](https://ex.com/a_b_c).", "Veja o site (https://ex.com/a_b_c)."),
    ("[**bold** link](https://x.io)", "*bold* link (https://x.io)"),
    ("[wiki](https://en.wikipedia.org/wiki/Foo_(bar))", "wiki (https://en.wikipedia.org/wiki/Foo_(bar))"),
    ("![alt text](https://img.com/a_b.png)", "alt text: https://img.com/a_b.png"),
    ("![](https://img.com/a.png)", "https://img.com/a.png"),
    ("[a](https://a.com) e [b](https://b.com)", "a (https://a.com) e b (https://b.com)"),
])
def test_links_and_images(src, want):
    assert md(src) == want


@pytest.mark.parametrize("src", [
    "https://example.com/a_b_c",
    "see https://example.com/a_b_c and https://x.com/*star*",
    "www.site.com/x_y_z",
    "https://example.com/path__with__double?q=a_b&r=~~x~~",
])
def test_urls_left_intact(src):
    assert md(src) == src


def test_url_inside_emphasis():
    assert md("_see https://example.com/a_b_c_") == "_see https://example.com/a_b_c_"
    assert md("**https://x.com/a_b**") == "*https://x.com/a_b*"
    assert md("(https://x.com/a_b)") == "(https://x.com/a_b)"


@pytest.mark.parametrize("rule", ["****", "---", "***", "___", "- - -", "* * *", "_____", "  ---  "])
def test_horizontal_rules_removed(rule):
    assert md(f"a\n{rule}\nb") == "a\n\nb"


def test_table():
    src = "| Nome | Idade |\n|------|:-----:|\n| **Ana** | 30 |\n| João | 25 |"
    assert md(src) == "Nome | Idade\n*Ana* | 30\nJoão | 25"


def test_table_without_outer_pipes_and_code_cell():
    assert md("a | b\n---|---\n1 | 2") == "a | b\n1 | 2"
    assert md("| cmd | note |\n|---|---|\n| `a|b` | x |") == "cmd | note\n`a|b` | x"


@pytest.mark.parametrize("src, want", [
    ("* item", "• item"),
    ("- item", "• item"),
    ("+ item", "• item"),
    ("* **bold** item", "• *bold* item"),
    ("- **Passo 1:** instale", "• *Passo 1:* instale"),
    ("* item with *italic*", "• item with _italic_"),
    ("- a\n  - b\n    * c", "• a\n  • b\n    • c"),
    ("1. **um**\n2. dois", "1. *um*\n2. dois"),
    ("-5 graus", "-5 graus"),
    ("*not a bullet*", "_not a bullet_"),
    ("> citação **forte**", "> citação *forte*"),
])
def test_bullets_and_lists(src, want):
    assert md(src) == want


def test_fenced_code_untouched():
    code = "```python\nx = **y** * _z_\n# not heading\n- not bullet\n[a](b)\n---\n\n\n\n\nend\n```"
    src = f"**before**\n{code}\n*after*"
    assert md(src) == f"*before*\n{code}\n_after_"


def test_tilde_fence_and_unclosed_fence_untouched():
    assert md("~~~\n~~x~~ **y**\n~~~") == "~~~\n~~x~~ **y**\n~~~"
    assert md("**a**\n```\n**still code**") == "*a*\n```\n**still code**"


def test_indented_fence_in_list():
    src = "- step\n  ```\n  * x *\n  ```"
    assert md(src) == "• step\n  ```\n  * x *\n  ```"


@pytest.mark.parametrize("src", [
    "`**x**`",
    "use `my_var_name` or `a * b`",
    "`[a](https://b.com)`",
    "```inline **mono**```",
    "`# no heading`",
])
def test_inline_code_untouched(src):
    assert md(src) == src


def test_inline_code_between_emphasis():
    assert md("**run** `rm *_*` *now*") == "*run* `rm *_*` _now_"


def test_blank_lines_collapsed_outside_code():
    assert md("a\n\n\n\n\n\nb") == "a\n\n\nb"
    assert md("a\n\n\nb") == "a\n\n\nb"  # two blank lines are kept
    assert md("a\n \n\t\n  \n\nb") == "a\n\n\nb"
    assert md("```\na\n\n\n\n\nb\n```") == "```\na\n\n\n\n\nb\n```"


def test_portuguese_with_emoji():
    src = "## Olá! 👋\n\nAqui está a **solução** para você 😊:\n\n* Ação _rápida_ ✅\n* Não ~~esqueça~~ 🙏"
    want = "*Olá! 👋*\n\nAqui está a *solução* para você 😊:\n\n• Ação _rápida_ ✅\n• Não ~esqueça~ 🙏"
    assert md(src) == want


def test_plain_text_and_empty():
    assert md("") == ""
    assert md("Just plain text.") == "Just plain text."
    assert md("  \n\n ") == ""


def test_full_llm_answer():
    src = (
        "# Resumo\n\nAqui vai:\n\n1. **Primeiro** passo\n2. Segundo\n\n---\n\n"
        "Mais em [docs](https://docs.x.com/a_b).\n\n```bash\npip install **x**\n```\n"
    )
    want = (
        "*Resumo*\n\nAqui vai:\n\n1. *Primeiro* passo\n2. Segundo\n\n\n"
        "Mais em docs (https://docs.x.com/a_b).\n\n```bash\npip install **x**\n```"
    )
    assert md(src) == want


# --------------------------------------------------------------------------- split_message


def check_invariants(text, parts, max_chars):
    assert all(parts), "no empty parts"
    assert all(len(p) <= max_chars for p in parts)
    assert all(p == p.strip() for p in parts)
    assert "".join("".join(parts).split()) == "".join(text.split()), "all characters, in order"
    pos = 0
    spans = []
    for p in parts:  # locate each part in the original to inspect the cut points
        i = text.index(p, pos)
        spans.append((i, i + len(p)))
        pos = i + len(p)
    for (_, end), (nxt, _) in zip(spans, spans[1:]):
        if end == nxt:  # no whitespace between parts -> hard cut inside a word
            left = re.search(r"\S*$", text[:end]).group()
            right = re.match(r"\S*", text[nxt:]).group()
            assert len(left) + len(right) > max_chars, "only over-long words may be cut"
    for m in FENCE.finditer(text):
        if len(m[0]) <= max_chars:
            assert not any(m.start() < e < m.end() for _, e in spans[:-1]), "fitting code block was cut"


def test_empty_and_whitespace():
    assert split_message("") == []
    assert split_message("   \n\n\t ") == []


def test_fits_returns_stripped_text():
    assert split_message("  hello world \n") == ["hello world"]
    assert split_message("x" * 1500) == ["x" * 1500]
    assert split_message("a" * 20, 20) == ["a" * 20]


def test_invalid_max_chars():
    with pytest.raises(ValueError):
        split_message("abc", 0)


def test_prefers_paragraph_boundary():
    text = "Para one. Still one.\n\nPara two, line one.\nline two. More."
    assert split_message(text, 45) == ["Para one. Still one.", "Para two, line one.\nline two. More."]


def test_greedy_packs_several_paragraphs():
    text = "aaa\n\nbbb\n\nccc\n\nddd"
    assert split_message(text, 10) == ["aaa\n\nbbb", "ccc\n\nddd"]


def test_prefers_line_break_over_sentence():
    text = "First line. Second sentence\nnext line continues here"
    assert split_message(text, 40) == ["First line. Second sentence", "next line continues here"]


def test_prefers_sentence_end_over_space():
    text = "One sentence here. Another one that goes on and on"
    assert split_message(text, 35) == ["One sentence here.", "Another one that goes on and on"]


@pytest.mark.parametrize("end", ["!", "?", "…", "...", ".\"", "!”", ".)", "?»"])
def test_sentence_end_variants(end):
    text = f"Frase um{end} Frase dois continua bem longa"
    assert split_message(text, 30)[0] == f"Frase um{end}"


def test_sentence_end_before_newline_inside_paragraph():
    # the newline is a line boundary and thus preferred anyway
    text = "Alpha beta.\ngamma delta epsilon"
    assert split_message(text, 15) == ["Alpha beta.", "gamma delta", "epsilon"]


def test_no_sentence_ends_breaks_at_whitespace_never_mid_word():
    words = [f"palavra{i}" for i in range(400)]
    text = " ".join(words)
    parts = split_message(text, 100)
    check_invariants(text, parts, 100)
    assert " ".join(parts).split() == words
    for a, b in zip(parts, parts[1:]):  # greedy: the next word would not have fitted
        assert len(a) + 1 + len(b.split()[0]) > 100


def test_long_url_hard_cut_only_when_needed():
    url = "https://example.com/" + "a" * 60
    text = f"Link: {url} fim."
    parts = split_message(text, 30)
    assert parts[0] == "Link:"
    assert "".join(parts[1:-1]) + parts[-1].split()[0] == url
    assert parts[-1].endswith("fim.")
    check_invariants(text, parts, 30)


def test_long_url_fits_not_cut():
    url = "https://example.com/" + "b" * 40
    parts = split_message(f"Olha isso {url} legal", 65)
    assert url in parts[0] or url in parts[1]


def test_single_giant_word():
    assert split_message("x" * 45, 20) == ["x" * 20, "x" * 20, "x" * 5]


def test_portuguese_accents_and_emoji_counted_by_str_len():
    text = "Olá, tudo bem? 😀👍🏽 Ação e emoção! Não há problema… Até já. " * 10
    parts = split_message(text, 50)
    check_invariants(text, parts, 50)
    assert len("👍🏽") == 2  # skin-tone modifier is its own code point
    assert " ".join(parts).split() == text.split()


def test_emoji_exact_boundary():
    text = "😀" * 10 + " " + "😀" * 10
    assert split_message(text, 10) == ["😀" * 10, "😀" * 10]


def test_code_block_moved_whole_to_next_part():
    code = "```python\ndef f():\n    return 1\n```"
    text = "Intro text here.\n" + code + "\nAfter."
    parts = split_message(text, 40)
    assert parts[0] == "Intro text here."
    assert parts[1].startswith(code)
    check_invariants(text, parts, 40)


def test_code_block_with_blank_lines_not_split_at_paragraph():
    code = "```\na = 1\n\nb = 2\n\nc = 3\n```"
    text = "Antes.\n\n" + code + "\n\nDepois."
    parts = split_message(text, len(code) + 2)
    assert code in parts
    check_invariants(text, parts, len(code) + 2)


def test_oversized_code_block_is_split_at_lines():
    code = "```\n" + "\n".join(f"line_{i} = {i}" for i in range(30)) + "\n```"
    parts = split_message(code, 60)
    check_invariants(code, parts, 60)
    assert all(not re.search(r"line_\d+ =$", p) for p in parts)  # whole lines
    assert len(parts) > 1


def test_very_small_max_chars():
    text = "Olá! Este é um teste com palavras curtas. E mais uma frase aqui."
    parts = split_message(text, 20)
    check_invariants(text, parts, 20)
    assert " ".join(parts).split() == text.split()
    assert parts[0] == "Olá!"  # sentence end beats packing "Olá! Este é um"


def test_max_chars_one():
    assert split_message("a bc", 1) == ["a", "b", "c"]


def test_paragraph_longer_than_max_without_sentence_ends():
    para = " ".join(["lorem ipsum dolor sit amet"] * 40)
    text = "Título\n\n" + para
    parts = split_message(text, 200)
    assert parts[0] == "Título"
    check_invariants(text, parts, 200)
    assert " ".join(parts).split() == text.split()


def test_default_max_chars():
    text = ("Uma frase de teste com acentuação. " * 100).strip()
    parts = split_message(text)
    assert all(len(p) <= 1500 for p in parts) and len(parts) == 3
    assert all(p.endswith(".") for p in parts)


def test_whitespace_at_edges_stripped():
    parts = split_message("\n\n  aaa bbb   \n\n   ccc ddd  \n", 8)
    assert parts == ["aaa bbb", "ccc ddd"]


VOCAB = (
    "a de que não ação você é já olá código emoção 😀 👍🏽 🇧🇷 word test lorem "
    "https://example.com/a_b_c https://x.io/" + "z" * 50
).split()


def random_text(rng: random.Random) -> str:
    chunks = []
    for _ in range(rng.randint(0, 120)):
        r = rng.random()
        if r < 0.04:
            body = "\n".join(" ".join(rng.choices(VOCAB, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4)))
            chunks.append(f"\n```py\n{body}\n```\n")
        elif r < 0.10:
            chunks.append(rng.choice(["\n\n", "\n", "\n \n\n", "\t"]))
        elif r < 0.25:
            chunks.append(rng.choice(VOCAB) + rng.choice([".", "!", "?", "…", ".\"", ",", ":"]) + rng.choice([" ", "\n"]))
        else:
            chunks.append(rng.choice(VOCAB) + rng.choice([" ", " ", "  ", "\n"]))
    return rng.choice(["", " ", "\n"]) + "".join(chunks) + rng.choice(["", "  ", "\n\n"])


@pytest.mark.parametrize("seed", range(5))
def test_random_texts_property(seed):
    rng = random.Random(seed)
    for _ in range(100):
        text = random_text(rng)
        max_chars = rng.choice([1, 5, 20, 37, 60, 100, 250, 1500])
        parts = split_message(text, max_chars)
        check_invariants(text, parts, max_chars)
        if all(len(w) <= max_chars for w in text.split()):
            assert " ".join(parts).split() == text.split()
        if len(text.strip()) <= max_chars:
            assert parts == ([text.strip()] if text.strip() else [])


def test_random_converted_markdown_then_split():
    rng = random.Random(42)
    marks = ["**", "*", "_", "~~", "`", "# ", "- ", "[x](https://a.com/b_c)"]
    for _ in range(100):
        src = " ".join(rng.choice(marks) + rng.choice(VOCAB) + rng.choice(marks) for _ in range(rng.randint(0, 40)))
        out = md(src)
        assert "\ue000" not in out and "\ue002" not in out and "\ue003" not in out
        check_invariants(out, split_message(out, 50), 50)


def test_random_markdown_keeps_code_verbatim():
    rng = random.Random(7)
    pieces = ["**b**", "*i*", "_u_", "~~s~~", "# h", "- li", "* li", "---", "| a | b |", "|---|---|", "\n\n\n\n"]
    for _ in range(200):
        codes = [f"```\n{rng.choice(pieces)} {rng.choice(pieces)}\n```", f"`{rng.choice(pieces).strip()}`"]
        chunks = rng.choices(pieces, k=rng.randint(0, 8)) + [codes[0], "x " + codes[1]]
        rng.shuffle(chunks)
        out = md("\n".join(chunks))
        for code in codes:
            if code.strip("`").strip():
                assert code in out


# --------------------------------------------------------------------------- properties (hypothesis)
#
# Hypothesis finds the inputs hand-written cases miss. The reference copies below are the quadratic
# implementation this module's cases were written against: on inputs small enough for them to be fast,
# the linear implementation must give exactly the same output.


def reference_markdown_to_whatsapp(text: str) -> str:
    stash: list[str] = []

    def keep(s: str) -> str:
        stash.append(s)
        return f"\ue000{len(stash) - 1}\ue001"

    bold, ital, strike = "\ue002", "\ue003", "\ue004"
    fence = r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)"
    text = re.sub(fence, lambda m: keep(m[0]), text)
    text = re.sub(r"(`+)[^`\n]+\1", lambda m: keep(m[0]), text)
    url = r"((?:[^()\s]|\([^()\s]*\))+)"
    text = re.sub(rf"!\[([^\]\n]*)\]\({url}\)", lambda m: f"{m[1]}: {keep(m[2])}" if m[1] else keep(m[2]), text)
    text = re.sub(rf"\[([^\]\n]+)\]\({url}\)", lambda m: keep(m[2]) if m[1] == m[2] else f"{m[1]} ({keep(m[2])})", text)
    text = re.sub(r"(?:https?://|www\.)[^\s<>]*[^\s<>.,;:!?'\")\]*_~]", lambda m: keep(m[0]), text)
    lines = []
    for line in text.split("\n"):
        if "|" in line and "-" in line and re.fullmatch(r"[\s|:-]+", line):
            continue
        if re.fullmatch(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*", line):
            line = ""
        elif m := re.fullmatch(r"[ \t]{0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*", line):
            line = bold + m[1].replace("**", "") + bold
        elif line.lstrip().startswith("|"):
            line = " | ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
        else:
            line = re.sub(r"^([ \t]*)[*+-][ \t]+", r"\1• ", line)
        lines.append(line)
    text = "\n".join(lines)
    for marks, out in (("***", bold + ital), ("**", bold), ("__", bold), ("~~", strike), ("*", ital), ("_", ital)):
        c, escaped = re.escape(marks[0]), re.escape(marks)

        def close(g, out=out):
            return out + g[1] + out[::-1]

        text = re.sub(rf"(?<![\w{c}]){escaped}(?![\s{c}])([^\n]+?)(?<![\s{c}]){escaped}(?![\w{c}])", close, text)
    for mark, char in ((bold, "*"), (ital, "_"), (strike, "~")):
        text = text.replace(mark, char)
    text = re.sub(r"\n(?:[ \t]*\n){3,}", "\n\n\n", text)
    token = re.compile("\ue000(\\d+)\ue001")

    def restore(m):
        return token.sub(restore, stash[int(m[1])])

    return token.sub(restore, text).strip()


def reference_split_message(text: str, max_chars: int = 1500) -> list[str]:
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    text = text.strip()
    breaks = [re.compile(p) for p in (r"(?=\n[ \t]*\n)", r"(?=\n)", r"[.!?…]+[\"'”’»)\]]*(?=\s)", r"(?=\s)")]
    ws = re.compile(r"\s*")

    def after_space(pos):
        return ws.match(text, pos).end()

    blocked = [m.span() for m in FENCE.finditer(text) if len(m[0]) <= max_chars]

    def best_cut(start):
        limit = start + max_chars
        end = after_space(limit)
        for pattern in breaks:
            cuts = [
                c
                for m in pattern.finditer(text, start + 1, end)
                if (c := m.end()) <= limit and not any(a < c < b for a, b in blocked)
            ]
            if cuts:
                return cuts[-1]
        return limit

    parts = []
    start = 0
    while len(text) - start > max_chars:
        cut = best_cut(start)
        parts.append(text[start:cut].rstrip())
        start = after_space(cut)
    return [*parts, text[start:]] if text else []


PROPERTY = settings(max_examples=300, deadline=None, database=None)  # shared CI cores; no .hypothesis/ files

# Any character but surrogates and private use (the latter are the formatter's own tokens: see below).
CHARS = st.characters(exclude_categories=("Cs", "Co"))
MD_PIECES = [
    "*", "**", "***", "_", "__", "~", "~~", "`", "``", "```", "~~~", "#", "## ", "###### ", "####### ",
    "[", "]", "(", ")", "![", "](", "|", "|---|", ":-:", "-", "---", "* ", "- ", "+ ", "> ", "•",
    " ", "  ", "\t", "\n", "\n\n", "\n \n", "\n\n\n\n", ".", "!", "?", "…", "...", '"', "”", "»", ",", ":",
    "a", "b", "word", "é", "😀", "2", "https://", "http://x.io/a_b", "www.", "<", ">", "\u00a0", "\r", "\u2028",
]
markdown_texts = st.lists(st.one_of(st.sampled_from(MD_PIECES), st.text(CHARS, max_size=3)), max_size=60).map(
    "".join
)
code_blocks = st.builds(
    lambda fence, info, body: f"{fence}{info}\n{body}\n{fence}",
    st.sampled_from(["```", "````", "~~~"]),
    st.sampled_from(["", "py", "bash"]),
    st.lists(st.sampled_from(["**x**", "_y_", "# h", "- li", "[a](b)", "---", "", "  a  b", "~~s~~", "| a |"]),
             max_size=6).map("\n".join),
)
split_texts = st.lists(
    st.one_of(st.sampled_from(MD_PIECES), st.text(CHARS, max_size=12), code_blocks.map(lambda c: f"\n{c}\n")),
    max_size=40,
).map("".join)


@PROPERTY
@given(markdown_texts)
def test_markdown_matches_reference_property(src):
    assert md(src) == reference_markdown_to_whatsapp(src)


@PROPERTY
@given(st.text(CHARS, max_size=80))
def test_markdown_matches_reference_on_any_text_property(src):
    assert md(src) == reference_markdown_to_whatsapp(src)


@PROPERTY
@given(split_texts, st.integers(1, 90))
def test_split_matches_reference_property(text, max_chars):
    assert split_message(text, max_chars) == reference_split_message(text, max_chars)


@PROPERTY
@given(split_texts, st.integers(1, 120))
def test_split_invariants_property(text, max_chars):
    parts = split_message(text, max_chars)
    check_invariants(text, parts, max_chars)  # non-empty, <= max_chars, rejoin, fitting code blocks whole
    if len(text.strip()) <= max_chars:
        assert parts == ([text.strip()] if text.strip() else [])


def joined(pieces, max_size):
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


FILLER = joined([*"ab é*_#-+|>.,!?:\n\t", "**", "__", "~~", "[x]", "(y)", "😀"], 30)
URLS = st.builds(
    lambda scheme, path, last: f"{scheme}example.com/{path}{last}",
    st.sampled_from(["https://", "http://", "www."]),
    st.text(st.sampled_from(list("az09_*~/.-")), max_size=15),
    st.sampled_from(list("az0/")),
)


@PROPERTY
@given(st.lists(st.tuples(FILLER, st.one_of(code_blocks, URLS, st.text(st.sampled_from("ab *_~#"), min_size=1,
                                                                     max_size=8).map(lambda s: f"`{s}`"))),
                max_size=5))
def test_markdown_never_touches_code_or_urls_property(chunks):
    kept = []
    src = ""
    for filler, verbatim in chunks:
        # Code blocks on lines of their own, URLs and inline code set off by spaces.
        src += f"{filler}\n{verbatim}\n" if verbatim[:3] in ("```", "~~~") else f"{filler} {verbatim} "
        kept.append(verbatim)
    out = md(src)
    for verbatim in kept:
        assert verbatim in out


@PROPERTY
@given(joined([*"ab é1.,!?:;-+•> \t\n", "\n\n\n\n", "---", "- - -"], 60))
def test_markdown_is_idempotent_without_emphasis_marks_property(src):
    # Prose, lists, rules and blank lines. Not other blanks, where the final strip can uncover a rule
    # (md("\xa0---") == "---", md("---") == ""), nor tables with empty cells (md("| |a") == "| a").
    once = md(src)
    assert md(once) == once


@PROPERTY
@given(code_blocks)
def test_markdown_code_block_is_a_fixed_point_property(block):
    assert md(block) == block.strip()
    assert md(md(block)) == md(block)


@pytest.mark.parametrize("src, want", [
    ("\ue0000\ue001", "\ue0000\ue001"),  # was an IndexError: read as the formatter's own token 0
    ("`a` \ue0000\ue001 **b**", "`a` \ue0000\ue001 *b*"),  # was the code span again
    ("a\ue002b **c**", "a\ue002b *c*"),  # was "a*b": read as a bold mark
])
def test_private_use_characters_are_text(src, want):
    assert md(src) == want


SENTINEL_TEXTS = st.lists(st.one_of(st.sampled_from([*"\ue000\ue001\ue002\ue003\ue004", "0", "12", "`x`", "**"]),
                                    st.text(max_size=4)), max_size=30).map("".join)


@PROPERTY
@given(SENTINEL_TEXTS)
def test_markdown_never_raises_and_keeps_private_use_characters_property(src):
    out = md(src)
    for char in "\ue000\ue001\ue002\ue003\ue004":
        assert out.count(char) == src.count(char)


# --------------------------------------------------------------------------- hostile sizes
#
# A reply is untrusted text and formatting runs on a worker thread: quadratic time on 200k characters is
# minutes of a frozen worker. The guard runs each input in a child Python and fails if it is still busy
# after 60 s (the quadratic implementation took minutes), so it asserts no timing on a loaded machine.

REPO = Path(__file__).resolve().parent.parent
HOSTILE_MARKDOWN = [
    '"*a " * 66_667',  # one unclosed italic after another: each rescanned the rest of the line
    '"**a " * 50_000',
    '"_a " * 66_667',
    '"~~a " * 50_000',
    '"_" * 200_000',
    '"~" * 200_000',
    '"[" * 200_000',  # brackets that never close
    '"![" * 100_000',
    '"[" * 100_000 + "]" * 100_000',  # deeply nested brackets for links
    '"x " + "`" * 200_000',  # a backtick storm inside a line
    '"```\\n" * 50_000',  # a fence storm
    '"# a" + " " * 200_000 + "b"',  # a heading with a long run of blanks
]
HOSTILE_SPLIT = [
    ('"```\\n```\\n" * 25_000', 1500),  # many small code blocks
    ('"```\\ncode line\\n```\\n" * 11_112', 1500),
    ('"```\\n" + "x " * 100_000', 1500),  # an unclosed fence
    ('"." * 200_000', 199_999),  # one run of sentence ends as long as a part
]


def run_guarded(call: str, expr: str) -> None:
    code = f"from whatsapp_webhook.formatting import *\ntext = {expr}\nassert len(text) >= 200_000\n{call}"
    try:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{call} still running after 60 s on {expr}: formatting is not linear")


@pytest.mark.parametrize("expr", HOSTILE_MARKDOWN)
def test_markdown_hostile_input_does_not_hang(expr):
    run_guarded("markdown_to_whatsapp(text)", expr)


@pytest.mark.parametrize("expr, max_chars", HOSTILE_SPLIT)
def test_split_hostile_input_does_not_hang(expr, max_chars):
    run_guarded(f"parts = split_message(text, {max_chars}); assert len(parts) > 1 or '.' in text", expr)
