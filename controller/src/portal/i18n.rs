//! The portal's languages: Bahasa Indonesia by default, English on a
//! switch. Strings come from `i18n/*.toml` through the build script; dates
//! and numbers are written the way each language writes them.

use betang_proto::v1::VpsState;

include!(concat!(env!("OUT_DIR"), "/texts.rs"));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Id,
    En,
}

impl Lang {
    /// From the language cookie's value; Indonesian unless it says English.
    pub fn from_cookie(v: Option<&str>) -> Lang {
        match v {
            Some("en") => Lang::En,
            _ => Lang::Id,
        }
    }

    pub fn texts(self) -> &'static Texts {
        match self {
            Lang::Id => &ID,
            Lang::En => &EN,
        }
    }

    /// A whole number with the language's thousands separator.
    pub fn number(self, n: u64) -> String {
        let sep = match self {
            Lang::Id => '.',
            Lang::En => ',',
        };
        let digits = n.to_string();
        let mut out = String::with_capacity(digits.len() + digits.len() / 3);
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(sep);
            }
            out.push(c);
        }
        out
    }

    /// A moment (Unix ms) in the portal's zone: `3-12-2026 17.05 WIB` in
    /// Indonesian, `2026-12-03 17:05 WIB` in English.
    pub fn moment(self, ms: i64, offset_hours: i8, zone: &str) -> String {
        if ms <= 0 {
            return "—".into();
        }
        let Ok(offset) = time::UtcOffset::from_hms(offset_hours, 0, 0) else {
            return String::new();
        };
        let Ok(t) = time::OffsetDateTime::from_unix_timestamp(ms / 1000) else {
            return String::new();
        };
        let t = t.to_offset(offset);
        match self {
            Lang::Id => format!(
                "{}-{}-{} {:02}.{:02} {zone}",
                t.day(),
                u8::from(t.month()),
                t.year(),
                t.hour(),
                t.minute()
            ),
            Lang::En => format!(
                "{}-{:02}-{:02} {:02}:{:02} {zone}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            ),
        }
    }

    pub fn state(self, s: VpsState) -> &'static str {
        let t = self.texts();
        match s {
            VpsState::PendingApproval => t.state_pending_approval,
            VpsState::Pending => t.state_pending,
            VpsState::Scheduled => t.state_scheduled,
            VpsState::Provisioning => t.state_provisioning,
            VpsState::Running => t.state_running,
            VpsState::Stopped => t.state_stopped,
            VpsState::Deleting => t.state_deleting,
            VpsState::Deleted => t.state_deleted,
            VpsState::Error => t.state_error,
            VpsState::Rejected => t.state_rejected,
            VpsState::Cancelled => t.state_cancelled,
            VpsState::Migrating => t.state_migrating,
            VpsState::Unknown | VpsState::Unspecified => t.state_unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_moments_as_each_language_writes_them() {
        assert_eq!(Lang::Id.number(1_234_567), "1.234.567");
        assert_eq!(Lang::En.number(1_234_567), "1,234,567");
        assert_eq!(Lang::En.number(999), "999");
        // 2026-12-03 10:05 UTC is 17:05 in Western Indonesia.
        let ms = 1_796_292_300_000;
        assert_eq!(Lang::Id.moment(ms, 7, "WIB"), "3-12-2026 17.05 WIB");
        assert_eq!(Lang::En.moment(ms, 7, "WIB"), "2026-12-03 17:05 WIB");
        assert_eq!(Lang::Id.texts().sign_in_title, "Masuk");
        assert_eq!(Lang::En.texts().sign_in_title, "Sign in");
    }
}
