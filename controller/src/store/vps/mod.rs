//! VPS rows: requests, approval, creation with an atomic quota check and
//! placement claim, desired-state changes, and the outcomes the dispatcher
//! records. Every change made for a caller writes its audit record in the
//! same transaction. One module per concern; their items are re-exported
//! here, where the rest of the controller finds them.

mod dispatch;
mod placement;
mod power;
mod requests;
mod rows;

pub use dispatch::{
    CallFailure, Ensured, WORK_ITEMS_SQL, Work, begin_provisioning, call_failed, cleaned_up,
    deleted, ensure_succeeded, work_items,
};
pub use placement::Placement;
pub(in crate::store) use placement::{Target, place};
pub use power::{mark_deleting, set_desired};
pub use requests::{Approval, NewVps, approve, create, decide_against, resize};
pub(in crate::store) use rows::transition;
pub use rows::{ListFilter, VpsRecord, get, get_any, list};
