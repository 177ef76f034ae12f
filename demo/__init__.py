"""No-account demo: `./start_webhook_server.sh demo` (or `python -m demo.run_demo`)."""
