//! qcow2 overlays on catalogue images, made and inspected with `qemu-img`
//! (arguments passed one by one, never through a shell). Formats are always
//! explicit, and images with a backing file or an external data file are refused,
//! so a crafted image can never make QEMU open a file on the host.

use std::path::Path;

use serde::Deserialize;

use crate::{
    error::{AgentError, Result},
    seed::SeedContent,
};

pub const GIB: u64 = 1024 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub virtual_size: u64,
    pub actual_size: u64,
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename", default)]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format", default)]
    backing_format: Option<String>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: Option<serde_json::Value>,
}

fn run(cmd: &mut std::process::Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .map_err(|e| AgentError::Disk(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(AgentError::Disk(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(out.stdout)
}

/// What the agent does to disk files. `QemuImg` is the real one; the simulated
/// hypervisor brings its own, so a scale run of many hosts writes a few bytes
/// per VPS instead of running `qemu-img` and writing a seed volume.
pub trait DiskTool: Send + Sync {
    /// Inspects a base image and refuses anything but a self-contained qcow2.
    fn inspect_base(&self, path: &Path) -> Result<ImageFacts>;
    /// Creates `overlay` on top of `base` with `size_bytes` of virtual size.
    fn create_overlay(&self, base: &Path, overlay: &Path, size_bytes: u64) -> Result<()>;
    /// Grows a disk to `size_bytes` if it is smaller; never shrinks it.
    fn grow(&self, path: &Path, size_bytes: u64) -> Result<()>;
    /// The base file a disk that is already there stands on, when it is a
    /// plain overlay (qcow2, no external data file). Read without taking
    /// QEMU's lock, so a running guest's disk can be looked at. Never changes
    /// the file.
    fn backing_of(&self, overlay: &Path) -> Result<std::path::PathBuf>;
    fn write_seed(&self, path: &Path, content: &SeedContent) -> Result<()>;
    /// Makes an overlay copied from another host use `base`, this host's copy
    /// of the same catalogue image. The data is not touched.
    fn rebase(&self, overlay: &Path, base: &Path) -> Result<()>;
    /// The SHA-256 of a file, lower-case hex. Images are known by this;
    /// callers go through `DigestCache`, which hashes a file only when it
    /// changed.
    fn digest(&self, path: &Path) -> Result<String>;
}

/// Disks as QEMU reads them: qcow2 files made with `qemu-img`, FAT seeds.
pub struct QemuImg;

impl DiskTool for QemuImg {
    fn inspect_base(&self, path: &Path) -> Result<ImageFacts> {
        inspect_base(path)
    }
    fn create_overlay(&self, base: &Path, overlay: &Path, size_bytes: u64) -> Result<()> {
        create_overlay(base, overlay, size_bytes)
    }
    fn grow(&self, path: &Path, size_bytes: u64) -> Result<()> {
        grow(path, size_bytes)
    }
    fn backing_of(&self, overlay: &Path) -> Result<std::path::PathBuf> {
        backing_of(overlay)
    }
    fn write_seed(&self, path: &Path, content: &SeedContent) -> Result<()> {
        content.write_image(path)
    }
    fn rebase(&self, overlay: &Path, base: &Path) -> Result<()> {
        rebase(overlay, base)
    }
    fn digest(&self, path: &Path) -> Result<String> {
        crate::digests::sha256_file(path)
    }
}

fn inspect_base(path: &Path) -> Result<ImageFacts> {
    let out = run(std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2", "--"])
        .arg(path))?;
    check_info(&out, path)
}

/// An imported overlay must be a qcow2 without an external data file; its old
/// backing path (another host's) is replaced without reading it (`-u`).
fn rebase(overlay: &Path, base: &Path) -> Result<()> {
    let out = run(std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2", "--"])
        .arg(overlay))?;
    let info: QemuImgInfo = serde_json::from_slice(&out)
        .map_err(|e| AgentError::Disk(format!("qemu-img info {}: {e}", overlay.display())))?;
    let data_file = info
        .format_specific
        .and_then(|f| f.data)
        .and_then(|d| d.get("data-file").cloned());
    let overlay_of_something =
        info.backing_filename.is_some() || info.full_backing_filename.is_some();
    if info.format != "qcow2" || data_file.is_some() || !overlay_of_something {
        return Err(AgentError::Disk(format!(
            "{} is not a plain qcow2 overlay; refused",
            overlay.display()
        )));
    }
    run(std::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg("--")
        .arg(overlay))?;
    Ok(())
}

fn check_info(json: &[u8], path: &Path) -> Result<ImageFacts> {
    let info: QemuImgInfo = serde_json::from_slice(json)
        .map_err(|e| AgentError::Disk(format!("qemu-img info {}: {e}", path.display())))?;
    if info.format != "qcow2" {
        return Err(AgentError::Disk(format!(
            "{} is {}, not qcow2",
            path.display(),
            info.format
        )));
    }
    if info.backing_filename.is_some() || info.full_backing_filename.is_some() {
        return Err(AgentError::Disk(format!(
            "{} has a backing file; catalogue images must be self-contained",
            path.display()
        )));
    }
    let data_file = info
        .format_specific
        .and_then(|f| f.data)
        .and_then(|d| d.get("data-file").cloned());
    if data_file.is_some() {
        return Err(AgentError::Disk(format!(
            "{} has an external data file; refused",
            path.display()
        )));
    }
    Ok(ImageFacts {
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
    })
}

fn create_overlay(base: &Path, overlay: &Path, size_bytes: u64) -> Result<()> {
    run(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg("--")
        .arg(overlay)
        .arg(size_bytes.to_string()))?;
    Ok(())
}

fn grow(path: &Path, size_bytes: u64) -> Result<()> {
    let out = run(std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2", "--"])
        .arg(path))?;
    let info: QemuImgInfo = serde_json::from_slice(&out)
        .map_err(|e| AgentError::Disk(format!("qemu-img info {}: {e}", path.display())))?;
    if info.virtual_size < size_bytes {
        run(std::process::Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2", "--"])
            .arg(path)
            .arg(size_bytes.to_string()))?;
    }
    Ok(())
}

/// `-U` (force-share): a disk a running QEMU holds is locked, and reading its
/// header must not fail (or wait) because of that.
fn backing_of(overlay: &Path) -> Result<std::path::PathBuf> {
    let out = run(std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", "qcow2", "--"])
        .arg(overlay))?;
    backing_in(&out)
}

/// The base a plain overlay names, from its `qemu-img info`. An external data
/// file, or a base read as anything but qcow2, is not what the agent makes.
fn backing_in(json: &[u8]) -> Result<std::path::PathBuf> {
    let info: QemuImgInfo = serde_json::from_slice(json)
        .map_err(|e| AgentError::Disk(format!("qemu-img info said something unexpected: {e}")))?;
    let data_file = info
        .format_specific
        .and_then(|f| f.data)
        .and_then(|d| d.get("data-file").cloned());
    if info.format != "qcow2" || data_file.is_some() {
        return Err(AgentError::Disk(
            "it is not a plain qcow2 overlay".to_owned(),
        ));
    }
    if let Some(f) = info.backing_format.as_deref()
        && f != "qcow2"
    {
        return Err(AgentError::Disk(format!(
            "its base is read as {f}, not qcow2"
        )));
    }
    info.full_backing_filename
        .or(info.backing_filename)
        .map(std::path::PathBuf::from)
        .ok_or_else(|| AgentError::Disk("it has no base image".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_with_backing_file_or_data_file_is_refused() {
        let p = Path::new("/x.qcow2");
        let ok = br#"{"format":"qcow2","virtual-size":1073741824,"actual-size":200704}"#;
        assert_eq!(
            check_info(ok, p).unwrap(),
            ImageFacts {
                virtual_size: GIB,
                actual_size: 200704
            }
        );
        let backing = br#"{"format":"qcow2","virtual-size":1,"backing-filename":"/etc/shadow"}"#;
        assert!(
            check_info(backing, p)
                .unwrap_err()
                .to_string()
                .contains("backing file")
        );
        let data = br#"{"format":"qcow2","virtual-size":1,"format-specific":{"type":"qcow2","data":{"data-file":"/dev/sda"}}}"#;
        assert!(
            check_info(data, p)
                .unwrap_err()
                .to_string()
                .contains("data file")
        );
        let raw = br#"{"format":"raw","virtual-size":1}"#;
        assert!(
            check_info(raw, p)
                .unwrap_err()
                .to_string()
                .contains("not qcow2")
        );
    }

    #[test]
    fn real_overlay_on_real_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M"))
        .unwrap();
        assert_eq!(inspect_base(&base).unwrap().virtual_size, 64 << 20);
        let overlay = dir.path().join("root.qcow2");
        create_overlay(&base, &overlay, GIB).unwrap();
        assert_eq!(backing_of(&overlay).unwrap(), base);
        // The overlay itself has a backing file, so it can never be a base.
        assert!(inspect_base(&overlay).is_err());
        // A base is not an overlay; a file that is not qcow2 is not read as one.
        assert!(backing_of(&base).is_err());
        std::fs::write(dir.path().join("junk"), b"not qcow2").unwrap();
        assert!(backing_of(&dir.path().join("junk")).is_err());
        // An overlay moved from another host is based on this host's image.
        let other_base = dir.path().join("other.qcow2");
        std::fs::copy(&base, &other_base).unwrap();
        rebase(&overlay, &other_base).unwrap();
        assert_eq!(backing_of(&overlay).unwrap(), other_base);
        assert!(
            rebase(&base, &other_base).is_err(),
            "a base is not an overlay"
        );
        std::fs::write(dir.path().join("raw"), b"not qcow2").unwrap();
        assert!(rebase(&dir.path().join("raw"), &base).is_err());
        rebase(&overlay, &base).unwrap();
        // Growing works; asking for less changes nothing.
        grow(&overlay, 2 * GIB).unwrap();
        grow(&overlay, GIB).unwrap();
        let out = run(std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(&overlay))
        .unwrap();
        let info: QemuImgInfo = serde_json::from_slice(&out).unwrap();
        assert_eq!(info.virtual_size, 2 * GIB);
    }

    #[test]
    fn only_a_plain_overlay_on_a_qcow2_base_has_a_base() {
        let ok = br#"{"format":"qcow2","virtual-size":1,"backing-filename":"b.qcow2","full-backing-filename":"/i/b.qcow2","backing-filename-format":"qcow2"}"#;
        assert_eq!(backing_in(ok).unwrap(), Path::new("/i/b.qcow2"));
        let raw_base = br#"{"format":"qcow2","virtual-size":1,"full-backing-filename":"/i/b.qcow2","backing-filename-format":"raw"}"#;
        assert!(
            backing_in(raw_base)
                .unwrap_err()
                .to_string()
                .contains("read as raw")
        );
        let data = br#"{"format":"qcow2","virtual-size":1,"full-backing-filename":"/i/b.qcow2","format-specific":{"type":"qcow2","data":{"data-file":"/dev/sda"}}}"#;
        assert!(backing_in(data).is_err());
        let none = br#"{"format":"qcow2","virtual-size":1}"#;
        assert!(
            backing_in(none)
                .unwrap_err()
                .to_string()
                .contains("no base")
        );
    }

    /// A running guest's QEMU holds a lock on its disk; the agent still reads
    /// the disk's header (`-U`) and never waits for or breaks the lock.
    #[test]
    fn an_overlay_in_use_is_read_without_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--"])
            .arg(&base)
            .arg("64M"))
        .unwrap();
        let overlay = dir.path().join("root.qcow2");
        create_overlay(&base, &overlay, GIB).unwrap();
        // qemu-io holds the image open (and locked) while it waits for
        // commands on its standard input; once it has written, it surely
        // holds it. (Probing the lock meanwhile could make qemu-io fail to
        // take it.)
        let mut holder = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "--"])
            .arg(&overlay)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::{BufRead, Write};
            let stdin = holder.stdin.as_mut().unwrap();
            stdin.write_all(b"write -P 0xab 0 64k\n").unwrap();
            stdin.flush().unwrap();
            let mut out = std::io::BufReader::new(holder.stdout.as_mut().unwrap());
            let mut line = String::new();
            while !line.contains("wrote") {
                line.clear();
                assert_ne!(out.read_line(&mut line).unwrap(), 0, "qemu-io ended");
            }
        }
        let locked = run(std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2", "--"])
            .arg(&overlay));
        assert!(locked.is_err(), "qemu-io holds the disk's lock");
        let before = crate::digests::sha256_file(&overlay).unwrap();
        assert_eq!(backing_of(&overlay).unwrap(), base);
        assert_eq!(crate::digests::sha256_file(&overlay).unwrap(), before);
        drop(holder.stdin.take());
        holder.wait().unwrap();
    }
}
