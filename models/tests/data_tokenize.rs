//! Tokenization and assistant-only labels on the real SmolLM2, Qwen3 and Llama 3 tokenizers and
//! chat templates, against ids and labels made with transformers (`fixtures/data/tokenized.json`,
//! from `gen_data_fixtures.py`).

use std::path::PathBuf;

use ftrt_models::chat_template::ChatMessage;
use ftrt_models::data::{PromptRenderer, Record};
use serde_json::Value;

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/assets")
}

fn golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tokenized.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn labels(value: &Value) -> Vec<i32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn messages(value: &Value) -> Vec<ChatMessage> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn renderer(name: &str) -> PromptRenderer {
    PromptRenderer::from_dir(&assets().join("tokenizers").join(name)).unwrap()
}

#[test]
fn conversations_match_transformers_ids_and_assistant_labels() {
    let golden = golden();
    for name in ["smollm2", "qwen3", "llama3"] {
        let renderer = renderer(name);
        assert!(
            renderer.chat_template().is_some(),
            "{name} has a chat template"
        );
        for (case, expected) in golden["tokenizers"][name]["chat"].as_object().unwrap() {
            let record = Record::Messages(messages(&expected["messages"]));
            let example = renderer.tokenize(&record, true).unwrap();
            assert_eq!(
                example.input_ids,
                ids(&expected["input_ids"]),
                "{name}/{case} ids"
            );
            assert_eq!(
                example.labels,
                labels(&expected["labels"]),
                "{name}/{case} labels"
            );
        }
    }
}

#[test]
fn alpaca_prompt_matches_transformers_without_template() {
    let golden = golden();
    for name in ["smollm2", "qwen3", "llama3"] {
        let expected = &golden["tokenizers"][name]["alpaca"];
        let record = Record::Alpaca {
            instruction: expected["record"]["instruction"]
                .as_str()
                .unwrap()
                .to_owned(),
            input: String::new(),
            output: expected["record"]["output"].as_str().unwrap().to_owned(),
        };
        let example = renderer(name).tokenize(&record, false).unwrap();
        assert_eq!(example.input_ids, ids(&expected["input_ids"]), "{name} ids");
        assert_eq!(example.labels, labels(&expected["labels"]), "{name} labels");
    }
}

#[test]
fn prompt_ids_end_where_the_assistant_labels_begin() {
    let golden = golden();
    for name in ["smollm2", "qwen3", "llama3"] {
        let expected = &golden["tokenizers"][name]["chat"]["single_turn"];
        let record = Record::Messages(messages(&expected["messages"]));
        let prompt = renderer(name).prompt_ids(&record, true).unwrap();
        let first_label = labels(&expected["labels"])
            .iter()
            .position(|&l| l != -100)
            .unwrap();
        assert_eq!(prompt, ids(&expected["input_ids"])[..first_label], "{name}");
    }
}

#[test]
fn question_answer_rows_become_a_chat_turn_with_the_template() {
    let renderer = renderer("smollm2");
    let record = Record::PromptCompletion {
        prompt: "Calculate 81 + -78.".to_owned(),
        completion: "3".to_owned(),
    };
    let example = renderer.tokenize(&record, true).unwrap();
    let labelled: Vec<u32> = example
        .input_ids
        .iter()
        .zip(&example.labels)
        .filter(|(_, &l)| l != -100)
        .map(|(&id, _)| id)
        .collect();
    let text = renderer.tokenizer().decode(&labelled, false).unwrap();
    assert_eq!(text, "3<|im_end|>");
    let full = renderer
        .tokenizer()
        .decode(&example.input_ids, false)
        .unwrap();
    assert!(full.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
}
