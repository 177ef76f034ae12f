"""The seed-style baseline: the user's original design, kept to measure the speed-up against.

    gunicorn -w 4 --worker-class sync bench.seed_baseline:app      (bench/run_bench.py starts it)

What it reproduces, on purpose (do not "fix" it; it is the thing being compared against):
  * sync workers: one message at a time per process, 4 processes;
  * the view answers WAHA only after the whole reply is done: it runs `asyncio.run(process(...))`;
  * every message builds a NEW `httpx.AsyncClient()` (default TLS context loaded each time, no pool);
  * LLM call, then WAHA sendText, inline; no dedupe store, no per-chat order, no retries;
  * counters in a module-level dict, so each worker process counts only its own messages.

Settings come from SEED_LLM_URL (…/api/v1), SEED_LLM_KEY, SEED_WAHA_URL and SEED_WAHA_KEY.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
from flask import Flask, jsonify, request

LLM_URL = os.environ.get("SEED_LLM_URL", "https://openrouter.ai/api/v1").rstrip("/")
LLM_KEY = os.environ.get("SEED_LLM_KEY", "")
LLM_MODEL = os.environ.get("SEED_LLM_MODEL", "google/gemini-3.1-flash-lite")
WAHA_URL = os.environ.get("SEED_WAHA_URL", "http://localhost:3000").rstrip("/")
WAHA_KEY = os.environ.get("SEED_WAHA_KEY", "")
SYSTEM_PROMPT = "Você é um assistente prestativo. Responda de forma breve e educada."

app = Flask(__name__)
stats: dict[str, int] = {"received": 0, "processed": 0, "errors": 0}  # per process, as in the seed


async def process_message(session: str, chat_id: str, text: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30.0) as client:  # a new client (and TLS context) per message
        llm = await client.post(
            f"{LLM_URL}/chat/completions",
            headers={"Authorization": f"Bearer {LLM_KEY}"},
            json={"model": LLM_MODEL, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                                   {"role": "user", "content": text}]})
        llm.raise_for_status()
        reply = llm.json()["choices"][0]["message"]["content"]
        sent = await client.post(f"{WAHA_URL}/api/sendText", headers={"X-Api-Key": WAHA_KEY},
                                 json={"session": session, "chatId": chat_id, "text": reply})
        sent.raise_for_status()
    return {"from_number": chat_id, "response_sent": True, "reply_chars": len(reply)}


@app.post("/api/v1/whatsapp/webhook")
def webhook() -> Any:
    data = request.get_json(silent=True) or {}
    if data.get("event") != "message":
        return jsonify({"status": "ignored"}), 200
    payload = data.get("payload") or {}
    if payload.get("fromMe") or not payload.get("body"):
        return jsonify({"status": "ignored"}), 200
    stats["received"] += 1
    try:
        result = asyncio.run(process_message(data.get("session") or "default", payload["from"], payload["body"]))
    except Exception as exc:
        stats["errors"] += 1
        return jsonify({"status": "error", "error": str(exc)}), 500
    stats["processed"] += 1
    return jsonify({"status": "processed", "result": result}), 200


@app.get("/health")
def health() -> Any:
    return jsonify({"status": "healthy", "stats": stats})
