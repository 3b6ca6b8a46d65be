//! Hostile configuration: the TOML and JSON loaders never panic, whatever
//! the input, and a document that parses but holds a bad value is a
//! `ConfigError` naming the field.
//!
//! Three generators: arbitrary text; valid documents cut, spliced and
//! sprinkled with junk; and valid documents with one field set to a random
//! value of a random type. `cargo fuzz` needs a nightly toolchain, which this
//! machine does not have, so proptest does the fuzzing; it runs in every
//! `cargo test` (a few seconds) and longer with
//! `FUZZ_CASES=100000 cargo test --release --test config_fuzz`.

use bergtalzug::prelude::*;
use proptest::prelude::*;
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400)
}

fn valid() -> Value {
    json!({
        "pipeline_name": "fuzzed",
        "queue_refresh_rate": 0.5,
        "stats_interval_seconds": 0,
        "enable_tracking": true,
        "retain_results": false,
        "stages": [
            {"name": "fetch", "execution_type": "async", "workers": 10, "queue_size": 100,
             "timeout": 30.0,
             "retry": {"max_attempts": 3, "initial_delay": 0.05, "multiplier": 2.0,
                       "max_delay": 5.0, "jitter": 0.2}},
            {"name": "parse", "execution_type": "thread", "workers": 2, "queue_size": 50,
             "restart_budget": {"max_restarts": 5, "window": 60.0}},
            {"name": "crunch", "execution_type": "interpreter", "workers": 2}
        ]
    })
}

/// Parses `text` both ways it could be meant; neither may panic.
fn load(
    text: &str,
) -> (
    Result<PipelineConfig, ConfigError>,
    Result<PipelineConfig, ConfigError>,
) {
    (
        PipelineConfig::from_toml_str(text),
        PipelineConfig::from_json_str(text),
    )
}

/// Every error explains itself.
fn explained(result: &Result<PipelineConfig, ConfigError>) {
    if let Err(e) = result {
        assert!(!e.to_string().trim().is_empty(), "{e:?}");
    }
}

/// Every place a value can go, as a JSON pointer into [`valid`].
const FIELDS: &[&str] = &[
    "/pipeline_name",
    "/queue_refresh_rate",
    "/stats_interval_seconds",
    "/enable_tracking",
    "/retain_results",
    "/stages",
    "/stages/0",
    "/stages/0/name",
    "/stages/0/execution_type",
    "/stages/0/workers",
    "/stages/0/queue_size",
    "/stages/0/timeout",
    "/stages/0/retry",
    "/stages/0/retry/max_attempts",
    "/stages/0/retry/initial_delay",
    "/stages/0/retry/multiplier",
    "/stages/0/retry/max_delay",
    "/stages/0/retry/jitter",
    "/stages/1/restart_budget",
    "/stages/1/restart_budget/max_restarts",
    "/stages/1/restart_budget/window",
    "/stages/2/name",
    "/stages/2/workers",
];

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        prop_oneof![Just(0.0), Just(-1.0), Just(1e300), Just(0.5), Just(2.0)].prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("created"),
            Just("async"),
            Just("process"),
            Just("fetch"),
            Just("")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        let (toml, json) = load(&text);
        explained(&toml);
        explained(&json);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let (toml, json) = load(&String::from_utf8_lossy(&bytes));
        explained(&toml);
        explained(&json);
    }

    #[test]
    fn mutated_documents_never_panic(
        toml_form in any::<bool>(),
        cut in (0.0f64..1.0, 0usize..40),
        junk in "[\\[\\]{}=,.:\"'#\\n a-z0-9-]{0,12}",
        at in 0.0f64..1.0,
        twice in any::<bool>(),
    ) {
        let mut text = if toml_form {
            toml::to_string(&valid()).unwrap()
        } else {
            serde_json::to_string_pretty(&valid()).unwrap()
        };
        let chars: Vec<char> = text.chars().collect();
        let start = (cut.0 * chars.len() as f64) as usize;
        let end = (start + cut.1).min(chars.len());
        let mut chars: Vec<char> = chars[..start].iter().chain(&chars[end..]).copied().collect();
        let at = (at * chars.len() as f64) as usize;
        chars.splice(at..at, junk.chars());
        text = chars.into_iter().collect();
        if twice {
            text = format!("{text}\n{text}");
        }
        let (toml, json) = load(&text);
        explained(&toml);
        explained(&json);
    }

    #[test]
    fn a_bad_value_names_its_field(field in prop::sample::select(FIELDS), value in any_value(), toml_form in any::<bool>()) {
        let mut doc = valid();
        *doc.pointer_mut(field).unwrap() = value;
        let text = if toml_form {
            // TOML has no null; a value TOML cannot hold is JSON's to test.
            match toml::to_string(&doc) {
                Ok(text) => text,
                Err(_) => return Ok(()),
            }
        } else {
            doc.to_string()
        };
        let result = if toml_form {
            PipelineConfig::from_toml_str(&text)
        } else {
            PipelineConfig::from_json_str(&text)
        };
        let key = field.rsplit('/').find(|p| p.parse::<usize>().is_err()).unwrap();
        match result {
            Ok(config) => {
                // Accepted: then it is valid and survives a round trip
                // (durations as float seconds, so not always to the nanosecond).
                config.validate().unwrap();
                let again = serde_json::to_string(&config).unwrap();
                let back = PipelineConfig::from_json_str(&again).unwrap();
                prop_assert_eq!(back.stages.len(), config.stages.len());
                prop_assert_eq!(&back.pipeline_name, &config.pipeline_name);
            }
            Err(ConfigError::Parse { field: Some(named), .. }) => {
                prop_assert!(
                    named.contains(key) || key == "stages",
                    "{} named `{}` for a bad {}", text, named, field
                );
            }
            Err(ConfigError::Parse { field: None, message, .. }) => {
                // Only a whole-document problem may go without a field.
                prop_assert!(false, "no field named for a bad {}: {} ({})", field, message, text);
            }
            Err(ConfigError::Invalid { field: named, .. })
            | Err(ConfigError::InvalidStage { field: named, .. }) => {
                prop_assert!(
                    named.contains(key) || ["name", "stages"].contains(&named.as_str()),
                    "named `{}` for a bad {}", named, field
                );
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }
}
