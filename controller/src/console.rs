//! Who types on each VPS's serial console: one writer at a time. Others
//! join as viewers, or take the keyboard over explicitly (the previous
//! writer then watches).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{error::ApiError, ids::VpsId};

#[derive(Debug, Default)]
pub struct Consoles {
    writers: Mutex<HashMap<VpsId, u64>>,
    next: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seat {
    Writer,
    Viewer,
}

impl Seat {
    pub fn as_str(self) -> &'static str {
        match self {
            Seat::Writer => "writer",
            Seat::Viewer => "viewer",
        }
    }
}

impl Consoles {
    /// A new session on `id`'s console, and its seat.
    pub fn join(
        &self,
        id: &VpsId,
        read_only: bool,
        take_over: bool,
    ) -> Result<(u64, Seat), ApiError> {
        let session = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        if read_only {
            return Ok((session, Seat::Viewer));
        }
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if w.contains_key(id) && !take_over {
            return Err(ApiError::WrongState {
                id: id.to_string(),
                state: "being typed on",
                action: "typing on its console (join read-only, or take over)",
            });
        }
        w.insert(*id, session);
        Ok((session, Seat::Writer))
    }

    /// Whether the session's keystrokes reach the guest.
    pub fn may_type(&self, id: &VpsId, session: u64) -> bool {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            == Some(&session)
    }

    pub fn leave(&self, id: &VpsId, session: u64) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if w.get(id) == Some(&session) {
            w.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_viewers_and_take_over() {
        let c = Consoles::default();
        let id = VpsId::new();
        let (a, seat) = c.join(&id, false, false).unwrap();
        assert_eq!(seat, Seat::Writer);
        assert!(c.join(&id, false, false).is_err(), "a second writer");
        let (v, seat) = c.join(&id, true, false).unwrap();
        assert_eq!(seat, Seat::Viewer);
        assert!(!c.may_type(&id, v));
        let (b, _) = c.join(&id, false, true).unwrap();
        assert!(c.may_type(&id, b) && !c.may_type(&id, a), "taken over");
        c.leave(&id, a);
        assert!(c.may_type(&id, b), "the old writer leaving changes nothing");
        c.leave(&id, b);
        assert!(c.join(&id, false, false).is_ok());
    }
}
