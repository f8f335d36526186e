//! The lifecycle of a VPS as an explicit state machine. Every change of state
//! in the store goes through `VpsState::can_become`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VpsState {
    PendingApproval,
    Rejected,
    Cancelled,
    Pending,
    Scheduled,
    Provisioning,
    Running,
    Stopped,
    /// Its disk is on its way to another host.
    Migrating,
    Deleting,
    Deleted,
    Error,
}

pub const ALL_STATES: [VpsState; 12] = [
    VpsState::PendingApproval,
    VpsState::Rejected,
    VpsState::Cancelled,
    VpsState::Pending,
    VpsState::Scheduled,
    VpsState::Provisioning,
    VpsState::Running,
    VpsState::Stopped,
    VpsState::Migrating,
    VpsState::Deleting,
    VpsState::Deleted,
    VpsState::Error,
];

impl VpsState {
    pub fn as_str(self) -> &'static str {
        match self {
            VpsState::PendingApproval => "PENDING_APPROVAL",
            VpsState::Rejected => "REJECTED",
            VpsState::Cancelled => "CANCELLED",
            VpsState::Pending => "PENDING",
            VpsState::Scheduled => "SCHEDULED",
            VpsState::Provisioning => "PROVISIONING",
            VpsState::Running => "RUNNING",
            VpsState::Stopped => "STOPPED",
            VpsState::Migrating => "MIGRATING",
            VpsState::Deleting => "DELETING",
            VpsState::Deleted => "DELETED",
            VpsState::Error => "ERROR",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL_STATES.into_iter().find(|st| st.as_str() == s)
    }

    /// The transitions the controller may make.
    pub fn can_become(self, next: VpsState) -> bool {
        use VpsState::*;
        match (self, next) {
            (Deleted | Rejected | Cancelled, _) => false,
            // A request waiting for an operator is decided, not deleted.
            (PendingApproval, Scheduled | Rejected | Cancelled) => true,
            (PendingApproval, _) => false,
            // A move ends (either way) before anything else happens to it;
            // it ends STOPPED, and a VPS that should run is started from there.
            (Migrating, Stopped | Error) => true,
            (Migrating, _) => false,
            (_, Deleting) => !matches!(self, Deleting),
            (Deleting, Deleted | Error) => true,
            (Deleting, _) => false,
            (Pending, Scheduled | Error) => true,
            (Scheduled, Provisioning | Error) => true,
            (Provisioning, Running | Stopped | Error) => true,
            // A running VPS moves only when asked to restart: the move stops it.
            (Running, Stopped | Migrating | Error) => true,
            (Stopped, Running | Migrating | Error) => true,
            // An ERROR VPS can be tried again; it goes back through provisioning.
            (Error, Provisioning) => true,
            // Nothing of it is on any host (never placed, or a failed build
            // already cleaned up): deleting it has nothing to wait for.
            (Pending | Error, Deleted) => true,
            _ => false,
        }
    }

    /// Whether the VPS holds capacity on its host. A MIGRATING VPS also
    /// holds it on the host it is moving to (`vps.move_target`).
    pub fn holds_capacity(self) -> bool {
        !matches!(
            self,
            VpsState::Deleted
                | VpsState::PendingApproval
                | VpsState::Rejected
                | VpsState::Cancelled
        )
    }

    /// Whether the VPS counts against its institution's quota: from approval
    /// until it is gone, moves included. Requests still waiting do not.
    pub fn holds_quota(self) -> bool {
        !matches!(
            self,
            VpsState::Deleted
                | VpsState::PendingApproval
                | VpsState::Rejected
                | VpsState::Cancelled
                | VpsState::Pending
        )
    }

    pub fn to_proto(self) -> betang_proto::v1::VpsState {
        use betang_proto::v1::VpsState as P;
        match self {
            VpsState::PendingApproval => P::PendingApproval,
            VpsState::Rejected => P::Rejected,
            VpsState::Cancelled => P::Cancelled,
            VpsState::Pending => P::Pending,
            VpsState::Scheduled => P::Scheduled,
            VpsState::Provisioning => P::Provisioning,
            VpsState::Running => P::Running,
            VpsState::Stopped => P::Stopped,
            VpsState::Migrating => P::Migrating,
            VpsState::Deleting => P::Deleting,
            VpsState::Deleted => P::Deleted,
            VpsState::Error => P::Error,
        }
    }
}

impl fmt::Display for VpsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The power state the controller drives a VPS towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredPower {
    Running,
    Stopped,
}

impl DesiredPower {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredPower::Running => "running",
            DesiredPower::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(DesiredPower::Running),
            "stopped" => Some(DesiredPower::Stopped),
            _ => None,
        }
    }

    pub fn to_proto(self) -> betang_proto::v1::PowerState {
        match self {
            DesiredPower::Running => betang_proto::v1::PowerState::Running,
            DesiredPower::Stopped => betang_proto::v1::PowerState::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::VpsState::*;
    use super::*;

    #[test]
    fn every_transition_from_every_state() {
        let allowed: &[(VpsState, &[VpsState])] = &[
            (PendingApproval, &[Scheduled, Rejected, Cancelled]),
            (Rejected, &[]),
            (Cancelled, &[]),
            (Pending, &[Scheduled, Error, Deleting, Deleted]),
            (Scheduled, &[Provisioning, Error, Deleting]),
            (Provisioning, &[Running, Stopped, Error, Deleting]),
            (Running, &[Stopped, Migrating, Error, Deleting]),
            (Stopped, &[Running, Migrating, Error, Deleting]),
            (Migrating, &[Stopped, Error]),
            (Deleting, &[Deleted, Error]),
            (Deleted, &[]),
            (Error, &[Provisioning, Deleting, Deleted]),
        ];
        for (from, tos) in allowed {
            for to in ALL_STATES {
                assert_eq!(
                    from.can_become(to),
                    tos.contains(&to),
                    "{from} -> {to} should be {}",
                    tos.contains(&to)
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in ALL_STATES {
            assert_eq!(VpsState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VpsState::parse("running"), None);
        assert_eq!(DesiredPower::parse("stopped"), Some(DesiredPower::Stopped));
    }

    #[test]
    fn quota_is_held_from_approval_until_deletion_moves_included() {
        for s in ALL_STATES {
            assert_eq!(
                s.holds_quota(),
                !matches!(
                    s,
                    Deleted | PendingApproval | Rejected | Cancelled | Pending
                ),
                "{s}"
            );
        }
        assert!(Migrating.holds_quota() && Migrating.holds_capacity());
    }

    #[test]
    fn capacity_is_held_from_placement_until_deletion() {
        for s in ALL_STATES {
            assert_eq!(
                s.holds_capacity(),
                !matches!(s, Deleted | PendingApproval | Rejected | Cancelled),
                "{s}"
            );
        }
    }
}
