//! Renders every golden case in `fixtures/chat/` (made by `gen_chat_fixtures.py` with Hugging
//! Face transformers) and compares the text byte for byte, or the error for cases where the
//! template itself raises.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ftrt_models::chat_template::{ChatTemplate, Clock, RenderOptions, Value};
use serde::Deserialize;

/// `gen_chat_fixtures.py`'s FIXED_NOW, 2025-03-07T14:05:09, in seconds since the epoch (UTC).
const FIXED_NOW: i64 = 1_741_356_309;

#[derive(Deserialize)]
struct Golden {
    now: String,
    template: String,
    special_tokens: BTreeMap<String, String>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<Value>,
    add_generation_prompt: bool,
    tools: Option<Value>,
    /// A map of extra template variables, in order.
    extra: Value,
    expected: Option<String>,
    error: Option<String>,
}

fn golden_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures/chat exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

/// Checks one case; returns a description of the mismatch, if any.
fn check(template: &ChatTemplate, case: &Case) -> Option<String> {
    let options = RenderOptions {
        add_generation_prompt: case.add_generation_prompt,
        tools: case.tools.clone(),
        documents: None,
        extra: case
            .extra
            .try_iter()
            .unwrap()
            .map(|key| (key.to_string(), case.extra.get_item(&key).unwrap()))
            .collect(),
    };
    let rendered = template.render_values(&case.messages, &options);
    match (&case.expected, &case.error, rendered) {
        (Some(expected), _, Ok(text)) if *expected == text => None,
        (Some(expected), _, Ok(text)) => Some(format!("expected\n{expected:?}\ngot\n{text:?}")),
        (Some(_), _, Err(err)) => Some(format!("unexpected error: {err}")),
        (None, Some(message), Err(err)) if err.to_string().contains(message.as_str()) => None,
        (None, Some(message), Err(err)) => Some(format!("error {err} lacks {message:?}")),
        (None, Some(message), Ok(text)) => {
            Some(format!("expected error {message:?}, got {text:?}"))
        }
        (None, None, _) => Some("golden has neither expected nor error".to_owned()),
    }
}

#[test]
fn renders_like_transformers() {
    let files = golden_files();
    assert!(
        files.len() >= 13,
        "expected the 13 golden files, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let golden: Golden = serde_json::from_str(&text).unwrap();
        assert_eq!(golden.now, "2025-03-07T14:05:09");
        let template = ChatTemplate::with_clock(
            &golden.template,
            golden.special_tokens.clone(),
            Clock::Fixed(FIXED_NOW),
        )
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        for case in &golden.cases {
            checked += 1;
            if let Some(problem) = check(&template, case) {
                let file = path.file_name().unwrap().to_string_lossy();
                failures.push(format!("{file} / {}: {problem}", case.name));
            }
        }
    }
    assert!(checked >= 13 * 13);
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
