-- When a host was last seen going silent, so that DOWN and back are each
-- recorded once in the audit trail.
ALTER TABLE hosts ADD COLUMN down_since_ms INTEGER NOT NULL DEFAULT 0;
