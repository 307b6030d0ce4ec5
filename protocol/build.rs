//! Compiles the `.proto` with protox (pure Rust), so no `protoc` is needed on any machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/messenger/v1/messenger.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
