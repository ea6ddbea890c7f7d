//! The operator's kit under `deploy/` stays true to the code: the example config holds every
//! `Config` field at its built-in default (apart from the deployment paths it names), and the
//! alert rules refer only to metrics the relay exports.

use std::collections::BTreeSet;

use botd_relay::config::Config;

const EXAMPLE: &str = include_str!("../deploy/relay.toml");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");

/// Fields the example sets for a packaged install instead of the built-in default.
const DEPLOYMENT_FIELDS: &[&str] = &["data_dir"];

fn defaults_table() -> toml::Table {
    toml::Table::try_from(Config::default()).expect("config serializes")
}

#[test]
fn example_config_names_every_field() {
    let example: toml::Table = toml::from_str(EXAMPLE).expect("deploy/relay.toml is TOML");
    let defaults = defaults_table();
    let missing: Vec<_> = defaults
        .keys()
        .filter(|k| !example.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/relay.toml lacks {missing:?}; the defaults are:\n{}",
        toml::to_string(&Config::default()).unwrap()
    );
}

#[test]
fn example_config_is_the_defaults_apart_from_deployment_paths() {
    let example: Config = toml::from_str(EXAMPLE).expect("deploy/relay.toml is a valid Config");
    example
        .validate()
        .expect("deploy/relay.toml passes validation");
    let example = toml::Table::try_from(example).unwrap();
    let defaults = defaults_table();
    let differing: Vec<_> = defaults
        .iter()
        .filter(|(key, value)| example.get(*key) != Some(*value))
        .map(|(key, _)| key.as_str())
        .collect();
    assert_eq!(
        differing, DEPLOYMENT_FIELDS,
        "fields of deploy/relay.toml off their defaults"
    );
}

/// Every `botd_…` name in the alert rules is one the relay declares (histograms may add
/// `_bucket`, `_sum`, `_count`).
#[test]
fn alert_rules_use_exported_metrics() {
    let source = include_str!("../src/metrics.rs");
    let declared: BTreeSet<&str> = source
        .split('"')
        .filter(|s| s.starts_with("botd_"))
        .collect();
    let used: BTreeSet<&str> = ALERTS
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|s| s.starts_with("botd_"))
        .collect();
    assert!(used.len() >= 5, "the rules use only {used:?}");
    let unknown: Vec<_> = used
        .iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            !declared.contains(*name) && !declared.contains(base)
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "alert rules use undeclared metrics {unknown:?}"
    );
}
