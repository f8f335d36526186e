//! Tight patterns for everything that ends up in a path, a domain name or a
//! file name. Nothing from a request is joined into a path before it passes here.

use thiserror::Error;

/// Every domain Betang owns carries this prefix, so an operator's own domains
/// on the same libvirtd are never touched.
pub const DOMAIN_PREFIX: &str = "betang-";

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {rule}")]
pub struct NameError {
    pub field: &'static str,
    pub rule: String,
}

fn err(field: &'static str, rule: impl Into<String>) -> NameError {
    NameError {
        field,
        rule: rule.into(),
    }
}

/// An institution id as the controller makes them: short, printable, no
/// markup. Empty is allowed (an older controller does not send it).
pub fn check_institution_id(id: &str) -> Result<String, NameError> {
    let ok = id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(err(
            "institution_id",
            "must be at most 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

/// An image digest is a SHA-256 in lower-case hex, or empty (a VPS recorded
/// before digests were kept).
pub fn check_digest(d: &str) -> Result<String, NameError> {
    let ok = d.is_empty()
        || (d.len() == 64
            && d.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    if ok {
        Ok(d.to_owned())
    } else {
        Err(err(
            "image_digest",
            "must be a SHA-256 in lower-case hex (64 characters) or empty",
        ))
    }
}

/// A VPS id is a UUID in its canonical lower-case hyphenated form.
pub fn check_vps_id(id: &str) -> Result<(), NameError> {
    let ok = id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        });
    if ok {
        Ok(())
    } else {
        Err(err(
            "vps_id",
            "must be a lower-case UUID like 0192c3a4-5b6c-7d8e-9f00-112233445566",
        ))
    }
}

/// Image names: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit,
/// and never `..`.
pub fn check_image_name(name: &str) -> Result<(), NameError> {
    check_file_like("image", name)
}

/// A file name inside the image directory (no separators, no `..`).
pub fn check_file_name(field: &'static str, name: &str) -> Result<(), NameError> {
    check_file_like(field, name)
}

fn check_file_like(field: &'static str, name: &str) -> Result<(), NameError> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !first_ok || !chars_ok || name.contains("..") {
        return Err(err(
            field,
            format!(
                "{name:?} is not allowed: use 1 to 64 characters a-z, 0-9, '.', '_' or '-', starting with a letter or digit, without '..'"
            ),
        ));
    }
    Ok(())
}

/// A VPS name becomes the guest's hostname, so it is an RFC 1123 label.
pub fn check_hostname(name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(err(
            "name",
            format!(
                "{name:?} is not a valid server name: use 1 to 63 characters a-z, 0-9 and '-', not starting or ending with '-'"
            ),
        ))
    }
}

/// The libvirt domain name of a VPS.
pub fn domain_name(vps_id: &str) -> String {
    format!("{DOMAIN_PREFIX}{vps_id}")
}

/// The VPS id behind one of our domain names, if it is one.
pub fn vps_id_of_domain(name: &str) -> Option<&str> {
    let id = name.strip_prefix(DOMAIN_PREFIX)?;
    check_vps_id(id).ok().map(|()| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vps_ids() {
        assert!(check_vps_id("0192c3a4-5b6c-7d8e-9f00-112233445566").is_ok());
        for bad in [
            "",
            "0192C3A4-5B6C-7D8E-9F00-112233445566",
            "../../etc/passwd",
            "0192c3a4-5b6c-7d8e-9f00-11223344556",
            "0192c3a4-5b6c-7d8e-9f00-1122334455667",
            "0192c3a4_5b6c-7d8e-9f00-112233445566",
            "0192c3a4-5b6c-7d8e-9f00-11223344556/",
        ] {
            let e = check_vps_id(bad).unwrap_err();
            assert_eq!(e.field, "vps_id", "{bad}");
        }
    }

    #[test]
    fn image_names() {
        for good in ["debian-12", "ubuntu-24.04", "betang-test", "a", "rocky_9.4"] {
            assert!(check_image_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            "a..b",
            "../etc",
            "/etc/passwd",
            "a/b",
            "Debian",
            "-x",
            ".hidden",
            "naïve",
            "a b",
            "x\"y",
            "<img>",
            "a&b",
            &"a".repeat(65),
        ] {
            let e = check_image_name(bad).unwrap_err();
            assert_eq!(e.field, "image");
            assert!(e.to_string().starts_with("image: "), "{e}");
        }
    }

    #[test]
    fn hostnames() {
        for good in ["web", "e-kinerja-01", "a", &"a".repeat(63)] {
            assert!(check_hostname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "Web",
            "web.prov",
            "web_1",
            "sim<k>",
            "a&b",
            "o'neil",
            "dinas\"x",
            "..",
            "a/b",
            "layanan-ü",
            &"a".repeat(64),
        ] {
            assert_eq!(check_hostname(bad).unwrap_err().field, "name", "{bad}");
        }
    }

    #[test]
    fn domain_names_round_trip() {
        let id = "0192c3a4-5b6c-7d8e-9f00-112233445566";
        assert_eq!(vps_id_of_domain(&domain_name(id)), Some(id));
        assert_eq!(vps_id_of_domain("betang-../x"), None);
        assert_eq!(vps_id_of_domain("web01"), None);
    }
}
