//! The settings loader on arbitrary TOML text, with environment overrides taken from the lines
//! after a `---` line (`SEGMENTER__SECTION__KEY=value`): every problem is an error with a
//! position inside the text, never a panic; valid settings give a working decoder.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use segmenter::settings::load_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (config, env_text) = text.split_once("\n---\n").unwrap_or((text, ""));
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    match load_str("fuzz.toml", config, Path::new("/nonexistent/fuzz"), &env) {
        Ok(settings) => {
            let decoder = settings.input_decoder();
            let _ = decoder.decode(
                br#"{"type":"track","event":"X","userId":"u","timestamp":"2026-01-01T00:00:00Z"}"#,
            );
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without a problem");
            let lines = config.lines().count() + 1;
            for error in &errors.0 {
                if let Some((line, column)) = error.position {
                    if error.file == "fuzz.toml" {
                        assert!(
                            line >= 1 && line <= lines,
                            "line {line} of {lines}: {error}"
                        );
                        assert!(column >= 1, "{error}");
                    }
                }
                let _ = error.to_string();
            }
        }
    }
});
