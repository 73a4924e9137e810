//! Generates the `sluice.v1` client and server with tonic-prost-build, using the protoc that
//! ships inside `protoc-bin-vendored`, so a fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["sluice/v1/agent.proto"],
        &["."],
    )?;
    if std::env::var_os("CARGO_FEATURE_CRI").is_some() {
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
        // The server only with stubs for every call, so a test can stand in for a runtime by
        // answering the few calls sluice makes.
        tonic_prost_build::configure()
            .generate_default_stubs(true)
            .compile_with_config(config, &["cri/runtime/v1/api.proto"], &["cri"])?;
    }
    Ok(())
}
