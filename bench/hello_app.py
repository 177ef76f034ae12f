"""The bare Flask app run 1 compares against: one POST route answering a small JSON, nothing else.

Run under exactly the gunicorn settings of the real server (bench/run_bench.py passes them explicitly):
    gunicorn -k gthread -w 2 --threads 32 ... bench.hello_app:app
"""

from __future__ import annotations

from flask import Flask, jsonify

app = Flask(__name__)


@app.post("/api/v1/whatsapp/webhook")
def hello():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ignored", "reason": "hello"}), 200
