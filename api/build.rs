//! Compiles the protobuf contract with protox (no `protoc` needed) into tonic/prost code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/weft/mesh/v1alpha1/mesh.proto",
        "proto/weft/echo/v1/echo.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // For `/config_dump`, the controller's debug views and golden tests.
        .message_attribute(
            ".",
            "#[derive(serde::Serialize)] #[serde(rename_all = \"camelCase\")]",
        )
        .enum_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
