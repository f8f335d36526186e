-- The portal: a password per user (argon2id, as a PHC string; empty: none
-- set yet), set through a one-time invitation. A portal sign-in is a token
-- of kind 'portal', so every page is served through the same callers,
-- permissions and limits as the gRPC API.
ALTER TABLE users ADD COLUMN password_phc TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'api' CHECK (kind IN ('api', 'portal'));

CREATE TABLE invitations (
    -- SHA-256 of the secret in the link, hex; the secret is never stored.
    secret_sha256 TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users(id),
    created_by    TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms    INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX invitations_by_user ON invitations (user_id);
