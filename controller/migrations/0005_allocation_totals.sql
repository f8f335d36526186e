-- Running totals of what each host holds and each institution uses, kept by
-- triggers in the same transaction as every change to a VPS. Placement and
-- quota checks then read one row instead of summing every VPS, and the totals
-- stay right whichever statement (or whichever controller process) changed
-- the VPS.
CREATE TABLE host_allocation (
    host_id    TEXT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
    vcpus      INTEGER NOT NULL DEFAULT 0,
    memory_mib INTEGER NOT NULL DEFAULT 0,
    disk_gib   INTEGER NOT NULL DEFAULT 0,
    vps_count  INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE institution_usage (
    institution_id TEXT PRIMARY KEY REFERENCES institutions(id) ON DELETE CASCADE,
    vcpus          INTEGER NOT NULL DEFAULT 0,
    memory_mib     INTEGER NOT NULL DEFAULT 0,
    disk_gib       INTEGER NOT NULL DEFAULT 0,
    vps_count      INTEGER NOT NULL DEFAULT 0
) STRICT;

INSERT INTO host_allocation (host_id, vcpus, memory_mib, disk_gib, vps_count)
SELECT h.id,
       COALESCE(SUM(v.vcpus), 0), COALESCE(SUM(v.memory_mib), 0),
       COALESCE(SUM(v.disk_gib), 0), COUNT(v.id)
FROM hosts h LEFT JOIN vps v ON v.host_id = h.id AND v.state <> 'DELETED'
GROUP BY h.id;

INSERT INTO institution_usage (institution_id, vcpus, memory_mib, disk_gib, vps_count)
SELECT i.id,
       COALESCE(SUM(v.vcpus), 0), COALESCE(SUM(v.memory_mib), 0),
       COALESCE(SUM(v.disk_gib), 0), COUNT(v.id)
FROM institutions i LEFT JOIN vps v ON v.institution_id = i.id
    AND v.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR')
GROUP BY i.id;

CREATE TRIGGER host_allocation_row AFTER INSERT ON hosts BEGIN
    INSERT OR IGNORE INTO host_allocation (host_id) VALUES (NEW.id);
END;

CREATE TRIGGER institution_usage_row AFTER INSERT ON institutions BEGIN
    INSERT OR IGNORE INTO institution_usage (institution_id) VALUES (NEW.id);
END;

-- A VPS holds its host's capacity while it is placed and not DELETED, and its
-- institution's quota in the states listed in store/identity.rs (QUOTA_STATES).
CREATE TRIGGER vps_totals_insert AFTER INSERT ON vps BEGIN
    UPDATE host_allocation
       SET vcpus = vcpus + NEW.vcpus, memory_mib = memory_mib + NEW.memory_mib,
           disk_gib = disk_gib + NEW.disk_gib, vps_count = vps_count + 1
     WHERE host_id = NEW.host_id AND NEW.state <> 'DELETED';
    UPDATE institution_usage
       SET vcpus = vcpus + NEW.vcpus, memory_mib = memory_mib + NEW.memory_mib,
           disk_gib = disk_gib + NEW.disk_gib, vps_count = vps_count + 1
     WHERE institution_id = NEW.institution_id
       AND NEW.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR');
END;

CREATE TRIGGER vps_totals_update AFTER UPDATE OF host_id, state, vcpus, memory_mib, disk_gib,
    institution_id ON vps
WHEN OLD.host_id IS NOT NEW.host_id OR OLD.vcpus <> NEW.vcpus
    OR OLD.memory_mib <> NEW.memory_mib OR OLD.disk_gib <> NEW.disk_gib
    OR OLD.institution_id IS NOT NEW.institution_id
    OR (OLD.state = 'DELETED') <> (NEW.state = 'DELETED')
    OR (OLD.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR'))
       <> (NEW.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR'))
BEGIN
    UPDATE host_allocation
       SET vcpus = vcpus - OLD.vcpus, memory_mib = memory_mib - OLD.memory_mib,
           disk_gib = disk_gib - OLD.disk_gib, vps_count = vps_count - 1
     WHERE host_id = OLD.host_id AND OLD.state <> 'DELETED';
    UPDATE host_allocation
       SET vcpus = vcpus + NEW.vcpus, memory_mib = memory_mib + NEW.memory_mib,
           disk_gib = disk_gib + NEW.disk_gib, vps_count = vps_count + 1
     WHERE host_id = NEW.host_id AND NEW.state <> 'DELETED';
    UPDATE institution_usage
       SET vcpus = vcpus - OLD.vcpus, memory_mib = memory_mib - OLD.memory_mib,
           disk_gib = disk_gib - OLD.disk_gib, vps_count = vps_count - 1
     WHERE institution_id = OLD.institution_id
       AND OLD.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR');
    UPDATE institution_usage
       SET vcpus = vcpus + NEW.vcpus, memory_mib = memory_mib + NEW.memory_mib,
           disk_gib = disk_gib + NEW.disk_gib, vps_count = vps_count + 1
     WHERE institution_id = NEW.institution_id
       AND NEW.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR');
END;

CREATE TRIGGER vps_totals_delete AFTER DELETE ON vps BEGIN
    UPDATE host_allocation
       SET vcpus = vcpus - OLD.vcpus, memory_mib = memory_mib - OLD.memory_mib,
           disk_gib = disk_gib - OLD.disk_gib, vps_count = vps_count - 1
     WHERE host_id = OLD.host_id AND OLD.state <> 'DELETED';
    UPDATE institution_usage
       SET vcpus = vcpus - OLD.vcpus, memory_mib = memory_mib - OLD.memory_mib,
           disk_gib = disk_gib - OLD.disk_gib, vps_count = vps_count - 1
     WHERE institution_id = OLD.institution_id
       AND OLD.state IN ('SCHEDULED', 'PROVISIONING', 'RUNNING', 'STOPPED', 'DELETING', 'ERROR');
END;

-- What the reconciler must look at: only the VPS that differ from what they
-- should be. The WHERE clause is repeated word for word in store/vps.rs
-- (work_items) so that SQLite uses this index instead of scanning every VPS.
CREATE INDEX vps_work ON vps(next_attempt_ms, seq) WHERE (
             state IN ('SCHEDULED', 'PROVISIONING', 'DELETING')
             OR (state IN ('RUNNING', 'STOPPED') AND (
                    applied_generation < generation
                    OR observed_power = 'absent'
                    OR (desired_power = 'stopped' AND observed_power = 'running')))
             OR (state = 'ERROR' AND cleanup_pending = 1));

-- Whether an image is in the catalogue, asked on every request.
CREATE INDEX host_images_by_name ON host_images(name);
