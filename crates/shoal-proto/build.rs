//! Compiles the .proto files with a pure-Rust parser (no `protoc` needed on the machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/shoal/v1/common.proto",
        "proto/shoal/v1/control.proto",
        "proto/shoal/v1/node.proto",
        "proto/shoal/v1/admin.proto",
        "proto/shoal/v1/stage.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
