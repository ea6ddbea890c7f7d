//! The documentation keeps up with the code: every `Config` field is in README's tables.

use botd_relay::config::Config;

#[test]
fn readme_documents_every_config_field() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let fields = toml::Table::try_from(Config::default()).expect("config serializes");
    let missing: Vec<&String> = fields
        .keys()
        .filter(|field| !readme.contains(&format!("| `{field}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md has no table row for {missing:?}"
    );
}
