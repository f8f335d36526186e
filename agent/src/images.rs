//! The image catalogue: the qcow2 files in the image directory named by its
//! `catalog.toml`. Names and file names are validated before any path is
//! built from them, and each base image is inspected once when loaded.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    digests::DigestCache,
    disks::{self, DiskTool},
    error::{AgentError, Result},
    names,
};

pub const MANIFEST: &str = "catalog.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    image: Vec<ManifestEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestEntry {
    name: String,
    file: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    description: String,
    /// The least memory a guest of this image boots with (0: no minimum).
    #[serde(default)]
    min_memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogImage {
    pub name: String,
    pub path: PathBuf,
    pub os: String,
    pub description: String,
    pub virtual_size: u64,
    pub size_bytes: u64,
    /// SHA-256 of the file: what a VPS built on it records.
    pub digest: String,
    pub min_memory_mib: u64,
}

impl CatalogImage {
    pub fn min_disk_gib(&self) -> u64 {
        self.virtual_size.div_ceil(disks::GIB).max(1)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    images: BTreeMap<String, CatalogImage>,
    /// Entries that were refused, with the reason, for the operator's log.
    pub refused: Vec<String>,
}

impl Catalog {
    /// Loads the catalogue. A bad entry is refused on its own and reported;
    /// it does not hide the good ones.
    pub fn load(dir: &Path, disks: &dyn DiskTool, digests: &DigestCache) -> Result<Catalog> {
        let manifest_path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
            Err(e) => return Err(AgentError::io(&manifest_path, e)),
        };
        let manifest: Manifest =
            toml::from_str(&text).map_err(|e| AgentError::InvalidArgument {
                field: "catalog.toml",
                rule: e.to_string(),
            })?;
        let mut catalog = Catalog::default();
        for entry in manifest.image {
            match Self::entry(dir, entry, disks, digests) {
                Ok(img) => {
                    catalog.images.insert(img.name.clone(), img);
                }
                Err(e) => catalog.refused.push(e.to_string()),
            }
        }
        Ok(catalog)
    }

    fn entry(
        dir: &Path,
        e: ManifestEntry,
        disks: &dyn DiskTool,
        digests: &DigestCache,
    ) -> Result<CatalogImage> {
        names::check_image_name(&e.name)?;
        names::check_file_name("file", &e.file)?;
        let path = dir.join(&e.file);
        let facts = disks.inspect_base(&path)?;
        let digest = digests.digest(disks, &path)?;
        Ok(CatalogImage {
            digest,
            min_memory_mib: e.min_memory_mib,
            name: e.name,
            path,
            os: e.os,
            description: e.description,
            virtual_size: facts.virtual_size,
            size_bytes: facts.actual_size,
        })
    }

    pub fn get(&self, name: &str) -> Option<&CatalogImage> {
        self.images.get(name)
    }

    pub fn images(&self) -> impl Iterator<Item = &CatalogImage> {
        self.images.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_base(dir: &Path, file: &str) {
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(dir.join(file))
            .arg("100M")
            .status()
            .unwrap();
        assert!(st.success());
    }

    #[test]
    fn loads_good_entries_and_refuses_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        make_base(dir.path(), "good.qcow2");
        std::fs::write(
            dir.path().join(MANIFEST),
            r#"
[[image]]
name = "debian-12"
file = "good.qcow2"
os = "debian"
description = "Debian 12"

[[image]]
name = "escape"
file = "../../etc/passwd"

[[image]]
name = "../x"
file = "good.qcow2"

[[image]]
name = "missing"
file = "missing.qcow2"
"#,
        )
        .unwrap();
        let c = Catalog::load(
            dir.path(),
            &crate::disks::QemuImg,
            &DigestCache::in_memory(),
        )
        .unwrap();
        let names: Vec<_> = c.images().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["debian-12"]);
        assert_eq!(c.get("debian-12").unwrap().min_disk_gib(), 1);
        assert_eq!(
            c.get("debian-12").unwrap().digest,
            crate::digests::sha256_file(&dir.path().join("good.qcow2")).unwrap()
        );
        assert_eq!(c.refused.len(), 3, "{:?}", c.refused);
        assert!(c.refused.iter().any(|r| r.starts_with("file:")));
        assert!(c.refused.iter().any(|r| r.starts_with("image:")));
    }

    #[test]
    fn no_manifest_is_an_empty_catalogue() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Catalog::load(
                dir.path(),
                &crate::disks::QemuImg,
                &DigestCache::in_memory()
            )
            .unwrap()
            .images()
            .count(),
            0
        );
    }
}
