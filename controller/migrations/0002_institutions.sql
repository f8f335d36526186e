-- Institutions with their quotas, their users, API tokens (hashes only),
-- the application inventory on each VPS, and the audit trail.
CREATE TABLE institutions (
    id            TEXT PRIMARY KEY,
    code          TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    contact_name  TEXT NOT NULL DEFAULT '',
    contact_email TEXT NOT NULL DEFAULT '',
    contact_phone TEXT NOT NULL DEFAULT '',
    quota_vcpus   INTEGER NOT NULL DEFAULT 0,
    quota_memory_mib INTEGER NOT NULL DEFAULT 0,
    quota_disk_gib   INTEGER NOT NULL DEFAULT 0,
    quota_vps        INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    full_name      TEXT NOT NULL DEFAULT '',
    email          TEXT NOT NULL DEFAULT '',
    institution_id TEXT NOT NULL REFERENCES institutions(id),
    role           TEXT NOT NULL CHECK (role IN ('member', 'operator', 'admin')),
    created_at_ms  INTEGER NOT NULL
) STRICT;

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users(id),
    name          TEXT NOT NULL DEFAULT '',
    -- SHA-256 of the secret, hex. The secret itself is never stored.
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL DEFAULT 0,
    revoked_at_ms INTEGER NOT NULL DEFAULT 0
) STRICT;

ALTER TABLE vps ADD COLUMN institution_id TEXT REFERENCES institutions(id);
ALTER TABLE vps ADD COLUMN app_name TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN app_kind TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN app_purpose TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN app_domain TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN resp_name TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN resp_nip TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN resp_email TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN resp_phone TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN decided_by TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN pinned_host TEXT;
CREATE INDEX vps_by_institution ON vps(institution_id, seq);

CREATE TABLE audit (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms          INTEGER NOT NULL,
    actor_user_id  TEXT NOT NULL,
    actor_username TEXT NOT NULL,
    institution_id TEXT NOT NULL DEFAULT '',
    action         TEXT NOT NULL,
    target         TEXT NOT NULL,
    result         TEXT NOT NULL
) STRICT;
CREATE INDEX audit_by_institution ON audit(institution_id, id);
CREATE INDEX audit_by_action ON audit(action, id);
