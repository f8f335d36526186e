//! `ConsoleVps`: the guest's serial console relayed from its agent. The same
//! permission as any other act on the VPS (operators, and members of its
//! institution; anyone else gets `NotFound`); opening and closing are
//! audited; one writer at a time.

use betang_proto::v1::{ConsoleInput, ConsoleOutput};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use super::Ctx;
use crate::{
    auth::{Caller, Permission},
    console::Seat,
    error::ApiError,
    ids::VpsId,
    lifecycle::VpsState,
    now_ms,
    store::{hosts, identity, vps},
};

pub type ConsoleStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<ConsoleOutput, Status>> + Send>>;

async fn audit(
    ctx: &Ctx,
    caller: &Caller,
    institution: &str,
    id: &VpsId,
    action: &'static str,
    result: String,
) {
    let (caller, institution, id) = (caller.clone(), institution.to_owned(), id.to_string());
    let now = now_ms();
    if let Err(e) = ctx
        .store
        .run(move |c| identity::audit(c, &caller, &institution, action, &id, &result, now))
        .await
    {
        tracing::warn!(error = %e, "cannot audit a console");
    }
}

pub async fn open(
    ctx: &Ctx,
    req: Request<Streaming<ConsoleInput>>,
) -> Result<ConsoleStream, Status> {
    let caller = ctx.caller(&req).await?;
    caller.require(Permission::OwnVps)?;
    let mut input = req.into_inner();
    let first = input
        .message()
        .await?
        .ok_or_else(|| ApiError::invalid("vps_id", "the first message names the VPS"))?;
    let id = VpsId::parse(&first.vps_id)?;
    let scope = caller.scope();
    let lookup = id;
    let v = ctx.store.run(move |c| vps::get(c, &lookup, &scope)).await?;
    if v.state != VpsState::Running {
        return Err(ApiError::WrongState {
            id: id.to_string(),
            state: v.state.as_str(),
            action: "opening its console (it has one while it runs)",
        }
        .into());
    }
    let host = v
        .host_id
        .clone()
        .ok_or_else(|| ApiError::invalid("vps_id", "the VPS has no host"))?;
    let h = host.clone();
    let endpoint = ctx.store.run(move |c| hosts::endpoint(c, &h)).await?;
    let mut agent = ctx.agents.client(&host, &endpoint)?;
    let (session, seat) = ctx.consoles.join(&id, first.read_only, first.take_over)?;

    // Keystrokes go on to the agent only while this session is the writer.
    let (to_agent, agent_rx) = mpsc::channel::<ConsoleInput>(64);
    let opening = ConsoleInput {
        vps_id: id.to_string(),
        data: if seat == Seat::Writer {
            first.data
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let _ = to_agent.send(opening).await;
    let answer = match agent.console(ReceiverStream::new(agent_rx)).await {
        Ok(a) => a.into_inner(),
        Err(s) => {
            ctx.consoles.leave(&id, session);
            return Err(ApiError::Agent {
                host: host.to_string(),
                message: s.message().to_owned(),
            }
            .into());
        }
    };
    let institution = v.institution_id.clone().unwrap_or_default();
    audit(
        ctx,
        &caller,
        &institution,
        &id,
        "vps.console.open",
        seat.as_str().to_owned(),
    )
    .await;

    let (to_client, client_rx) = mpsc::channel::<Result<ConsoleOutput, Status>>(64);
    if seat == Seat::Viewer {
        let _ = to_client
            .send(Ok(ConsoleOutput {
                notice: "watching: what you type is not sent".into(),
                ..Default::default()
            }))
            .await;
    }
    let consoles = ctx.consoles.clone();
    let typing = id;
    tokio::spawn(async move {
        while let Ok(Some(m)) = input.message().await {
            if m.data.is_empty() || !consoles.may_type(&typing, session) {
                continue;
            }
            let msg = ConsoleInput {
                data: m.data,
                ..Default::default()
            };
            if to_agent.send(msg).await.is_err() {
                break;
            }
        }
    });
    let (ctx, caller) = (ctx.clone(), caller.clone());
    tokio::spawn(async move {
        let mut answer = answer;
        loop {
            let next = tokio::select! {
                m = answer.message() => m,
                () = to_client.closed() => break,
            };
            match next {
                Ok(Some(out)) => {
                    if to_client.send(Ok(out)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    let _ = to_client.send(Err(s)).await;
                    break;
                }
            }
        }
        ctx.consoles.leave(&id, session);
        audit(
            &ctx,
            &caller,
            &institution,
            &id,
            "vps.console.close",
            seat.as_str().to_owned(),
        )
        .await;
    });
    Ok(Box::pin(ReceiverStream::new(client_rx)))
}
