-- A host whose agent reports but whose hypervisor does not answer is
-- DEGRADED (not DOWN): what the agent said, and since when (0: it is not).
ALTER TABLE hosts ADD COLUMN hypervisor_problem TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN degraded_since_ms INTEGER NOT NULL DEFAULT 0;
-- Since when the VPS's guest has not answered its host (0: it answers).
ALTER TABLE vps ADD COLUMN unresponsive_since_ms INTEGER NOT NULL DEFAULT 0;
