//! A running guest's serial console, relayed for the controller. The domain's
//! serial port is a pty (with a log beside it); the agent, on the same host,
//! opens it in raw mode and copies bytes both ways: a thread waits on what
//! the guest prints, and keystrokes are written as they come. The pty's
//! settings and the wait on it are libc calls, each with its SAFETY note.
#![allow(unsafe_code)]

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::broadcast;

use crate::error::{AgentError, Result};

#[derive(Deserialize)]
struct DomainXml {
    devices: Devices,
}

#[derive(Deserialize)]
struct Devices {
    #[serde(default)]
    serial: Vec<SerialXml>,
}

#[derive(Deserialize)]
struct SerialXml {
    #[serde(rename = "@type")]
    kind: String,
    source: Option<Source>,
}

#[derive(Deserialize)]
struct Source {
    #[serde(rename = "@path")]
    path: String,
}

/// The pty of the first serial port in a running domain's XML: only ever a
/// `/dev/pts/N`.
pub fn pty_of(xml: &str) -> Option<PathBuf> {
    let d: DomainXml = quick_xml::de::from_str(xml).ok()?;
    let path = d
        .devices
        .serial
        .into_iter()
        .find(|s| s.kind == "pty")?
        .source?
        .path;
    let n = path.strip_prefix("/dev/pts/")?;
    (!n.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then(|| PathBuf::from(path))
}

/// The pty opened for reading and writing, in raw mode (no echo, no line
/// editing: the guest's own tty does that).
pub fn open(pty: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(pty)
        .map_err(|e| AgentError::io(pty, e))?;
    // SAFETY: `f` is an open descriptor for the whole block; `t` is filled by
    // tcgetattr before it is changed and set back.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok(f)
}

/// Copies what the guest prints to every session watching it, until none
/// is left (checked twice a second) or the guest's pty goes away.
fn pump(mut pty: File, out: broadcast::Sender<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        if out.receiver_count() == 0 {
            return;
        }
        let mut fds = libc::pollfd {
            fd: pty.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the length given.
        let ready = unsafe { libc::poll(&mut fds, 1, 500) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if ready == 0 {
            continue;
        }
        match pty.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                // No one left to read it: the pump ends.
                if out.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The guest stopped: its pty is gone.
            Err(_) => return,
        }
    }
}

/// One open pty per guest, shared by every session on its console: two
/// readers of one pty would each get part of what the guest prints.
struct Open {
    output: broadcast::Sender<Vec<u8>>,
    input: Arc<Mutex<File>>,
}

#[derive(Default)]
pub struct Hub(Mutex<HashMap<String, Open>>);

/// A session's share of a guest's console.
pub struct Attached {
    pub output: broadcast::Receiver<Vec<u8>>,
    pub input: Arc<Mutex<File>>,
}

impl Hub {
    /// Joins the console of `vps_id` on `pty`, opening it if no session has.
    pub fn attach(&self, vps_id: &str, pty: &Path) -> Result<Attached> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Consoles no one watches any more: their pumps have ended.
        open.retain(|_, o| o.output.receiver_count() > 0);
        if let Some(o) = open.get(vps_id) {
            return Ok(Attached {
                output: o.output.subscribe(),
                input: o.input.clone(),
            });
        }
        let f = self::open(pty)?;
        let reader = f.try_clone().map_err(|e| AgentError::io(pty, e))?;
        let (output, rx) = broadcast::channel(256);
        let input = Arc::new(Mutex::new(f));
        let pumped = output.clone();
        std::thread::spawn(move || pump(reader, pumped));
        open.insert(
            vps_id.to_owned(),
            Open {
                output,
                input: input.clone(),
            },
        );
        Ok(Attached { output: rx, input })
    }
}

/// Writes keystrokes to the pty, giving up after a while if the guest does
/// not read them (a full buffer).
pub fn type_in(pty: &Mutex<File>, data: &[u8]) -> Result<()> {
    let mut pty = pty.lock().unwrap_or_else(|p| p.into_inner());
    let started = std::time::Instant::now();
    let mut rest = data;
    while !rest.is_empty() {
        match pty.write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > Duration::from_secs(5) {
                    return Err(AgentError::InvalidArgument {
                        field: "data",
                        rule: "the guest does not read its console".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(AgentError::io(Path::new("console"), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pty_comes_from_the_live_xml_and_only_from_dev_pts() {
        let xml = |path: &str| {
            format!(
                "<domain type='qemu'><devices><serial type='pty'><source path='{path}'/>\
                 <log file='/v/console.log' append='on'/><target port='0'/></serial>\
                 </devices></domain>"
            )
        };
        assert_eq!(
            pty_of(&xml("/dev/pts/7")),
            Some(PathBuf::from("/dev/pts/7"))
        );
        assert_eq!(pty_of(&xml("/etc/shadow")), None);
        assert_eq!(pty_of(&xml("/dev/pts/../sda")), None);
        assert_eq!(
            pty_of("<domain><devices><serial type='file'/></devices></domain>"),
            None
        );
    }
}
