use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "betang/v1/common.proto",
        "betang/v1/vps.proto",
        "betang/v1/host.proto",
        "betang/v1/agent.proto",
        "betang/v1/identity.proto",
        "betang/v1/network.proto",
    ];
    tonic_prost_build::configure()
        // The descriptor set feeds the reflection service, so grpcurl works
        // without the .proto files.
        .file_descriptor_set_path(out.join("betang_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
