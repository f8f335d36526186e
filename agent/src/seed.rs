//! The cloud-init NoCloud seed: a small FAT volume labelled `CIDATA` holding
//! `meta-data` and `user-data`, attached to the guest as its second disk.
//! Built with the `fatfs` crate, so no external tool or mount is needed.

use std::{io::Write, path::Path};

use crate::error::{AgentError, Result};

/// Big enough for 64 KiB of user-data with room to spare, small enough to be
/// written in a few milliseconds.
const SEED_BYTES: u64 = 2 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedContent {
    pub instance_id: String,
    pub hostname: String,
    pub ssh_public_key: String,
    pub user_data: String,
    /// Written as `network-config` when the VPS has a Betang network.
    pub network: Option<crate::attachment::Attachment>,
}

impl SeedContent {
    /// `meta-data` is YAML; every value is emitted as a JSON string (JSON is a
    /// subset of YAML), so no input can break out of its field.
    pub fn meta_data(&self) -> String {
        let mut s = String::new();
        s.push_str("instance-id: ");
        s.push_str(&json_string(&self.instance_id));
        s.push('\n');
        s.push_str("local-hostname: ");
        s.push_str(&json_string(&self.hostname));
        s.push('\n');
        s
    }

    /// A cloud-config carrying the SSH key, followed by the caller's own
    /// cloud-config. A script or a multipart document is passed as is, since
    /// cloud-init cannot merge a key into those; the caller's script then owns
    /// the key.
    pub fn user_data(&self) -> String {
        let user = self.user_data.trim_start();
        if user.starts_with("#!") || user.starts_with("Content-Type: multipart") {
            return self.user_data.clone();
        }
        let mut s = String::from("#cloud-config\n");
        if !self.ssh_public_key.is_empty() {
            s.push_str("ssh_authorized_keys:\n  - ");
            s.push_str(&json_string(&self.ssh_public_key));
            s.push('\n');
        }
        if let Some(rest) = user.strip_prefix("#cloud-config") {
            s.push_str(rest.trim_start_matches(['\r', '\n']));
            if !s.ends_with('\n') {
                s.push('\n');
            }
        }
        s
    }

    pub fn write_image(&self, path: &Path) -> Result<()> {
        let seed_err = |e: std::io::Error| AgentError::Seed(format!("{}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| AgentError::io(path, e))?;
        file.set_len(SEED_BYTES)
            .map_err(|e| AgentError::io(path, e))?;
        let mut file = file;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*b"CIDATA     ")
                .fat_type(fatfs::FatType::Fat12),
        )
        .map_err(seed_err)?;
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(seed_err)?;
        {
            let root = fs.root_dir();
            let network = self
                .network
                .as_ref()
                .map(|a| ("network-config", a.network_config()));
            for (name, body) in [
                ("meta-data", self.meta_data()),
                ("user-data", self.user_data()),
            ]
            .into_iter()
            .chain(network)
            {
                let mut f = root.create_file(name).map_err(seed_err)?;
                f.truncate().map_err(seed_err)?;
                f.write_all(body.as_bytes()).map_err(seed_err)?;
                f.flush().map_err(seed_err)?;
            }
        }
        fs.unmount().map_err(seed_err)?;
        file.sync_all().map_err(|e| AgentError::io(path, e))?;
        Ok(())
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn content() -> SeedContent {
        SeedContent {
            instance_id: "0192c3a4-5b6c-7d8e-9f00-112233445566".into(),
            hostname: "web-01".into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB user@opd".into(),
            user_data: "#cloud-config\npackages: [nginx]\n".into(),
            network: None,
        }
    }

    #[test]
    fn seed_is_a_fat_volume_labelled_cidata_with_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        content().write_image(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut meta = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut meta)
            .unwrap();
        assert_eq!(
            meta,
            "instance-id: \"0192c3a4-5b6c-7d8e-9f00-112233445566\"\nlocal-hostname: \"web-01\"\n"
        );
        let mut user = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut user)
            .unwrap();
        assert!(user.starts_with("#cloud-config\nssh_authorized_keys:\n  - \"ssh-ed25519 "));
        assert!(user.ends_with("packages: [nginx]\n"), "{user}");
        assert!(
            fs.root_dir().open_file("network-config").is_err(),
            "no network-config without a network"
        );
    }

    #[test]
    fn a_network_brings_its_network_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let mut c = content();
        let a = crate::attachment::Attachment::from_proto(&betang_proto::v1::NetworkAttachment {
            network: "internal".into(),
            ip_address: "198.18.0.9".into(),
            prefix_len: 24,
            mac_address: "52:54:00:0a:0b:0c".into(),
            attach_kind: "network".into(),
            attach_source: "default".into(),
            ..Default::default()
        })
        .unwrap();
        c.network = Some(a.clone());
        c.write_image(&path).unwrap();
        let fs =
            fatfs::FileSystem::new(std::fs::File::open(&path).unwrap(), fatfs::FsOptions::new())
                .unwrap();
        let mut config = String::new();
        fs.root_dir()
            .open_file("network-config")
            .unwrap()
            .read_to_string(&mut config)
            .unwrap();
        assert_eq!(config, a.network_config());
        assert!(config.contains("\"198.18.0.9/24\""), "{config}");
    }

    #[test]
    fn writing_twice_gives_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        content().write_image(&path).unwrap();
        let mut c = content();
        c.hostname = "db".into();
        c.write_image(&path).unwrap();
        let fs =
            fatfs::FileSystem::new(std::fs::File::open(&path).unwrap(), fatfs::FsOptions::new())
                .unwrap();
        let mut meta = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut meta)
            .unwrap();
        assert!(meta.contains("local-hostname: \"db\""));
    }

    #[test]
    fn scripts_pass_through_and_hostile_keys_stay_quoted() {
        let mut c = content();
        c.user_data = "#!/bin/sh\necho hi\n".into();
        assert_eq!(c.user_data(), "#!/bin/sh\necho hi\n");
        c.user_data = String::new();
        c.ssh_public_key = "ssh-ed25519 AAAA x\nruncmd: [reboot]".into();
        let u = c.user_data();
        assert!(!u.contains("\nruncmd"), "{u}");
    }
}
