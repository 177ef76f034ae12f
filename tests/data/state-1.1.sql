-- A state file written by release 1.1.0 (schema without a version), as `sqlite3 state.db .dump` shows it:
-- one message answered, one left in flight by a worker that died, one queued; a paused and an opted-out
-- chat; counters, history and health. tests/test_sqlite_store.py upgrades it in place.
BEGIN TRANSACTION;
CREATE TABLE chat_state (
    chat_key TEXT PRIMARY KEY,
    paused_until REAL NOT NULL DEFAULT 0,
    pause_reason TEXT,
    opted_out INTEGER NOT NULL DEFAULT 0,
    minute_start REAL NOT NULL DEFAULT 0,
    minute_count INTEGER NOT NULL DEFAULT 0,
    day TEXT NOT NULL DEFAULT '',
    day_count INTEGER NOT NULL DEFAULT 0,
    notice_at REAL NOT NULL DEFAULT 0
);
INSERT INTO "chat_state" VALUES('default:5511900000009@c.us',1764003601.0,'handoff',0,0.0,0,'',0,0.0);
INSERT INTO "chat_state" VALUES('default:5511900000008@c.us',0.0,NULL,1,0.0,0,'',0,0.0);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO "counters" VALUES('messages_received',3);
INSERT INTO "counters" VALUES('messages_processed',1);
INSERT INTO "counters" VALUES('ignored.event_not_handled',3);
CREATE TABLE health (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    updated_at REAL NOT NULL
);
INSERT INTO "health" VALUES('waha:default','ok','sendText works for WAHA session ''default''',1764000001.0,1764000001.0);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_key TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL
);
INSERT INTO "history" VALUES(1,'default:5511900000001@c.us','user','Qual o horário?',1764000000.0);
INSERT INTO "history" VALUES(2,'default:5511900000001@c.us','assistant','Das 8h às 18h.',1764000000.0);
CREATE TABLE inbox (
    key TEXT PRIMARY KEY,
    chat_key TEXT NOT NULL,
    sort_ts REAL NOT NULL,
    message TEXT NOT NULL,
    text_hash TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL NOT NULL DEFAULT 0,
    merged_into TEXT,
    merged TEXT,
    outcome TEXT,
    reply_text TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0,
    sent_message_id TEXT,
    last_error TEXT,
    send_started_at REAL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
INSERT INTO "inbox" VALUES('default:3EB0DUMP000000000001','default:5511900000001@c.us',1764000000.0,'{"event_id": "evt_01m8rda2hp0dvndd5txe122h87", "event": "message", "session": "default", "engine": "WEBJS", "chat_id": "5511900000001@c.us", "message_id": "false_5511900000001@c.us_3EB0DUMP000000000001", "dedupe_key": "default:3EB0DUMP000000000001", "participant": null, "text": "Qual o horário?", "timestamp": 1764000000.0, "mentions_bot": false, "reply_to_id": null}','c4a1e35d1ac73719c4b7ce02','done',1,1764000000.0,NULL,1764000030.0,NULL,NULL,'success',NULL,0,'true_5511900000001@c.us_3EB0AAAA',NULL,1764000000.0,1764000000.0,1764000000.0,1764000000.0);
INSERT INTO "inbox" VALUES('default:3EB0DUMP000000000002','default:5511900000002@c.us',1764000000.0,'{"event_id": "evt_01m8rda2hppzfxb703hq7fk28h", "event": "message", "session": "default", "engine": "WEBJS", "chat_id": "5511900000002@c.us", "message_id": "false_5511900000002@c.us_3EB0DUMP000000000002", "dedupe_key": "default:3EB0DUMP000000000002", "participant": null, "text": "Vocês entregam?", "timestamp": 1764000000.0, "mentions_bot": false, "reply_to_id": null}','7140aec3420b7eba6365408b','processing',1,1764000000.0,'dead-worker',1764000031.0,NULL,NULL,NULL,NULL,0,NULL,NULL,NULL,1764000000.0,1764000001.0,NULL);
INSERT INTO "inbox" VALUES('default:3EB0DUMP000000000003','default:5511900000003@c.us',1764000000.0,'{"event_id": "evt_01m8rda2hpxdccnamhzggfcaz6", "event": "message", "session": "default", "engine": "WEBJS", "chat_id": "5511900000003@c.us", "message_id": "false_5511900000003@c.us_3EB0DUMP000000000003", "dedupe_key": "default:3EB0DUMP000000000003", "participant": null, "text": "Oi", "timestamp": 1764000000.0, "mentions_bot": false, "reply_to_id": null}','87f633634cc4b02f62868565','queued',0,1764000000.0,NULL,0.0,NULL,NULL,NULL,NULL,0,NULL,NULL,NULL,1764000000.0,1764000000.0,NULL);
CREATE TABLE sent (
    chat_key TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    bare_id TEXT,
    sent_at REAL NOT NULL
);
INSERT INTO "sent" VALUES('default:5511900000001@c.us','0c16b1f2c7823b6a8da4a7cf',NULL,1764000000.0);
INSERT INTO "sent" VALUES('default:5511900000001@c.us','','3EB0AAAA',1764000000.0);
CREATE INDEX inbox_by_status ON inbox (status, next_attempt_at);
CREATE INDEX inbox_by_chat ON inbox (chat_key, sort_ts);
CREATE INDEX inbox_open_by_chat ON inbox (chat_key, status, received_at);
CREATE INDEX inbox_by_finish ON inbox (finished_at);
CREATE INDEX inbox_by_merge ON inbox (merged_into);
CREATE INDEX history_by_chat ON history (chat_key, id);
CREATE INDEX history_by_age ON history (created_at);
CREATE INDEX sent_by_chat ON sent (chat_key, text_hash);
CREATE INDEX sent_by_id ON sent (bare_id);
CREATE INDEX sent_by_age ON sent (sent_at);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('history',2);
COMMIT;
