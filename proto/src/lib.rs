//! Betang's versioned gRPC API. Everything is generated from `proto/betang/v1`.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("betang.v1");

    /// Encoded descriptors of every `betang.v1` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("betang_v1_descriptor");

    /// Response metadata an agent puts on a refusal when it kept a disk it
    /// would not use (it does not match what the VPS was built on): the
    /// controller then runs no cleanup, which would remove that disk.
    pub const DISK_KEPT_METADATA: &str = "betang-disk-kept";

    /// The name in the controller's certificate; agents accept calls only
    /// from it, so no host may take it as its id.
    pub const CONTROLLER_NAME: &str = "betang-controller";
}
