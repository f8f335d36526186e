//! Networks operators define and grant to institutions, and the addresses
//! VPS hold on them. An address is chosen in the transaction that places
//! the VPS, so two VPS never share one; it is let go only once the VPS is
//! gone from its host.

use std::net::Ipv4Addr;

use betang_proto::v1::{Network, NetworkAttachment, NetworkGrant};
use ipnet::Ipv4Net;
use rusqlite::{Connection, OptionalExtension, Row, params};
use sha2::{Digest, Sha256};

use super::identity::audit;
use crate::{
    auth::{Caller, Scope},
    error::{ApiError, StoreError},
    ids::VpsId,
};

/// Network names: what `betangctl` and the VPS show.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name",
            format!("{name:?} must be 1-32 of a-z, 0-9 and '-', not starting with '-'"),
        ))
    }
}

/// A bridge or libvirt network name, as it goes into the domain XML.
fn check_source(source: &str) -> Result<(), ApiError> {
    let ok = !source.is_empty()
        && source.len() <= 15
        && source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && source != "."
        && source != "..";
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "attach_source",
            format!("{source:?} must be an interface name: 1-15 of a-z, A-Z, 0-9, '-', '_', '.'"),
        ))
    }
}

fn parse_ip(field: &'static str, s: &str) -> Result<Ipv4Addr, ApiError> {
    s.trim()
        .parse()
        .map_err(|_| ApiError::invalid(field, format!("{s:?} is not an IPv4 address")))
}

/// `first-last` ranges (or single addresses), comma-separated.
fn parse_ranges(net: &Ipv4Net, s: &str) -> Result<Vec<(u32, u32)>, ApiError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b) = (parse_ip("reserved", a)?, parse_ip("reserved", b)?);
        if !net.contains(&a) || !net.contains(&b) || u32::from(a) > u32::from(b) {
            return Err(ApiError::invalid(
                "reserved",
                format!("{part:?} must be a range inside {net}, first address first"),
            ));
        }
        out.push((u32::from(a), u32::from(b)));
    }
    Ok(out)
}

/// Checks what an operator asks for and answers the row's values.
struct Checked {
    net: Ipv4Net,
    gateway: u32,
    dns: String,
    reserved: String,
}

fn check(n: &Network) -> Result<Checked, ApiError> {
    check_name(&n.name)?;
    if !matches!(n.attach_kind.as_str(), "bridge" | "network") {
        return Err(ApiError::invalid(
            "attach_kind",
            format!("{:?} must be bridge or network", n.attach_kind),
        ));
    }
    check_source(&n.attach_source)?;
    if n.zone.len() > 63 {
        return Err(ApiError::invalid("zone", "must be at most 63 characters"));
    }
    let net: Ipv4Net = n.cidr.trim().parse().map_err(|_| {
        ApiError::invalid(
            "cidr",
            format!("{:?} is not an IPv4 network such as 198.18.0.0/24", n.cidr),
        )
    })?;
    if net.network() != net.addr() {
        return Err(ApiError::invalid(
            "cidr",
            format!(
                "{} has host bits set; the network is {}",
                n.cidr,
                net.trunc()
            ),
        ));
    }
    if !(8..=30).contains(&net.prefix_len()) {
        return Err(ApiError::invalid(
            "cidr",
            format!("/{} must be between /8 and /30", net.prefix_len()),
        ));
    }
    let gateway = if n.gateway.is_empty() {
        0
    } else {
        let g = parse_ip("gateway", &n.gateway)?;
        if !usable(&net, g) {
            return Err(ApiError::invalid(
                "gateway",
                format!("{g} is not a host address of {net}"),
            ));
        }
        u32::from(g)
    };
    let dns: Vec<Ipv4Addr> = n
        .dns
        .iter()
        .map(|d| parse_ip("dns", d))
        .collect::<Result<_, _>>()?;
    if dns.len() > 3 {
        return Err(ApiError::invalid("dns", "at most 3 servers"));
    }
    if n.vlan > 4094 {
        return Err(ApiError::invalid(
            "vlan",
            format!("{} must be 0 (none) to 4094", n.vlan),
        ));
    }
    let reserved = parse_ranges(&net, &n.reserved)?;
    Ok(Checked {
        net,
        gateway,
        dns: dns
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(","),
        reserved: reserved
            .iter()
            .map(|(a, b)| format!("{}-{}", Ipv4Addr::from(*a), Ipv4Addr::from(*b)))
            .collect::<Vec<_>>()
            .join(","),
    })
}

/// A host address of `net`: neither its network nor its broadcast address.
fn usable(net: &Ipv4Net, ip: Ipv4Addr) -> bool {
    net.contains(&ip) && ip != net.network() && ip != net.broadcast()
}

/// A stored gateway (0: none) as the API shows it.
fn gateway_text(gateway: u32) -> String {
    if gateway == 0 {
        String::new()
    } else {
        Ipv4Addr::from(gateway).to_string()
    }
}

/// Stored name servers (comma-separated) as a list.
fn dns_list(dns: &str) -> Vec<String> {
    dns.split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

const COLS: &str = "name, zone, attach_kind, attach_source, base, prefix_len, gateway, dns, reserved, vlan, created_at_ms";

fn row(r: &Row<'_>) -> rusqlite::Result<Network> {
    let base: u32 = r.get(4)?;
    let prefix: u8 = r.get(5)?;
    let gateway: u32 = r.get(6)?;
    let dns: String = r.get(7)?;
    Ok(Network {
        name: r.get(0)?,
        zone: r.get(1)?,
        attach_kind: r.get(2)?,
        attach_source: r.get(3)?,
        cidr: format!("{}/{prefix}", Ipv4Addr::from(base)),
        gateway: gateway_text(gateway),
        dns: dns_list(&dns),
        reserved: r.get(8)?,
        vlan: r.get(9)?,
        created_at_ms: r.get(10)?,
        addresses_total: 0,
        addresses_used: 0,
        grants: Vec::new(),
    })
}

/// The network with its grants and how full it is.
fn filled(c: &Connection, mut n: Network) -> Result<Network, ApiError> {
    let net: Ipv4Net = n.cidr.parse().map_err(|_| {
        ApiError::Store(StoreError::Corrupt(format!(
            "network {}: cidr {}",
            n.name, n.cidr
        )))
    })?;
    n.addresses_total = free_space(c, &n.name, &net, parse_gateway(&n), &n.reserved)?.0;
    n.addresses_used = c
        .prepare_cached("SELECT COUNT(*) FROM addresses WHERE network_name = ?1")?
        .query_row([&n.name], |r| r.get(0))?;
    n.grants = c
        .prepare_cached(
            "SELECT g.institution_id, i.code, g.is_default FROM network_grants g
             JOIN institutions i ON i.id = g.institution_id
             WHERE g.network_name = ?1 ORDER BY i.code",
        )?
        .query_map([&n.name], |r| {
            Ok(NetworkGrant {
                institution_id: r.get(0)?,
                institution_code: r.get(1)?,
                is_default: r.get::<_, i64>(2)? != 0,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(n)
}

fn parse_gateway(n: &Network) -> u32 {
    n.gateway.parse::<Ipv4Addr>().map_or(0, u32::from)
}

/// How many addresses the network can hand out in all, given its gateway
/// and reserved ranges.
fn free_space(
    _c: &Connection,
    _name: &str,
    net: &Ipv4Net,
    gateway: u32,
    reserved: &str,
) -> Result<(u32, Vec<(u32, u32)>), ApiError> {
    let ranges = parse_ranges(net, reserved)?;
    let (first, last) = (u32::from(net.network()) + 1, u32::from(net.broadcast()) - 1);
    let total = (first..=last)
        .filter(|ip| *ip != gateway && !ranges.iter().any(|(a, b)| (a..=b).contains(&ip)))
        .count() as u32;
    Ok((total, ranges))
}

pub fn create(
    c: &mut Connection,
    actor: &Caller,
    n: &Network,
    now_ms: i64,
) -> Result<Network, ApiError> {
    let checked = check(n)?;
    let tx = c.savepoint()?;
    let exists: bool = tx
        .prepare_cached("SELECT 1 FROM networks WHERE name = ?1")?
        .query_row([&n.name], |_| Ok(()))
        .optional()?
        .is_some();
    if exists {
        return Err(ApiError::AlreadyExists(format!("network {}", n.name)));
    }
    tx.prepare_cached(
        "INSERT INTO networks (name, zone, attach_kind, attach_source, base, prefix_len, gateway,
                               dns, reserved, vlan, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        n.name,
        n.zone,
        n.attach_kind,
        n.attach_source,
        u32::from(checked.net.network()),
        checked.net.prefix_len(),
        checked.gateway,
        checked.dns,
        checked.reserved,
        n.vlan,
        now_ms
    ])?;
    audit(
        &tx,
        actor,
        "",
        "network.create",
        &n.name,
        &format!("{} on {} {}", checked.net, n.attach_kind, n.attach_source),
        now_ms,
    )?;
    let out = get_any(&tx, &n.name)?;
    tx.commit()?;
    Ok(out)
}

fn get_any(c: &Connection, name: &str) -> Result<Network, ApiError> {
    let n = c
        .prepare_cached(&format!("SELECT {COLS} FROM networks WHERE name = ?1"))?
        .query_row([name], row)
        .optional()?
        .ok_or_else(|| ApiError::NotFound {
            what: "network",
            id: name.to_owned(),
        })?;
    filled(c, n)
}

/// Whether `institution` may use the network.
fn granted(c: &Connection, name: &str, institution: &str) -> Result<bool, ApiError> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM network_grants WHERE network_name = ?1 AND institution_id = ?2",
    )?
    .query_row([name, institution], |_| Ok(()))
    .optional()?
    .is_some())
}

/// A network as `scope` may see it: staff see every one; a member only those
/// granted to their institution (others are `NotFound`), without the list of
/// other institutions' grants.
pub fn get(c: &Connection, name: &str, scope: &Scope) -> Result<Network, ApiError> {
    let n = get_any(c, name)?;
    match scope {
        Scope::All => Ok(n),
        Scope::Institution(mine) if granted(c, name, mine)? => Ok(for_member(n, mine)),
        Scope::Institution(_) => Err(ApiError::NotFound {
            what: "network",
            id: name.to_owned(),
        }),
    }
}

fn for_member(mut n: Network, mine: &str) -> Network {
    n.grants.retain(|g| g.institution_id == mine);
    n
}

pub fn list(c: &Connection, scope: &Scope) -> Result<Vec<Network>, ApiError> {
    let names: Vec<String> = c
        .prepare_cached("SELECT name FROM networks ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for name in names {
        match get(c, &name, scope) {
            Ok(n) => out.push(n),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Lets an institution use a network; `default` makes it the one its VPS
/// get when they name none (replacing an earlier default).
pub fn grant(
    c: &mut Connection,
    actor: &Caller,
    name: &str,
    institution: &str,
    default: bool,
    now_ms: i64,
) -> Result<Network, ApiError> {
    let tx = c.savepoint()?;
    get_any(&tx, name)?;
    let inst = super::identity::get_institution(&tx, institution)?;
    if default {
        tx.prepare_cached("UPDATE network_grants SET is_default = 0 WHERE institution_id = ?1")?
            .execute([&inst.id])?;
    }
    tx.prepare_cached(
        "INSERT INTO network_grants (network_name, institution_id, is_default) VALUES (?1, ?2, ?3)
         ON CONFLICT (network_name, institution_id) DO UPDATE SET is_default = excluded.is_default",
    )?
    .execute(params![name, inst.id, default])?;
    audit(
        &tx,
        actor,
        &inst.id,
        "network.grant",
        name,
        &format!(
            "to {}{}",
            inst.code,
            if default { " (default)" } else { "" }
        ),
        now_ms,
    )?;
    let out = get_any(&tx, name)?;
    tx.commit()?;
    Ok(out)
}

/// Takes a network back from an institution. Its VPS keep their addresses;
/// new ones can no longer ask for it.
pub fn revoke(
    c: &mut Connection,
    actor: &Caller,
    name: &str,
    institution: &str,
    now_ms: i64,
) -> Result<Network, ApiError> {
    let tx = c.savepoint()?;
    get_any(&tx, name)?;
    let inst = super::identity::get_institution(&tx, institution)?;
    let n = tx
        .prepare_cached(
            "DELETE FROM network_grants WHERE network_name = ?1 AND institution_id = ?2",
        )?
        .execute([name, inst.id.as_str()])?;
    if n == 0 {
        return Err(ApiError::invalid(
            "institution",
            format!("network {name} is not granted to {}", inst.code),
        ));
    }
    audit(
        &tx,
        actor,
        &inst.id,
        "network.revoke",
        name,
        &format!("from {}", inst.code),
        now_ms,
    )?;
    let out = get_any(&tx, name)?;
    tx.commit()?;
    Ok(out)
}

/// The network a new VPS of `institution` goes on: the one it asks for
/// (granted to the institution), or the institution's default. `None` when
/// it asks for none and has no default: the VPS then gets what the host's
/// agent attaches by its own configuration, and no address from Betang.
pub(in crate::store) fn choose(
    c: &Connection,
    institution: &str,
    asked: &str,
) -> Result<Option<Network>, ApiError> {
    if asked.is_empty() {
        let default: Option<String> = c
            .prepare_cached(
                "SELECT network_name FROM network_grants WHERE institution_id = ?1 AND is_default = 1",
            )?
            .query_row([institution], |r| r.get(0))
            .optional()?;
        return default.map(|n| get_any(c, &n)).transpose();
    }
    check_name(asked)
        .map_err(|_| ApiError::invalid("network", format!("{asked:?} is not a network name")))?;
    if !granted(c, asked, institution)? {
        return Err(ApiError::invalid(
            "network",
            format!(
                "network {asked} is not granted to this institution; see `betangctl network list`"
            ),
        ));
    }
    get_any(c, asked).map(Some)
}

/// The network a VPS holds an address on, if any.
pub(in crate::store) fn of_vps(c: &Connection, vps: &VpsId) -> Result<Option<Network>, ApiError> {
    attachment(c, vps)?
        .map(|a| get_any(c, &a.network))
        .transpose()
}

/// The placement a VPS on `network` asks for: the network's zone, when it
/// has one (hosts elsewhere do not attach it).
pub(in crate::store) fn steer(
    wish: &betang_proto::v1::PlacementRequest,
    network: Option<&Network>,
) -> Result<betang_proto::v1::PlacementRequest, ApiError> {
    let mut w = wish.clone();
    if let Some(n) = network.filter(|n| !n.zone.is_empty()) {
        if !w.zone.is_empty() && w.zone != n.zone {
            return Err(ApiError::invalid(
                "placement.zone",
                format!(
                    "network {} is attached in zone {}, not in {}",
                    n.name, n.zone, w.zone
                ),
            ));
        }
        w.zone = n.zone.clone();
    }
    Ok(w)
}

/// A MAC for the VPS: QEMU's prefix and three bytes of a hash of its id
/// (and a counter, should two VPS' hashes meet).
fn mac_for(vps: &VpsId, attempt: u32) -> String {
    let h = Sha256::digest(format!("{vps}/{attempt}").as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// Holds an address on `network` for the VPS, inside the caller's
/// transaction: `wanted` if it is free (an operator's choice), else the
/// lowest free one. Answers what the agent needs to attach it.
pub(in crate::store) fn allocate(
    c: &Connection,
    network: &Network,
    vps: &VpsId,
    wanted: &str,
    now_ms: i64,
) -> Result<NetworkAttachment, ApiError> {
    if let Some(a) = attachment(c, vps)? {
        return Ok(a);
    }
    let net: Ipv4Net = network.cidr.parse().map_err(|_| {
        ApiError::Store(StoreError::Corrupt(format!(
            "network {}: cidr {}",
            network.name, network.cidr
        )))
    })?;
    let gateway = parse_gateway(network);
    let reserved = parse_ranges(&net, &network.reserved)?;
    let held: std::collections::HashSet<u32> = c
        .prepare_cached("SELECT ip FROM addresses WHERE network_name = ?1")?
        .query_map([&network.name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let free = |ip: u32| {
        ip != gateway
            && usable(&net, Ipv4Addr::from(ip))
            && !reserved.iter().any(|(a, b)| (*a..=*b).contains(&ip))
            && !held.contains(&ip)
    };
    let ip = if wanted.is_empty() {
        let (first, last) = (u32::from(net.network()) + 1, u32::from(net.broadcast()) - 1);
        let Some(ip) = (first..=last).find(|ip| free(*ip)) else {
            // Counted only for the message: a large network's count walks it all.
            let (total, _) = free_space(c, &network.name, &net, gateway, &network.reserved)?;
            return Err(ApiError::NoAddress(format!(
                "network {} ({net}) is full: all {total} of its addresses are held",
                network.name
            )));
        };
        ip
    } else {
        let ip = parse_ip("ip_address", wanted)?;
        if !free(u32::from(ip)) {
            return Err(ApiError::invalid(
                "ip_address",
                format!(
                    "{ip} is not a free address of network {} ({net})",
                    network.name
                ),
            ));
        }
        u32::from(ip)
    };
    let mut attempt = 0;
    loop {
        let mac = mac_for(vps, attempt);
        let inserted = c
            .prepare_cached(
                "INSERT INTO addresses (network_name, ip, vps_id, mac, allocated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (mac) DO NOTHING",
            )?
            .execute(params![network.name, ip, vps.to_string(), mac, now_ms])?;
        if inserted == 1 {
            break;
        }
        attempt += 1;
    }
    attachment(c, vps)?.ok_or_else(|| {
        ApiError::Store(StoreError::Corrupt(format!(
            "address of {vps} not recorded"
        )))
    })
}

/// What the VPS's agent attaches: its address, MAC and the network's
/// settings; `None` for a VPS without a Betang network.
pub fn attachment(c: &Connection, vps: &VpsId) -> Result<Option<NetworkAttachment>, ApiError> {
    let found = c
        .prepare_cached(
            "SELECT a.network_name, a.ip, a.mac, n.attach_kind, n.attach_source, n.prefix_len,
                    n.gateway, n.dns, n.vlan
             FROM addresses a JOIN networks n ON n.name = a.network_name WHERE a.vps_id = ?1",
        )?
        .query_row([vps.to_string()], |r| {
            let gateway: u32 = r.get(6)?;
            let dns: String = r.get(7)?;
            Ok(NetworkAttachment {
                network: r.get(0)?,
                ip_address: Ipv4Addr::from(r.get::<_, u32>(1)?).to_string(),
                mac_address: r.get(2)?,
                attach_kind: r.get(3)?,
                attach_source: r.get(4)?,
                prefix_len: r.get(5)?,
                gateway: gateway_text(gateway),
                dns: dns_list(&dns),
                vlan: r.get(8)?,
            })
        })
        .optional()?;
    Ok(found)
}

/// Lets the VPS's address go: called once the VPS is gone from its host.
pub(in crate::store) fn release(c: &Connection, vps: &VpsId) -> Result<(), ApiError> {
    c.prepare_cached("DELETE FROM addresses WHERE vps_id = ?1")?
        .execute([vps.to_string()])?;
    Ok(())
}
