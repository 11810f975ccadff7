//! Compiles the admin API's protocol buffers in pure Rust (protox), so no machine needs protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    let descriptors = protox::compile(["proto/admin.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // `fl-server status --json` prints the runtime's figures as they arrive.
        .type_attribute("shoal.admin.v1.RuntimeStatus", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
