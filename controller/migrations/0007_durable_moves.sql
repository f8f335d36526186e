-- Images are known by content: each host's catalogue entry carries the
-- SHA-256 of its file, and each VPS the digest it was built on.
ALTER TABLE host_images ADD COLUMN digest TEXT NOT NULL DEFAULT '';
-- The least memory a guest of the image boots with, from the catalogue.
ALTER TABLE host_images ADD COLUMN min_memory_mib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vps ADD COLUMN image_digest TEXT NOT NULL DEFAULT '';

-- While a VPS is MIGRATING it holds capacity on the host it moves to as well
-- as on its own; the totals' triggers count both (store/totals.rs writes them
-- from the lifecycle when the store opens, so they are dropped here).
ALTER TABLE vps ADD COLUMN move_target TEXT;
DROP TRIGGER IF EXISTS vps_totals_insert;
DROP TRIGGER IF EXISTS vps_totals_update;
DROP TRIGGER IF EXISTS vps_totals_delete;

-- The build clock starts when the VPS is placed, and is pushed back by the
-- time its host was down, so that waiting for a host is not a failed build.
ALTER TABLE vps ADD COLUMN build_since_ms INTEGER NOT NULL DEFAULT 0;
UPDATE vps SET build_since_ms = updated_at_ms WHERE state IN ('SCHEDULED', 'PROVISIONING');

-- A move in progress, one per VPS, as persisted steps the controller drives
-- and resumes after a restart:
--   copy    the disk goes from source to target (the target's copy is the
--           step's own and may be removed to undo it);
--   cleanup the VPS now lives on the target; its old files on the source are
--           to be removed;
--   undo    the move failed and the VPS stayed on its source; whatever the
--           copy left on the target is to be removed.
CREATE TABLE moves (
    vps_id      TEXT PRIMARY KEY REFERENCES vps(id),
    source      TEXT NOT NULL,
    target      TEXT NOT NULL,
    restart     INTEGER NOT NULL DEFAULT 0,
    step        TEXT NOT NULL CHECK (step IN ('copy', 'cleanup', 'undo')),
    started_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try_ms INTEGER NOT NULL DEFAULT 0,
    reason      TEXT NOT NULL DEFAULT ''
) STRICT;

-- CPU time a VPS used in each minute and hour, from the difference of its
-- CPU-time counter (not from averaged rates, which overstate a VPS that ran
-- part of the hour); the usage report sums these.
ALTER TABLE usage_points ADD COLUMN cpu_ns INTEGER NOT NULL DEFAULT 0;

-- Users and institutions are disabled, never deleted: their records stay.
ALTER TABLE users ADD COLUMN disabled_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE institutions ADD COLUMN disabled_at_ms INTEGER NOT NULL DEFAULT 0;

-- What each host holds that no live VPS owns (domains and VM directories),
-- as its agent last reported: shown to operators, never removed by Betang.
CREATE TABLE host_orphans (
    host_id   TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    vps_id    TEXT NOT NULL,
    what      TEXT NOT NULL,
    seen_ms   INTEGER NOT NULL,
    PRIMARY KEY (host_id, vps_id)
) STRICT;
