//! Who is calling, and what they may do. Every user-facing handler starts by
//! authenticating the bearer token; permissions are one table, `allowed`.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Member,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "member" => Some(Role::Member),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn to_proto(self) -> betang_proto::v1::Role {
        match self {
            Role::Member => betang_proto::v1::Role::Member,
            Role::Operator => betang_proto::v1::Role::Operator,
            Role::Admin => betang_proto::v1::Role::Admin,
        }
    }

    pub fn from_proto(r: i32) -> Option<Role> {
        match betang_proto::v1::Role::try_from(r).ok()? {
            betang_proto::v1::Role::Member => Some(Role::Member),
            betang_proto::v1::Role::Operator => Some(Role::Operator),
            betang_proto::v1::Role::Admin => Some(Role::Admin),
            betang_proto::v1::Role::Unspecified => None,
        }
    }
}

/// What a call needs beyond being authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Request, watch, start, stop, reboot, delete and cancel VPS of one's own institution.
    OwnVps,
    /// See and act on every institution's VPS; approve, reject, create directly, pin hosts.
    AllVps,
    ViewHosts,
    /// Cordon, uncordon and weigh hosts.
    ManageHosts,
    ViewInstitutions,
    SetQuota,
    ViewAudit,
    ManageInstitutions,
    ManageUsers,
    /// Create, list and revoke tokens of other users.
    ManageAllTokens,
    /// Define networks and grant them to institutions.
    ManageNetworks,
}

pub const ALL_PERMISSIONS: [Permission; 11] = [
    Permission::OwnVps,
    Permission::AllVps,
    Permission::ViewHosts,
    Permission::ManageHosts,
    Permission::ViewInstitutions,
    Permission::SetQuota,
    Permission::ViewAudit,
    Permission::ManageInstitutions,
    Permission::ManageUsers,
    Permission::ManageAllTokens,
    Permission::ManageNetworks,
];

pub fn allowed(role: Role, p: Permission) -> bool {
    use Permission::*;
    match role {
        Role::Member => matches!(p, OwnVps),
        Role::Operator => matches!(
            p,
            OwnVps
                | AllVps
                | ViewHosts
                | ManageHosts
                | ViewInstitutions
                | SetQuota
                | ViewAudit
                | ManageNetworks
        ),
        Role::Admin => true,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub username: String,
    pub institution_id: String,
    pub role: Role,
}

/// Which VPS a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Institution(String),
}

impl Caller {
    /// Betang itself, for what it records on its own (a host going down).
    pub fn system() -> Caller {
        Caller {
            user_id: "system".into(),
            username: "betang".into(),
            institution_id: String::new(),
            role: Role::Admin,
        }
    }

    pub fn require(&self, p: Permission) -> Result<(), ApiError> {
        if allowed(self.role, p) {
            Ok(())
        } else {
            let who = match self.role {
                Role::Member => "a member",
                Role::Operator => "an operator",
                Role::Admin => "an admin",
            };
            Err(ApiError::PermissionDenied(format!("{who} may not do this")))
        }
    }

    pub fn is_staff(&self) -> bool {
        allowed(self.role, Permission::AllVps)
    }

    pub fn scope(&self) -> Scope {
        if self.is_staff() {
            Scope::All
        } else {
            Scope::Institution(self.institution_id.clone())
        }
    }
}

impl Scope {
    pub fn sees(&self, institution_id: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Institution(mine) => institution_id == Some(mine.as_str()),
        }
    }
}

/// The secret from `authorization: Bearer <secret>`.
pub fn bearer(md: &MetadataMap) -> Result<String, ApiError> {
    let v = md
        .get("authorization")
        .ok_or_else(|| ApiError::Unauthenticated("no bearer token in `authorization`".into()))?;
    let s = v
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("malformed `authorization`".into()))?;
    let secret = s
        .strip_prefix("Bearer ")
        .or_else(|| s.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::Unauthenticated("`authorization` must be `Bearer <token>`".into())
        })?;
    Ok(secret.trim().to_owned())
}

pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token secret: 32 random bytes, hex, with a recognisable prefix so
/// secret scanners find leaked ones.
pub fn new_secret() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::Unauthenticated(format!("no randomness: {e}")))?;
    Ok(format!(
        "btg_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_table() {
        use Permission::*;
        for p in ALL_PERMISSIONS {
            assert!(allowed(Role::Admin, p), "{p:?}");
            assert_eq!(allowed(Role::Member, p), p == OwnVps, "{p:?}");
            assert_eq!(
                allowed(Role::Operator, p),
                !matches!(p, ManageInstitutions | ManageUsers | ManageAllTokens),
                "{p:?}"
            );
        }
    }

    #[test]
    fn bearer_tokens() {
        let mut md = MetadataMap::new();
        assert!(matches!(bearer(&md), Err(ApiError::Unauthenticated(_))));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(bearer(&md), Err(ApiError::Unauthenticated(_))));
        md.insert("authorization", "Bearer btg_x".parse().unwrap());
        assert_eq!(bearer(&md).unwrap(), "btg_x");
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("btg_") && a.len() == 68);
        assert_eq!(hash_secret(&a).len(), 64);
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn scopes() {
        let member = Caller {
            user_id: "u".into(),
            username: "u".into(),
            institution_id: "a".into(),
            role: Role::Member,
        };
        assert!(member.scope().sees(Some("a")));
        assert!(!member.scope().sees(Some("b")));
        assert!(!member.scope().sees(None));
        assert!(Scope::All.sees(None));
    }
}
