-- Placement: zones, labels and weights of hosts, cordoning, and the
-- placement wishes of each VPS.
ALTER TABLE hosts ADD COLUMN zone TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE hosts ADD COLUMN weight REAL NOT NULL DEFAULT 1.0;
ALTER TABLE hosts ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vps ADD COLUMN zone TEXT NOT NULL DEFAULT '';
ALTER TABLE vps ADD COLUMN host_labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE vps ADD COLUMN anti_affinity_group TEXT NOT NULL DEFAULT '';
CREATE INDEX vps_groups ON vps(anti_affinity_group) WHERE anti_affinity_group <> '';
