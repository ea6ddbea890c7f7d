//! Compiles `proto/store.proto` (the embedded store's records) with protox, a pure-Rust protobuf
//! compiler, so no system `protoc` is needed. The botd/1 messages it imports come from the
//! botd-protocol crate's `proto/` and are referred to as `botd_protocol::proto` types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/store.proto";
    println!("cargo:rerun-if-changed={file}");
    let protocol = std::env::var("DEP_BOTD_PROTOCOL_PROTO_DIR")?;
    let descriptors = protox::compile([file], ["proto", protocol.as_str()])?;
    prost_build::Config::new()
        .bytes(["."])
        .extern_path(".botd.v1", "::botd_protocol::proto")
        .compile_fds(descriptors)?;
    Ok(())
}
