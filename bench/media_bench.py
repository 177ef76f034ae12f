"""Media benchmark: 200 voice notes (~40 KB each) from 100 chats at 1 s LLM latency, beside as many texts.

    .venv/bin/python -m bench.media_bench            # about a minute
    .venv/bin/python -m bench.media_bench --messages 40 --chats 20   # smoke run

Everything on 127.0.0.1: the fake WAHA (50 ms per call, serving fakes/data/media/voice_note_long.ogg at each
message's /api/files URL) and the fake LLM (1 s per answer, checking each audio part decodes to the served
bytes) in this process; our server under gunicorn (2 workers, the repo's gunicorn.conf.py, DEBOUNCE_SECONDS=0,
TYPING_SIMULATION=false, limits out of reach). Deliveries are fired without waiting, as WAHA does
(WEBHOOK_SYNC_WAIT_SECONDS=0: each is answered 202 once recorded). For the text run and the voice-note run it
prints: time from the first delivery to the last reply at the fake WAHA, the ideal (messages per chat ×
(1.0 + 0.05) s), each worker's peak RSS (sampled every 100 ms; target < 150 MB), and whether every chat got
exactly one reply per message. Media bytes held at once are bounded per worker by MEDIA_FETCHES_IN_FLIGHT
downloads of at most MEDIA_MAX_BYTES, plus the replies being written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.run_bench import children, rss_mb
from fakes import FakeOpenRouter, FakeWaha
from fakes import waha_payloads as wp
from fakes.gunicorn_server import GunicornServer
from whatsapp_webhook import WEBHOOK_PATH
from whatsapp_webhook.media_fetch import MEDIA_FETCHES_IN_FLIGHT

VOICE = Path(__file__).resolve().parent.parent / "fakes" / "data" / "media" / "voice_note_long.ogg"
WAHA_KEY, LLM_KEY = "bench-waha-key", "bench-llm-key"


class PeakRss(threading.Thread):
    def __init__(self, master: int) -> None:
        super().__init__(daemon=True)
        self.master, self.peak, self.done = master, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for pid in children(self.master):
                self.peak[pid] = max(self.peak.get(pid, 0.0), rss_mb(pid) or 0.0)  # None: the worker is gone


def run_once(kind: str, *, messages: int, chats: int, waha: FakeWaha, llm: FakeOpenRouter, folder: Path,
             workers: int) -> dict[str, object]:
    waha.reset()
    llm.reset()
    env = {"WAHA_BASE_URL": waha.url, "WAHA_API_KEY": WAHA_KEY, "OPENROUTER_BASE_URL": llm.url + "/api/v1",
           "OPENROUTER_API_KEY": LLM_KEY, "LOG_LEVEL": "WARNING", "LOG_FILE": "", "TYPING_SIMULATION": "false",
           "DEBOUNCE_SECONDS": "0", "WEBHOOK_SYNC_WAIT_SECONDS": "0", "RATE_LIMIT_PER_MINUTE": "100000",
           "DAILY_MESSAGE_LIMIT": "1000000", "LOOP_REPEATS": "1000"}
    server = GunicornServer(folder / kind, env, workers=workers).start()
    voice = VOICE.read_bytes()
    base = int(time.time())
    envelopes = []
    for round_ in range(messages // chats):
        for n in range(chats):
            chat = f"55219{n:08d}@c.us"  # 5511900000000 is the bot itself (waha_payloads.BOT_ID)
            if kind == "voice":
                envelope = wp.media_message("GOWS", kind="audio", sender=chat, timestamp=base + round_)
                waha.serve_file(urlsplit(envelope["payload"]["media"]["url"]).path, voice, "audio/ogg")
            else:
                envelope = wp.text_message("GOWS", body=f"pergunta {round_} de {chat}", sender=chat,
                                           timestamp=base + round_)
            envelopes.append((chat, wp.dumps(envelope)))
    sampler = PeakRss(server.process.pid)
    sampler.start()
    try:
        with httpx.Client(timeout=30) as http, concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda item: http.post(server.url + WEBHOOK_PATH, content=item[1], headers={
                "Content-Type": "application/json"}), envelopes))
        codes = Counter(a.status_code for a in answers)
        for answer in answers:
            if answer.status_code != 202:
                print("  unexpected answer:", answer.status_code, answer.text[:200])
        deadline = time.monotonic() + 120
        while len(waha.delivered_texts()) < len(envelopes) and time.monotonic() < deadline:
            time.sleep(0.02)
        last_reply = max((r["t_mono"] for r in waha.requests("/api/sendText", "POST") if r["status"] == 201),
                         default=started)
        time.sleep(2.0)  # late duplicates would show up now
        sampler.done.set()
        per_chat = Counter(t["chatId"] for t in waha.delivered_texts())
        exactly_once = len(per_chat) == chats and set(per_chat.values()) == {messages // chats}
        audio_parts = sum(1 for seen in llm.media_seen() if seen["kind"] == "input_audio")
        downloads = len([r for r in waha.requests(method="GET") if r["path"].startswith("/api/files/")])
        return {"kind": kind, "messages": len(envelopes), "http": dict(codes),
                "seconds": last_reply + waha.latency_s - started, "ideal": (messages // chats) * (1.0 + waha.latency_s),
                "peak_rss": sorted(sampler.peak.values()), "exactly_once": exactly_once,
                "audio_parts": audio_parts, "downloads": downloads, "replies": sum(per_chat.values())}
    finally:
        sampler.done.set()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.media_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--llm-latency", type=float, default=1.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="media-bench-") as tmp, \
            FakeWaha(api_key=WAHA_KEY, engine="GOWS", latency_s=0.05) as waha, \
            FakeOpenRouter(api_key=LLM_KEY, latency_s=args.llm_latency) as llm:
        results = [run_once(kind, messages=args.messages, chats=args.chats, waha=waha, llm=llm, folder=Path(tmp),
                            workers=args.workers) for kind in ("text", "voice")]
    print(f"\nvoice note: {VOICE.name}, {VOICE.stat().st_size} bytes; {args.chats} chats; LLM {args.llm_latency} s, "
          f"WAHA 0.05 s; {args.workers} workers; media downloads in flight per worker: {MEDIA_FETCHES_IN_FLIGHT}\n")
    print("| run | messages | HTTP | time to last reply | ideal | peak RSS per worker (MB) | exactly once |"
          " audio parts / downloads |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rss = ", ".join(f"{v:.0f}" for v in r["peak_rss"])  # type: ignore[union-attr]
        verdict = "yes" if r["exactly_once"] else f"NO ({r['replies']} replies)"
        print(f"| {r['kind']} | {r['messages']} | {r['http']} | {r['seconds']:.2f} s | {r['ideal']:.2f} s | {rss} |"
              f" {verdict} | {r['audio_parts']} / {r['downloads']} |")
    over = [v for r in results for v in r["peak_rss"] if v >= 150]  # type: ignore[union-attr]
    print("\nRSS target < 150 MB per worker: " + ("MISS" if over else "ok"))
    return 0 if all(r["exactly_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
