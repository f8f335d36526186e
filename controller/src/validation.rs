//! Checks on what people send, with messages that name the field and the rule.

use betang_proto::v1::VpsSpec;

use crate::error::ApiError;

pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
pub const MAX_DISK_GIB: u64 = 16 * 1024;
pub const MAX_USER_DATA: usize = 64 * 1024;
pub const MAX_SSH_KEY: usize = 16 * 1024;

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// The longest look back `GetVps` serves: the 90 days hourly points are kept.
pub const MAX_HISTORY_MINUTES: u32 = 90 * 24 * 60;
/// The longest period a usage report covers.
pub const MAX_REPORT_MS: i64 = 366 * 24 * 3_600_000;

pub fn history_minutes(m: u32) -> Result<u32, ApiError> {
    if m > MAX_HISTORY_MINUTES {
        return Err(ApiError::invalid(
            "history_minutes",
            format!("must be at most {MAX_HISTORY_MINUTES} (90 days), got {m}"),
        ));
    }
    Ok(m)
}

pub fn report_period(from_ms: i64, to_ms: i64) -> Result<(), ApiError> {
    if from_ms < 0 {
        return Err(ApiError::invalid(
            "from_ms",
            "must be a Unix time in milliseconds, not negative",
        ));
    }
    if to_ms <= from_ms {
        return Err(ApiError::invalid("to_ms", "must be after from_ms"));
    }
    if to_ms - from_ms > MAX_REPORT_MS {
        return Err(ApiError::invalid(
            "to_ms",
            "the period may be at most 366 days long",
        ));
    }
    Ok(())
}

pub fn request_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "request_id",
            "is required: 1 to 128 characters of A-Z, a-z, 0-9, '-', '_', '.', ':' (a UUID is a good choice)",
        ))
    }
}

pub fn name(n: &str) -> Result<(), ApiError> {
    let b = n.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name",
            format!(
                "{n:?} is not a valid server name: it becomes the hostname, so use 1 to 63 characters a-z, 0-9 and '-', not starting or ending with '-'"
            ),
        ))
    }
}

pub fn image(i: &str) -> Result<(), ApiError> {
    let ok = !i.is_empty()
        && i.len() <= 64
        && i.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && i.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !i.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "image",
            format!("{i:?} is not an image name: see `betangctl image list`"),
        ))
    }
}

pub fn ssh_public_key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() {
        return Ok(());
    }
    let bad = |rule: &str| Err(ApiError::invalid("ssh_public_key", rule));
    if k.len() > MAX_SSH_KEY {
        return bad("is longer than 16 KiB");
    }
    if k.contains(['\n', '\r', '\0']) {
        return bad("must be a single line (one key)");
    }
    let mut parts = k.split(' ');
    let kind = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&kind) {
        return bad(
            "must start with a key type such as ssh-ed25519 or ssh-rsa, as in ~/.ssh/id_ed25519.pub",
        );
    }
    if body.len() < 16
        || !body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
    {
        return bad("the key after the type must be base64, as in ~/.ssh/id_ed25519.pub");
    }
    Ok(())
}

pub fn spec(s: &VpsSpec) -> Result<(), ApiError> {
    name(&s.name)?;
    if s.vcpus == 0 || s.vcpus > MAX_VCPUS {
        return Err(ApiError::invalid(
            "vcpus",
            format!("must be between 1 and {MAX_VCPUS}, got {}", s.vcpus),
        ));
    }
    if s.memory_mib < MIN_MEMORY_MIB || s.memory_mib > MAX_MEMORY_MIB {
        return Err(ApiError::invalid(
            "memory_mib",
            format!(
                "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {}",
                s.memory_mib
            ),
        ));
    }
    if s.disk_gib == 0 || s.disk_gib > MAX_DISK_GIB {
        return Err(ApiError::invalid(
            "disk_gib",
            format!(
                "must be between 1 and {MAX_DISK_GIB} GiB, got {}",
                s.disk_gib
            ),
        ));
    }
    image(&s.image)?;
    ssh_public_key(&s.ssh_public_key)?;
    let network_ok = s.network.len() <= 32
        && s.network
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !network_ok {
        return Err(ApiError::invalid(
            "network",
            format!("{:?} is not a network name (a-z, 0-9, '-')", s.network),
        ));
    }
    if s.user_data.len() > MAX_USER_DATA {
        return Err(ApiError::invalid(
            "user_data",
            format!("is {} bytes; at most 64 KiB is allowed", s.user_data.len()),
        ));
    }
    if s.user_data.contains('\0') {
        return Err(ApiError::invalid("user_data", "must not contain NUL bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> VpsSpec {
        VpsSpec {
            name: "web-01".into(),
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 20,
            image: "debian-12".into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx admin@opd".into(),
            user_data: "#cloud-config\n".into(),
            network: String::new(),
        }
    }

    fn field_of(s: VpsSpec) -> &'static str {
        match spec(&s) {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_good_spec_passes() {
        spec(&good()).unwrap();
        spec(&VpsSpec {
            ssh_public_key: String::new(),
            user_data: String::new(),
            ..good()
        })
        .unwrap();
    }

    #[test]
    fn hostile_names() {
        for n in [
            "",
            "web\"01",
            "web<01>",
            "a&b",
            "a/b",
            "..",
            "../etc",
            "web 01",
            "Web",
            "sekolah-ñ",
            "-web",
            "web-",
            "x\u{0}",
        ] {
            assert_eq!(
                field_of(VpsSpec {
                    name: n.into(),
                    ..good()
                }),
                "name",
                "{n:?}"
            );
        }
        assert_eq!(
            field_of(VpsSpec {
                name: "a".repeat(64),
                ..good()
            }),
            "name"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(field_of(VpsSpec { vcpus: 0, ..good() }), "vcpus");
        assert_eq!(
            field_of(VpsSpec {
                vcpus: 65,
                ..good()
            }),
            "vcpus"
        );
        assert_eq!(
            field_of(VpsSpec {
                memory_mib: 0,
                ..good()
            }),
            "memory_mib"
        );
        assert_eq!(
            field_of(VpsSpec {
                memory_mib: u64::MAX,
                ..good()
            }),
            "memory_mib"
        );
        assert_eq!(
            field_of(VpsSpec {
                disk_gib: 0,
                ..good()
            }),
            "disk_gib"
        );
        assert_eq!(
            field_of(VpsSpec {
                disk_gib: u64::MAX,
                ..good()
            }),
            "disk_gib"
        );
        let e = spec(&VpsSpec { vcpus: 0, ..good() })
            .unwrap_err()
            .to_string();
        assert_eq!(e, "vcpus: must be between 1 and 64, got 0");
    }

    #[test]
    fn images_keys_and_user_data() {
        for i in ["", "../x", "a/b", "UBUNTU", "x..y", ".x"] {
            assert_eq!(
                field_of(VpsSpec {
                    image: i.into(),
                    ..good()
                }),
                "image",
                "{i:?}"
            );
        }
        for k in [
            "ssh-ed25519",
            "not-a-key AAAAC3NzaC1lZDI1NTE5AAAA",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA\nssh-rsa AAAAB3NzaC1yc2EAAAA",
            "ssh-ed25519 <script>alert(1)</script>",
        ] {
            assert_eq!(
                field_of(VpsSpec {
                    ssh_public_key: k.into(),
                    ..good()
                }),
                "ssh_public_key",
                "{k:?}"
            );
        }
        assert_eq!(
            field_of(VpsSpec {
                user_data: "x".repeat(MAX_USER_DATA + 1),
                ..good()
            }),
            "user_data"
        );
    }

    #[test]
    fn request_ids() {
        assert!(request_id("3f2b8f9e-1c2d-4e5f-8a9b-0c1d2e3f4a5b").is_ok());
        for bad in ["", "a b", "x/y", "é", &"a".repeat(129)] {
            assert!(request_id(bad).is_err(), "{bad:?}");
        }
    }
}

fn slug(field: &'static str, v: &str, max: usize) -> Result<(), ApiError> {
    let ok = v.len() <= max
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{v:?} must be at most {max} characters of a-z, 0-9, '-', '_', '.'"),
        ))
    }
}

/// Where a VPS may go: zone, host labels, anti-affinity group.
pub fn placement(p: &betang_proto::v1::PlacementRequest) -> Result<(), ApiError> {
    slug("placement.zone", &p.zone, 32)?;
    slug("placement.anti_affinity_group", &p.anti_affinity_group, 63)?;
    if p.host_labels.len() > 16 {
        return Err(ApiError::invalid(
            "placement.host_labels",
            "at most 16 labels",
        ));
    }
    for (k, v) in &p.host_labels {
        if k.is_empty() {
            return Err(ApiError::invalid(
                "placement.host_labels",
                "a label needs a name",
            ));
        }
        slug("placement.host_labels", k, 63)?;
        slug("placement.host_labels", v, 63)?;
    }
    Ok(())
}

/// The application inventory fields of a request.
pub fn application(a: &betang_proto::v1::Application) -> Result<(), ApiError> {
    let text = |field: &'static str, v: &str, max: usize, required: bool| {
        if required && v.trim().is_empty() {
            return Err(ApiError::invalid(field, "is required"));
        }
        if v.chars().count() > max || v.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                field,
                format!("must be at most {max} characters, without control characters"),
            ));
        }
        Ok(())
    };
    text("application.name", &a.name, 100, true)?;
    text("application.kind", &a.kind, 50, false)?;
    text("application.purpose", &a.purpose, 500, false)?;
    text(
        "application.responsible_name",
        &a.responsible_name,
        100,
        true,
    )?;
    if !a.domain.is_empty() {
        let ok = a.domain.len() <= 253 && a.domain.split('.').all(|l| name(l).is_ok());
        if !ok {
            return Err(ApiError::invalid(
                "application.domain",
                format!(
                    "{:?} is not a domain name like layanan.example.go.id",
                    a.domain
                ),
            ));
        }
    }
    if !a.responsible_nip.is_empty()
        && (a.responsible_nip.len() != 18 || !a.responsible_nip.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(ApiError::invalid(
            "application.responsible_nip",
            "a NIP is 18 digits",
        ));
    }
    if !a.responsible_email.is_empty()
        && (a.responsible_email.len() > 200 || !a.responsible_email.contains('@'))
    {
        return Err(ApiError::invalid(
            "application.responsible_email",
            "must be an e-mail address",
        ));
    }
    if !a.responsible_phone.is_empty()
        && (a.responsible_phone.len() > 20
            || !a
                .responsible_phone
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | ' ')))
    {
        return Err(ApiError::invalid(
            "application.responsible_phone",
            "digits, '+', '-' and spaces, at most 20",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod application_tests {
    use super::*;
    use betang_proto::v1::Application;

    fn good() -> Application {
        Application {
            name: "SIMPEG".into(),
            kind: "e-service".into(),
            purpose: "staff records".into(),
            domain: "simpeg.example.go.id".into(),
            responsible_name: "Siti".into(),
            responsible_nip: "198701012010012001".into(),
            responsible_email: "siti@example.go.id".into(),
            responsible_phone: "+62 811-000".into(),
        }
    }

    #[test]
    fn application_fields() {
        application(&good()).unwrap();
        let field = |a: Application| match application(&a) {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(Application {
                name: " ".into(),
                ..good()
            }),
            "application.name"
        );
        assert_eq!(
            field(Application {
                responsible_name: String::new(),
                ..good()
            }),
            "application.responsible_name"
        );
        assert_eq!(
            field(Application {
                domain: "a..b".into(),
                ..good()
            }),
            "application.domain"
        );
        assert_eq!(
            field(Application {
                domain: "<x>.go.id".into(),
                ..good()
            }),
            "application.domain"
        );
        assert_eq!(
            field(Application {
                responsible_nip: "12ab".into(),
                ..good()
            }),
            "application.responsible_nip"
        );
        assert_eq!(
            field(Application {
                purpose: "a\u{7}".into(),
                ..good()
            }),
            "application.purpose"
        );
    }
}
