//! A console client acting as a terminal would: it keeps what the guest
//! printed and answers the shell's cursor-position queries (busybox's line
//! editor asks after each prompt).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use betang_proto::v1::{ConsoleInput, ConsoleOutput};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{Clients, eventually};

pub struct Session {
    keys: mpsc::Sender<ConsoleInput>,
    seen: Arc<Mutex<String>>,
    printed: Arc<Notify>,
    /// Holds the answer stream (and a sender, for the replies): ending it
    /// closes the session.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// Opens `id`'s console through the controller.
    pub async fn open(
        c: &Clients,
        id: &str,
        read_only: bool,
        take_over: bool,
    ) -> Result<Session, tonic::Status> {
        let (keys, rx) = mpsc::channel(16);
        keys.send(ConsoleInput {
            vps_id: id.into(),
            read_only,
            take_over,
            ..Default::default()
        })
        .await
        .map_err(|_| tonic::Status::internal("the request stream closed"))?;
        let mut out: Streaming<ConsoleOutput> = c
            .vps
            .clone()
            .console_vps(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let seen = Arc::new(Mutex::new(String::new()));
        let printed = Arc::new(Notify::new());
        let (buffer, answer, told) = (seen.clone(), keys.clone(), printed.clone());
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = out.message().await {
                let text = String::from_utf8_lossy(&m.data).into_owned();
                if text.contains("\x1b[6n") {
                    let reply = ConsoleInput {
                        data: b"\x1b[1;1R".to_vec(),
                        ..Default::default()
                    };
                    if answer.send(reply).await.is_err() {
                        break;
                    }
                }
                let mut b = buffer.lock().unwrap_or_else(|p| p.into_inner());
                b.push_str(&text);
                b.push_str(&m.notice);
                told.notify_waiters();
            }
        });
        Ok(Session {
            keys,
            seen,
            printed,
            reader,
        })
    }

    pub async fn type_in(&self, text: &str) {
        self.keys
            .send(ConsoleInput {
                data: text.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .expect("the console is open");
    }

    /// Everything the console printed so far.
    pub fn seen(&self) -> String {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until what the console printed contains `what`.
    pub async fn until(&self, what: &str) -> anyhow::Result<()> {
        eventually(Duration::from_secs(60), what, || async {
            self.seen().contains(what).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; seen: {:?}", self.seen()))
    }

    /// Types `key` and waits until the console prints it back: one
    /// keystroke's round trip.
    pub async fn echo(&self, key: char, within: Duration) -> anyhow::Result<Duration> {
        let before = self.seen().len();
        let started = std::time::Instant::now();
        self.type_in(key.encode_utf8(&mut [0; 4])).await;
        loop {
            let printed = self.printed.notified();
            if self.seen().get(before..).is_some_and(|s| s.contains(key)) {
                return Ok(started.elapsed());
            }
            tokio::time::timeout(within.saturating_sub(started.elapsed()), printed)
                .await
                .map_err(|_| anyhow::anyhow!("{key:?} was not echoed within {within:?}"))?;
        }
    }
}
