//! The pages, as askama templates (checked when the controller is built)
//! filled from plain rows: everything a page shows is formatted before it
//! reaches the template, in the reader's language.

use askama::Template;

use super::i18n::Texts;

/// What every page's frame needs: its language, and who is signed in.
pub struct Frame {
    pub t: &'static Texts,
    /// The CSRF token the page's forms carry.
    pub csrf: String,
    /// Empty before signing in.
    pub username: String,
    pub operator: bool,
    /// May manage users (and so invite them).
    pub admin: bool,
    /// Where the language switch brings the reader back to.
    pub here: String,
}

#[derive(Template)]
#[template(path = "portal/sign_in.html")]
pub struct SignIn {
    pub f: Frame,
    pub error: String,
    pub notice: String,
    pub username: String,
}

#[derive(Template)]
#[template(path = "portal/invite.html")]
pub struct Invite {
    pub f: Frame,
    pub secret: String,
    pub for_user: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "portal/password.html")]
pub struct Password {
    pub f: Frame,
    pub error: String,
    pub notice: String,
}

pub struct VpsRow {
    pub id: String,
    pub name: String,
    pub state: String,
    pub state_class: &'static str,
    pub address: String,
    pub size: String,
    pub institution: String,
    pub since: String,
}

pub struct QuotaBar {
    pub label: &'static str,
    pub used: String,
    pub limit: String,
    pub percent: u64,
}

#[derive(Template)]
#[template(path = "portal/vps_list.html")]
pub struct VpsList {
    pub f: Frame,
    pub rows: Vec<VpsRow>,
    pub quota: Vec<QuotaBar>,
    pub next_page: String,
}

pub struct Choice {
    pub value: String,
    pub label: String,
}

#[derive(Template)]
#[template(path = "portal/vps_new.html")]
pub struct VpsNew {
    pub f: Frame,
    pub request_id: String,
    pub sizes: Vec<Choice>,
    pub images: Vec<Choice>,
    pub error: String,
}

pub struct Fact {
    pub label: &'static str,
    pub value: String,
}

pub struct Action {
    pub name: &'static str,
    pub label: &'static str,
}

#[derive(Template)]
#[template(path = "portal/vps_show.html")]
pub struct VpsShow {
    pub f: Frame,
    pub id: String,
    pub name: String,
    pub state: String,
    pub state_class: &'static str,
    pub facts: Vec<Fact>,
    pub actions: Vec<Action>,
    /// Operators, on a request waiting for approval.
    pub decide: bool,
}

#[derive(Template)]
#[template(path = "portal/confirm.html")]
pub struct Confirm {
    pub f: Frame,
    pub id: String,
    pub name: String,
    pub action: &'static str,
    pub label: &'static str,
}

pub struct QueueRow {
    pub id: String,
    pub name: String,
    pub institution: String,
    pub application: String,
    pub requested_by: String,
    pub size: String,
    pub since: String,
    pub age: String,
    /// `ok`, `near` (past three quarters of the standard) or `late`.
    pub age_class: &'static str,
}

#[derive(Template)]
#[template(path = "portal/queue.html")]
pub struct Queue {
    pub f: Frame,
    pub rows: Vec<QueueRow>,
}

#[derive(Template)]
#[template(path = "portal/error.html")]
pub struct ErrorPage {
    pub f: Frame,
    pub headline: String,
    pub detail: String,
}

pub struct HostRow {
    pub id: String,
    pub zone: String,
    pub state: &'static str,
    pub state_class: &'static str,
    pub reason: String,
    pub cordoned: bool,
    pub vcpus: String,
    pub memory: String,
    pub disk: String,
    pub cpu: String,
    pub vps: u32,
}

#[derive(Template)]
#[template(path = "portal/hosts.html")]
pub struct Hosts {
    pub f: Frame,
    pub rows: Vec<HostRow>,
}

pub struct AuditRow {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub result: String,
}

#[derive(Template)]
#[template(path = "portal/audit.html")]
pub struct Audit {
    pub f: Frame,
    pub actor: String,
    pub action: String,
    pub rows: Vec<AuditRow>,
    pub next_page: String,
}

pub struct InstitutionRow {
    pub id: String,
    pub code: String,
    pub name: String,
    pub disabled: bool,
    pub quota: Vec<QuotaBar>,
}

#[derive(Template)]
#[template(path = "portal/institutions.html")]
pub struct Institutions {
    pub f: Frame,
    pub rows: Vec<InstitutionRow>,
}

pub struct UserRow {
    pub id: String,
    pub username: String,
    pub institution: String,
    pub role: &'static str,
    pub disabled: bool,
}

#[derive(Template)]
#[template(path = "portal/users.html")]
pub struct Users {
    pub f: Frame,
    pub rows: Vec<UserRow>,
    /// An invitation just made: shown once.
    pub invited: String,
    pub link: String,
    pub until: String,
}

pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub state: &'static str,
    pub active: bool,
    pub created: String,
    pub expires: String,
    pub last_used: String,
}

#[derive(Template)]
#[template(path = "portal/tokens.html")]
pub struct Tokens {
    pub f: Frame,
    pub rows: Vec<TokenRow>,
    /// A token just made: its secret, shown once.
    pub secret: String,
    pub error: String,
}
