//! Typed ids, so a host id can never be passed where a VPS id is expected.

use std::fmt;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VpsId(uuid::Uuid);

impl VpsId {
    /// Time-ordered (UUIDv7), so ids sort roughly by creation.
    pub fn new() -> Self {
        VpsId(uuid::Uuid::now_v7())
    }

    /// Parses an id from a request. Anything that is not a canonical id is
    /// reported as not found, exactly like an id that does not exist.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let u = uuid::Uuid::try_parse(s).map_err(|_| ApiError::VpsNotFound(s.to_owned()))?;
        if u.hyphenated().to_string() != s {
            return Err(ApiError::VpsNotFound(s.to_owned()));
        }
        Ok(VpsId(u))
    }
}

impl Default for VpsId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for VpsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(String);

impl HostId {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-');
        if !ok {
            return Err(ApiError::invalid(
                "host_id",
                "must be 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'",
            ));
        }
        if s == betang_proto::v1::CONTROLLER_NAME {
            return Err(ApiError::invalid(
                "host_id",
                format!("{s:?} is the controller's own name, which no host may take"),
            ));
        }
        Ok(HostId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vps_ids_parse_only_canonical_form() {
        let id = VpsId::new();
        assert_eq!(VpsId::parse(&id.to_string()).unwrap(), id);
        for bad in [
            "",
            "x",
            "../../etc",
            &id.to_string().to_uppercase(),
            &id.to_string().replace('-', ""),
        ] {
            assert!(
                matches!(VpsId::parse(bad), Err(ApiError::VpsNotFound(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_ids() {
        assert!(HostId::parse("host-1").is_ok());
        for bad in ["", "-a", "Host", "a/b", "a b", "ü", "betang-controller"] {
            assert!(HostId::parse(bad).is_err(), "{bad}");
        }
    }
}
