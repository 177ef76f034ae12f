"""The PostgreSQL state store's schema, its versioned migrations and the SQL of the inbox state machine.

The tables mirror the SQLite file's (store_schema.py) with PostgreSQL's types: epoch seconds as double
precision (the store's clock decides every time, never the server's), media as bytea, arrival order as an
identity column (`seq`, SQLite's rowid). Counters are split in shards, one per connection, so workers that
count at the same moment never wait for each other's row lock.
"""

from __future__ import annotations

from whatsapp_webhook.store_api import OPEN_STATUSES, InboxStatus

OPEN_SQL = "(" + ", ".join(f"'{status}'" for status in OPEN_STATUSES) + ")"
ALL_STATUSES_SQL = "(" + ", ".join(f"'{status}'" for status in InboxStatus) + ")"
ACTIVE_SQL = "('queued', 'processing', 'sending')"  # open and not merged into another message

SCHEMA_V1 = f"""
CREATE TABLE inbox (
    key text PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    chat_key text NOT NULL,
    sort_ts double precision NOT NULL,
    message text NOT NULL,
    text_hash text,
    status text NOT NULL CHECK (status IN {ALL_STATUSES_SQL}),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    lease_owner text,
    lease_expires_at double precision NOT NULL DEFAULT 0,
    merged_into text,
    merged text,
    outcome text,
    reply_text text,
    parts_sent integer NOT NULL DEFAULT 0,
    sent_message_id text,
    last_error text,
    send_started_at double precision,
    received_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    finished_at double precision
);
CREATE INDEX inbox_active ON inbox (sort_ts, seq) WHERE status IN {ACTIVE_SQL};
CREATE INDEX inbox_active_by_chat ON inbox (chat_key, sort_ts, seq) WHERE status IN {ACTIVE_SQL};
CREATE INDEX inbox_by_chat_text ON inbox (chat_key, text_hash, received_at);
CREATE INDEX inbox_by_finish ON inbox (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX inbox_by_merge ON inbox (merged_into) WHERE merged_into IS NOT NULL;
CREATE TABLE counters (
    name text NOT NULL,
    shard integer NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (name, shard)
);
CREATE TABLE history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chat_key text NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX history_by_chat ON history (chat_key, id);
CREATE INDEX history_by_age ON history (created_at);
CREATE TABLE chat_state (
    chat_key text PRIMARY KEY,
    paused_until double precision NOT NULL DEFAULT 0,
    pause_reason text,
    opted_out boolean NOT NULL DEFAULT false,
    minute_start double precision NOT NULL DEFAULT 0,
    minute_count integer NOT NULL DEFAULT 0,
    day text NOT NULL DEFAULT '',
    day_count integer NOT NULL DEFAULT 0,
    notice_at double precision NOT NULL DEFAULT 0
);
CREATE TABLE sent (
    chat_key text NOT NULL,
    text_hash text NOT NULL,
    bare_id text,
    sent_at double precision NOT NULL
);
CREATE INDEX sent_by_chat ON sent (chat_key, text_hash, sent_at);
CREATE INDEX sent_by_id ON sent (bare_id) WHERE bare_id IS NOT NULL;
CREATE INDEX sent_by_age ON sent (sent_at);
CREATE TABLE health (
    name text PRIMARY KEY,
    status text NOT NULL,
    reason text NOT NULL,
    since double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE media (
    key text PRIMARY KEY,
    mimetype text NOT NULL,
    data bytea NOT NULL,
    size integer NOT NULL,
    created_at double precision NOT NULL
);
"""

# The media queue: one row per message whose file is to be downloaded (pg_media.py).
SCHEMA_MEDIA_JOBS = """
CREATE TABLE IF NOT EXISTS media_jobs (
    key text PRIMARY KEY,
    url text NOT NULL,
    mimetype text NOT NULL,
    state text NOT NULL,
    reason text,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    lease_owner text,
    lease_expires_at double precision NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS media_jobs_due ON media_jobs (state, next_attempt_at);
"""
MEDIA_STORE_LOCK = 0x5741_0004  # one media write at a time checks MEDIA_STORE_MAX_BYTES

# Per-chat marks (Store.mark_once): the out-of-hours notice goes once per chat and closed period.
SCHEMA_CHAT_MARKS = """
CREATE TABLE IF NOT EXISTS chat_marks (
    chat_key text NOT NULL,
    name text NOT NULL,
    value text NOT NULL,
    updated_at double precision NOT NULL,
    PRIMARY KEY (chat_key, name)
);
"""

# MIGRATIONS[n - 1] takes a database from schema version n - 1 to n (the rows of schema_migrations).
# Append only: a released migration never changes, so every older database takes the same path.
# Release 1.2: how many times a message's reply went to sendText (REPLY_MAX_SENDS bounds it).
SCHEMA_V2 = """
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS sends integer NOT NULL DEFAULT 0;
"""

MIGRATIONS = (SCHEMA_V1, SCHEMA_V2, SCHEMA_MEDIA_JOBS, SCHEMA_CHAT_MARKS)
SCHEMA_VERSION = len(MIGRATIONS)

MIGRATIONS_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at double precision NOT NULL)"
)

# Advisory lock keys (the first of pg_advisory_lock's two ints; the second is the schema's hash, so two
# deployments in two schemas of one database never wait for each other).
MIGRATION_LOCK = 0x5741_0001  # held by the one server migrating; the others wait for it
CLAIM_LOCK = 0x5741_0002  # one claim at a time: per-chat order holds across workers and hosts
HEALTH_LOCK = 0x5741_0003  # bounds the rows of one health part
SCHEMA_KEY = "hashtext(coalesce(current_schema(), ''))"
COUNTER_SHARDS = 64

# The earliest message of its chat that is due, whose chat has no other reply in progress and whose
# burst is over (store_schema.NEXT_DUE_SQL, with seq for SQLite's rowid). Rows another transaction is
# changing right now are passed over (SKIP LOCKED): they are someone else's this instant.
CLAIM_DUE_SQL = f"""
WITH due AS (
    SELECT m.key, m.sort_ts, m.seq FROM inbox m
    WHERE m.status IN {ACTIVE_SQL}
      AND ((m.status = 'queued' AND m.next_attempt_at <= %(now)s
            AND (m.received_at <= %(burst_limit)s OR NOT EXISTS (
                SELECT 1 FROM inbox q WHERE q.chat_key = m.chat_key AND q.status = 'queued'
                  AND q.received_at > %(quiet_since)s)))
           OR (m.status <> 'queued' AND m.lease_expires_at < %(now)s))
      AND NOT EXISTS (
          SELECT 1 FROM inbox o
          WHERE o.chat_key = m.chat_key AND o.key <> m.key AND o.status IN {ACTIVE_SQL}
            AND ((o.status <> 'queued' AND o.lease_expires_at >= %(now)s)
                 OR (m.status <> 'sending' AND m.parts_sent = 0
                     AND (o.status = 'sending' OR o.parts_sent > 0
                          OR o.sort_ts < m.sort_ts OR (o.sort_ts = m.sort_ts AND o.seq < m.seq)))))
    ORDER BY m.sort_ts, m.seq
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
)
UPDATE inbox SET status = CASE inbox.status WHEN 'sending' THEN 'sending' ELSE 'processing' END,
    attempts = inbox.attempts + 1, lease_owner = %(owner)s, lease_expires_at = %(expires)s, updated_at = %(now)s
FROM due WHERE inbox.key = due.key
RETURNING inbox.key, inbox.message, inbox.status, inbox.attempts, inbox.reply_text, inbox.outcome,
    inbox.send_started_at, inbox.received_at, inbox.parts_sent, inbox.merged, due.sort_ts, due.seq
"""

# The last check before sendText in one read, with the message's row locked: who holds it, whether an
# earlier message of its chat is still open (it must go first), and whether the chat is paused.
BEGIN_SEND_SQL = f"""
SELECT m.status, m.lease_owner, m.chat_key, m.parts_sent, m.sends,
    EXISTS (SELECT 1 FROM inbox o
            WHERE o.chat_key = m.chat_key AND o.key <> m.key AND o.status IN {ACTIVE_SQL}
              AND (o.sort_ts < m.sort_ts OR (o.sort_ts = m.sort_ts AND o.seq < m.seq))) AS earlier_open,
    EXISTS (SELECT 1 FROM chat_state s WHERE s.chat_key = m.chat_key AND s.paused_until > %(now)s) AS paused
FROM inbox m WHERE m.key = %(key)s
FOR UPDATE OF m
"""

# A reply's end in one statement, so one round trip and no BEGIN/COMMIT (a single statement is atomic):
# `done` finishes the message when this worker may (see PostgresStore.finish); every other part acts only
# if it did. The parts run on one snapshot, which is why each touches rows no other part touches, and the
# counters get one row per name (a statement must not change a row twice). The messages merged into it
# (the burst) finish with it; the files of the burst, their download jobs, the last part's id (so its echo
# is known as ours), the two turns of history (in order: ids follow ORDINALITY) and the counts go with it.
FINISH_SQL = """
WITH done AS (
    UPDATE inbox SET status = 'done', outcome = %(outcome)s, sent_message_id = COALESCE(%(sent_id)s, sent_message_id),
        lease_owner = NULL, reply_text = NULL, finished_at = %(now)s, updated_at = %(now)s
    WHERE key = %(key)s AND status <> 'done' AND (lease_owner = %(owner)s
        OR (reply_text IS NOT NULL AND status <> 'failed' AND %(outcome)s <> 'skipped'))
    RETURNING chat_key
), burst AS (
    SELECT %(key)s::text AS key FROM done
    UNION ALL SELECT key FROM inbox WHERE merged_into = %(key)s AND EXISTS (SELECT 1 FROM done)
), followers AS (
    UPDATE inbox SET status = 'done', outcome = %(followers_outcome)s, finished_at = %(now)s, updated_at = %(now)s
    WHERE merged_into = %(key)s AND status = 'merged' AND EXISTS (SELECT 1 FROM done)
    RETURNING 1
), files AS (
    DELETE FROM media WHERE key IN (SELECT key FROM burst)
), downloads AS (
    DELETE FROM media_jobs WHERE key IN (SELECT key FROM burst)
), echo AS (
    INSERT INTO sent (chat_key, text_hash, bare_id, sent_at)
    SELECT chat_key, '', %(last_part)s::text, %(now)s FROM done WHERE %(last_part)s::text IS NOT NULL
), turns AS (
    INSERT INTO history (chat_key, role, content, created_at)
    SELECT done.chat_key, turn.role, turn.content, %(now)s
    FROM done, unnest(%(roles)s::text[], %(contents)s::text[]) WITH ORDINALITY AS turn (role, content, n)
    ORDER BY turn.n
), counted AS (
    INSERT INTO counters (name, shard, value)
    SELECT name, %(shard)s, SUM(amount) FROM (
        SELECT %(counter)s::text AS name, 1 + (SELECT COUNT(*) FROM followers) AS amount FROM done
        UNION ALL
        SELECT name, amount FROM unnest(%(names)s::text[], %(amounts)s::bigint[]) AS counts (name, amount)
        WHERE EXISTS (SELECT 1 FROM done)
    ) AS bumps GROUP BY name
    ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value
)
SELECT chat_key FROM done
"""

# New messages recorded in one statement (autocommit, atomic by itself): a batch of deliveries with their
# count and, for a file worth downloading (media.worth_downloading), a download job. `seq`, the tie-break of
# per-chat order, is drawn in the order the deliveries came (ORDINALITY), while the rows go in in key order: two
# workers' batches holding the same keys then wait for each other in one order, never in a cycle (a deadlock
# PostgreSQL would break only after a second). A key already in the inbox (or twice in the batch: the first one
# counts) adds nothing; PostgresStore.accept then looks at that row itself.
ACCEPT_SQL = """
WITH batch AS (
    SELECT b.*, nextval(pg_get_serial_sequence('inbox', 'seq')) AS seq FROM (
        SELECT * FROM unnest(%(keys)s::text[], %(chat_keys)s::text[], %(sort_ts)s::float8[], %(messages)s::text[],
            %(text_hashes)s::text[], %(urls)s::text[], %(mimetypes)s::text[])
            WITH ORDINALITY AS u (key, chat_key, sort_ts, message, text_hash, url, mimetype, n)
        ORDER BY n
    ) AS b
), new AS (
    INSERT INTO inbox (seq, key, chat_key, sort_ts, message, text_hash, status, next_attempt_at, received_at,
        updated_at) OVERRIDING SYSTEM VALUE
    SELECT seq, key, chat_key, sort_ts, message, text_hash, 'queued', %(now)s, %(now)s, %(now)s FROM batch
    ORDER BY key, n
    ON CONFLICT (key) DO NOTHING
    RETURNING key
), counted AS (
    INSERT INTO counters (name, shard, value) SELECT 'messages_received', %(shard)s, COUNT(*) FROM new
    HAVING COUNT(*) > 0
    ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value
), download AS (
    INSERT INTO media_jobs (key, url, mimetype, state, next_attempt_at, created_at, updated_at)
    SELECT b.key, b.url, b.mimetype, 'pending', %(now)s, %(now)s, %(now)s FROM batch b JOIN new ON new.key = b.key
    WHERE b.url IS NOT NULL
    ON CONFLICT (key) DO NOTHING
)
SELECT key FROM new
"""

# begin_send's writes once the verdict is SEND: the parts' fingerprints (so our own echo is never taken for a
# human), what writing the reply cost (when it cost anything) and the message's state: sending, with a new
# reply's text stored so a retry resends the same words.
_ECHOES_AND_COST = """
echoes AS (
    INSERT INTO sent (chat_key, text_hash, sent_at)
    SELECT go.chat_key, hash, %(now)s FROM go, unnest(%(hashes)s::text[]) AS hash
), cost AS (
    INSERT INTO counters (name, shard, value) SELECT %(cost_name)s, %(shard)s, %(cost)s WHERE %(cost)s::bigint > 0
    ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value
)"""
_SENDING_SET = """
UPDATE inbox SET status = 'sending', send_started_at = %(now)s, updated_at = %(now)s, sends = sends + %(sending)s,
    reply_text = CASE WHEN %(new)s THEN %(text)s ELSE reply_text END,
    outcome = CASE WHEN %(new)s THEN %(outcome)s ELSE outcome END,
    parts_sent = CASE WHEN %(new)s THEN 0 ELSE parts_sent END
FROM go WHERE inbox.key = go.key"""

# The writes of a SEND verdict decided under BEGIN_SEND_SQL's lock, in one statement.
SENDING_SQL = f"""
WITH go AS (SELECT %(key)s::text AS key, %(chat_key)s::text AS chat_key), {_ECHOES_AND_COST}
{_SENDING_SET}
"""

# begin_send's common case in one statement, so one round trip and no BEGIN/COMMIT: the message's row locked
# and read by BEGIN_SEND_SQL itself, and the SEND writes made when the reply plainly may go out now (this
# worker's lease, sends left, and sending begun already or nothing earlier open and no pause). That is never
# more than policy.send_verdict allows (tests/test_pg_store.py checks every case against it); every other case
# answers false, and PostgresStore.begin_send decides it under the lock, as before. The cost counts either way.
BEGIN_SEND_FAST_SQL = f"""
WITH m AS ({BEGIN_SEND_SQL}), go AS (
    SELECT %(key)s::text AS key, chat_key FROM m
    WHERE lease_owner = %(owner)s AND status IN ('processing', 'sending')
      AND (%(max_sends)s::int IS NULL OR sends < %(max_sends)s::int)
      AND (status = 'sending' OR parts_sent > 0 OR (NOT earlier_open AND NOT paused))
), {_ECHOES_AND_COST}, sending AS (
{_SENDING_SET}
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM sending)
"""
