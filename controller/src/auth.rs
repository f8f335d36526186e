//! Who is calling. Every request passes through `authenticate`; today every
//! caller is the local operator, and the institutions issue replaces this
//! with bearer tokens and roles without touching the services.

use tonic::{Request, Status};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The single-host default: whoever reaches the loopback listener.
    LocalOperator,
}

pub fn authenticate(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.extensions_mut().insert(Caller::LocalOperator);
    Ok(req)
}
