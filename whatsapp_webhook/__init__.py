"""WhatsApp AI reply server: WAHA webhook -> LLM -> WAHA sendText, as a package of one module per concern.

How one message travels (module.function, and the thread it runs on):

  gunicorn worker, its main thread (gunicorn_worker.ReadDeadlineWorker, gthread with a read deadline):
    0. The poller gathers the request's headers (and a small body) and closes connections that do not
       deliver them within REQUEST_READ_TIMEOUT_SECONDS; only then does a request thread take over.

  gunicorn worker, a gthread request thread:
    1. app.create_app's POST route reads the whole body (app.read_whole_body: 413 over MAX_BODY_BYTES
       whatever the framing, 400 when cut short or malformed) and hands the raw bytes and headers to
       service.WebhookService.handle_webhook.
    2. signature.verify_token / verify_waha_hmac check the sender (401 otherwise).
    3. events.parse_event types the envelope (400 for bad JSON or field types); events.classify_event decides:
       a customer message (IncomingMessage), our own or a person's message from this account (OwnMessage:
       handoff, /bot off), a session.status (SessionStatus, recorded by health.HealthReporter), or Ignored
       with a reason (200; service.RequestTally counts it, and the rejections, in memory and writes them
       to the store about once a second).
    4. store.StateStore.accept records the message durably (the inbox) before any 2xx; a duplicate is ignored.
       Writes from every thread and worker queue at concurrency.WriterGate, which commits them in groups.
       (STATE_DB=postgresql://... : pg_store.PostgresStore does the same in PostgreSQL, where the deliveries a
       worker's threads record at the same moment go in one statement, concurrency.Batcher; stores.open_store picks.)
    5. The request thread wakes the dispatcher and waits on concurrency.CompletionBoard for up to
       WEBHOOK_SYNC_WAIT_SECONDS, then answers 200 with the outcome or 202 (the inbox keeps the message).

  the worker's event-loop thread (concurrency.BackgroundLoop, started after the fork by worker.WorkerRuntime):
    6. worker.Dispatcher claims due messages (StateStore.claim_due: one per chat, in order, with a lease,
       merging a burst, and in the same transaction the admission admission.ChatAdmission.request asks
       for: pause, opt-out, loops, rate limits, then the chat's history) and runs
       pipeline.ReplyPipeline.process for each as a task; store calls go to a small thread pool
       (asyncio.to_thread) so the loop never blocks on SQLite. While the batches come back full, the claims
       follow each other on one of those threads, each batch handed to the loop as it comes.
    7. ReplyPipeline._compose: commands, the claim's admission (skipped: a notice or silence),
       the session's business.SessionProfile (SESSIONS_FILE over the settings; opening hours: out of hours
       business_gate.BusinessGate sends a notice once per closed period or stays silent; the daily budget;
       the prompt: system prompt, knowledge.KnowledgeBase, turns, hours note),
       then llm.LLMClient.complete (retries, model fallbacks, cost) and formatting.markdown_to_whatsapp.
       Every upstream call goes through httpx over http11.KeepAliveTransport (keep-alive HTTP/1.1, on this loop).
    8. StateStore.begin_send stores the reply and checks order and handoff once more; formatting.split_message
       cuts it into parts and waha.WahaClient.send_text sends each (typing first, WAHA's anti-ban advice).
    9. StateStore.finish records the outcome and the turn in history; metrics count it; CompletionBoard wakes
       the waiting request thread (step 5).

  Media (media.py, media_fetch.py, media_reply.py): accept also queues the message's file (media_jobs)
  in the same transaction; media_fetch.MediaFetcher, on the same loop but its own queue, downloads it from
  WAHA's origin only, within MEDIA_MAX_BYTES, and stores the bytes; at step 7 media_reply.MediaTurns puts
  the burst's files and texts, in send order, into one user message, and keeps a text stand-in in history.

  A message whose worker died is taken over when its lease runs out (any worker's Dispatcher polls), and
  gunicorn.conf.py runs app.recover_after_restart once per server start (on PostgreSQL, shared by several
  hosts, it takes only leases that ran out). cli.main is the command line; its --migrate-to-postgres is
  state_migration.migrate_to_postgres.

Dependencies point one way, leaves first: texts, env_reader, hours, knowledge, sessions_config, settings, logs,
ownership, formatting, signature, metrics, store_api, policy, store_schema, pg_schema, health, events, media,
customer_data, concurrency, sqlite_base, chat_store, sqlite_media, store, pg_base, pg_chat_store, pg_media,
pg_store, stores, state_migration, http11, upstream, llm, media_fetch, media_reply, business, admission,
business_gate, waha,
pipeline, worker, service, gunicorn_worker, app, cli.
"""

__version__ = "1.1.0"
# The names monitors written against the user's original document compare: /health and /stats
# say SERVICE_NAME, GET on the webhook says WEBHOOK_SERVICE_NAME.
SERVICE_NAME = "whatsapp_webhook_server"
WEBHOOK_SERVICE_NAME = "whatsapp_webhook"
WEBHOOK_PATH = "/api/v1/whatsapp/webhook"
EXTENSION_KEY = "whatsapp_webhook"  # where create_app keeps the WebhookService in app.extensions
# In the WSGI environ under gunicorn_worker: call it to close the connection after the answer instead of
# reading the rest of a body the app refused.
CLOSE_CONNECTION_KEY = "whatsapp_webhook.close_connection"
