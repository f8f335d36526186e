//! betang-agent: runs on every host, converges libvirt guests to the state the
//! controller asks for, and reports what they use.

pub mod attachment;
pub mod config;
pub mod console;
pub mod digests;
pub mod disks;
pub mod domain_xml;
pub mod error;
pub mod host;
pub mod hypervisor;
pub mod images;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod registration;
pub mod seed;
pub mod server;
pub mod service;
pub mod tls;
pub mod usage;
pub mod vms;
