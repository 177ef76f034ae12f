"""Loopback benchmark of the webhook server: `python -m bench.run_bench` (see bench/README.md)."""
