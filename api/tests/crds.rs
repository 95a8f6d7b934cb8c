//! `crds/` must be what `kvtier crdgen` writes today: a stale CRD fails the build.

#[test]
fn crds_folder_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/kvtier.dev_kvcachedinferences.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == kvtier_api::crd::crd_yaml(),
        "{} is stale: run `cargo run -p kvtier -- crdgen > crds/kvtier.dev_kvcachedinferences.yaml`",
        path.display()
    );
}

#[test]
fn the_charts_crd_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/kvtier/templates/crd.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == kvtier_api::crd::crd_chart_template(),
        "{} is stale: run `cargo run -p kvtier -- crdgen --chart > charts/kvtier/templates/crd.yaml`",
        path.display()
    );
}
