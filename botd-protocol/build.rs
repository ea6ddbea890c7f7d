//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so no system `protoc`
//! is needed, and generates the prost types into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/handshake.proto", "proto/frame.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    // For dependents whose own messages import these (DEP_BOTD_PROTOCOL_PROTO_DIR).
    let dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:proto_dir={}", dir.display());
    Ok(())
}
