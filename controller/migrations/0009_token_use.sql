-- When and from where each token was last used (written at most once a
-- minute per token, and when the address changes).
ALTER TABLE tokens ADD COLUMN last_used_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN last_used_from TEXT NOT NULL DEFAULT '';
