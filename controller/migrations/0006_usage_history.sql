-- Usage history for people: what each VPS used, as reported by its agent,
-- in 1-minute points (kept a day) and hourly points (kept 90 days). Counters
-- are the last cumulative values of the bucket; rates come from consecutive
-- points when read.
CREATE TABLE usage_points (
    vps_id           TEXT NOT NULL,
    step_s           INTEGER NOT NULL CHECK (step_s IN (60, 3600)),
    at_ms            INTEGER NOT NULL,
    samples          INTEGER NOT NULL,
    cpu_rate_sum     REAL NOT NULL,
    mem_used_max     INTEGER NOT NULL,
    mem_rss_max      INTEGER NOT NULL,
    last_at_ms       INTEGER NOT NULL,
    disk_read_bytes  INTEGER NOT NULL,
    disk_write_bytes INTEGER NOT NULL,
    net_rx_bytes     INTEGER NOT NULL,
    net_tx_bytes     INTEGER NOT NULL,
    PRIMARY KEY (vps_id, step_s, at_ms)
) STRICT, WITHOUT ROWID;

CREATE INDEX usage_points_by_age ON usage_points (step_s, at_ms);

-- The periods during which a VPS held its institution's quota, with its size
-- then. The usage report's vCPU-hours and GiB-hours are these spans clipped
-- to the period asked for. Kept by triggers, like the allocation totals, so
-- every path that changes a VPS is counted.
CREATE TABLE allocation_spans (
    vps_id         TEXT NOT NULL,
    institution_id TEXT NOT NULL,
    vcpus          INTEGER NOT NULL,
    memory_mib     INTEGER NOT NULL,
    disk_gib       INTEGER NOT NULL,
    from_ms        INTEGER NOT NULL,
    -- NULL while the span is open.
    to_ms          INTEGER
) STRICT;

CREATE INDEX allocation_spans_by_institution ON allocation_spans (institution_id, from_ms);
CREATE UNIQUE INDEX allocation_spans_open ON allocation_spans (vps_id) WHERE to_ms IS NULL;

INSERT INTO allocation_spans (vps_id, institution_id, vcpus, memory_mib, disk_gib, from_ms)
SELECT id, institution_id, vcpus, memory_mib, disk_gib, created_at_ms FROM vps
 WHERE state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'MIGRATING', 'DELETING', 'ERROR')
   AND institution_id IS NOT NULL;

CREATE TRIGGER allocation_span_insert AFTER INSERT ON vps
WHEN NEW.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'MIGRATING', 'DELETING', 'ERROR')
BEGIN
    INSERT INTO allocation_spans (vps_id, institution_id, vcpus, memory_mib, disk_gib, from_ms)
    VALUES (NEW.id, COALESCE(NEW.institution_id, ''), NEW.vcpus, NEW.memory_mib, NEW.disk_gib,
            CAST(unixepoch('subsec') * 1000 AS INTEGER));
END;

CREATE TRIGGER allocation_span_update AFTER UPDATE OF state, vcpus, memory_mib, disk_gib,
    institution_id ON vps
WHEN OLD.vcpus <> NEW.vcpus OR OLD.memory_mib <> NEW.memory_mib OR OLD.disk_gib <> NEW.disk_gib
    OR OLD.institution_id IS NOT NEW.institution_id
    OR (OLD.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'MIGRATING', 'DELETING', 'ERROR'))
       <> (NEW.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'MIGRATING', 'DELETING', 'ERROR'))
BEGIN
    UPDATE allocation_spans SET to_ms = CAST(unixepoch('subsec') * 1000 AS INTEGER)
     WHERE vps_id = OLD.id AND to_ms IS NULL;
    INSERT INTO allocation_spans (vps_id, institution_id, vcpus, memory_mib, disk_gib, from_ms)
    SELECT NEW.id, COALESCE(NEW.institution_id, ''), NEW.vcpus, NEW.memory_mib, NEW.disk_gib,
           CAST(unixepoch('subsec') * 1000 AS INTEGER)
     WHERE NEW.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'MIGRATING', 'DELETING', 'ERROR');
END;
