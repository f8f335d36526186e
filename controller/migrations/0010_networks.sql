-- Networks operators define and grant to institutions, and the addresses
-- VPS hold on them.
CREATE TABLE networks (
    name          TEXT PRIMARY KEY,
    -- Hosts of this zone attach it; '' for every host.
    zone          TEXT NOT NULL DEFAULT '',
    -- 'bridge' (a Linux bridge on each host) or 'network' (a libvirt network).
    attach_kind   TEXT NOT NULL CHECK (attach_kind IN ('bridge', 'network')),
    attach_source TEXT NOT NULL,
    -- IPv4, as unsigned 32-bit numbers.
    base          INTEGER NOT NULL,
    prefix_len    INTEGER NOT NULL CHECK (prefix_len BETWEEN 8 AND 30),
    gateway       INTEGER NOT NULL DEFAULT 0,
    dns           TEXT NOT NULL DEFAULT '',
    -- 'first-last' ranges kept out of allocation, comma-separated.
    reserved      TEXT NOT NULL DEFAULT '',
    vlan          INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE network_grants (
    network_name   TEXT NOT NULL REFERENCES networks(name),
    institution_id TEXT NOT NULL REFERENCES institutions(id),
    -- The network a VPS of this institution gets when it names none.
    is_default     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network_name, institution_id)
) STRICT;
CREATE UNIQUE INDEX one_default_network ON network_grants(institution_id) WHERE is_default = 1;

-- One row per address held. A VPS's row goes only when the VPS is gone from
-- its host (cleaned up), so an address is never handed out while anything
-- still refers to its last holder.
CREATE TABLE addresses (
    network_name   TEXT NOT NULL REFERENCES networks(name),
    ip             INTEGER NOT NULL,
    vps_id         TEXT NOT NULL UNIQUE REFERENCES vps(id),
    mac            TEXT NOT NULL UNIQUE,
    allocated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (network_name, ip)
) STRICT;

-- The network a VPS asked for (or was given as its institution's default).
ALTER TABLE vps ADD COLUMN network TEXT NOT NULL DEFAULT '';
