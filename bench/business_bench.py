"""What the business features cost per message, in-process: the opening-hours answer and note, and the
knowledge section when its file is unchanged (within the 1 s window, and with a stat on every call).

    .venv/bin/python -m bench.business_bench

Prints one line per figure; no target (the reply path's whole cost is run 2 of bench.run_bench)."""

from __future__ import annotations

import os
import tempfile
import time

from whatsapp_webhook.hours import build_schedule, hours_status, prompt_note
from whatsapp_webhook.knowledge import KnowledgeBase


def per_call(call: object, repeat: int) -> float:
    assert callable(call)
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat


def main() -> None:
    schedule = build_schedule("seg-sex 08:00-18:00; sab 08:00-12:00", timezone="America/Sao_Paulo",
                              holidays="2026-12-25, 2027-01-01")
    hours = per_call(lambda: prompt_note(schedule, hours_status(schedule, time.time())), 20_000)
    print(f"opening hours: status and prompt note per message: {hours * 1e6:.1f} us")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "faq.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("Pergunta: quanto custa a entrega? Resposta: R$ 5,00 no Centro.\n" * 3000)
        started = time.perf_counter()
        base = KnowledgeBase(path, 200_000)
        chars = len(base.section())
        print(f"knowledge: first read of a {chars:,}-char file: {(time.perf_counter() - started) * 1e3:.2f} ms")
        print(f"knowledge: unchanged, within the 1 s window: {per_call(base.section, 200_000) * 1e6:.2f} us")
        every = KnowledgeBase(path, 200_000, check_seconds=0)
        every.section()
        print(f"knowledge: unchanged, looked at (os.stat) on the call: {per_call(every.section, 20_000) * 1e6:.2f} us")


if __name__ == "__main__":
    main()
