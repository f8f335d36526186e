-- Hosts registered by their agents. Capacity is what the agent offers;
-- allocation is derived from the VPS placed on the host.
CREATE TABLE hosts (
    id                TEXT PRIMARY KEY,
    hostname          TEXT NOT NULL,
    agent_endpoint    TEXT NOT NULL,
    domain_type       TEXT NOT NULL DEFAULT '',
    vcpus             INTEGER NOT NULL,
    memory_mib        INTEGER NOT NULL,
    disk_gib          INTEGER NOT NULL,
    registered_at_ms  INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    cpu_percent       REAL NOT NULL DEFAULT 0,
    mem_used_bytes    INTEGER NOT NULL DEFAULT 0,
    mem_total_bytes   INTEGER NOT NULL DEFAULT 0,
    disk_used_bytes   INTEGER NOT NULL DEFAULT 0,
    disk_total_bytes  INTEGER NOT NULL DEFAULT 0,
    load_1m           REAL NOT NULL DEFAULT 0,
    load_5m           REAL NOT NULL DEFAULT 0,
    load_15m          REAL NOT NULL DEFAULT 0,
    usage_at_ms       INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE host_images (
    host_id      TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    description  TEXT NOT NULL,
    os           TEXT NOT NULL,
    min_disk_gib INTEGER NOT NULL,
    size_bytes   INTEGER NOT NULL,
    PRIMARY KEY (host_id, name)
) STRICT;

CREATE TABLE vps (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT NOT NULL UNIQUE,
    request_id         TEXT NOT NULL UNIQUE,
    name               TEXT NOT NULL,
    vcpus              INTEGER NOT NULL,
    memory_mib         INTEGER NOT NULL,
    disk_gib           INTEGER NOT NULL,
    image              TEXT NOT NULL,
    ssh_public_key     TEXT NOT NULL,
    user_data          TEXT NOT NULL,
    state              TEXT NOT NULL,
    state_reason       TEXT NOT NULL DEFAULT '',
    desired_power      TEXT NOT NULL,
    host_id            TEXT REFERENCES hosts(id),
    -- Bumped on every change of what the VPS should be; agents echo the
    -- generation they applied, and older reports are ignored.
    generation         INTEGER NOT NULL DEFAULT 1,
    applied_generation INTEGER NOT NULL DEFAULT 0,
    observed_power     TEXT NOT NULL DEFAULT 'unknown',
    stop_timeout_s     INTEGER NOT NULL DEFAULT 0,
    force_stop         INTEGER NOT NULL DEFAULT 0,
    -- The agent may still hold a VM for a VPS that failed; cleared after DeleteVm.
    cleanup_pending    INTEGER NOT NULL DEFAULT 0,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms    INTEGER NOT NULL DEFAULT 0,
    created_at_ms      INTEGER NOT NULL,
    updated_at_ms      INTEGER NOT NULL,
    cpu_rate           REAL NOT NULL DEFAULT 0,
    cpu_time_ns        INTEGER NOT NULL DEFAULT 0,
    mem_max_bytes      INTEGER NOT NULL DEFAULT 0,
    mem_used_bytes     INTEGER NOT NULL DEFAULT 0,
    mem_rss_bytes      INTEGER NOT NULL DEFAULT 0,
    disk_read_bytes    INTEGER NOT NULL DEFAULT 0,
    disk_write_bytes   INTEGER NOT NULL DEFAULT 0,
    net_rx_bytes       INTEGER NOT NULL DEFAULT 0,
    net_tx_bytes       INTEGER NOT NULL DEFAULT 0,
    usage_at_ms        INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE INDEX vps_by_host ON vps(host_id) WHERE state <> 'DELETED';
CREATE INDEX vps_live ON vps(state) WHERE state <> 'DELETED';
