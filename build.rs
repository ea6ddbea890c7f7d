//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so no system `protoc`
//! is needed, and generates the prost types into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/handshake.proto",
        "proto/frame.proto",
        "proto/store.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
