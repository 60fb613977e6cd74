//! From user text to prompt token ids, as transformers does it: the chat template rendered with
//! `add_generation_prompt=True` and encoded without adding special tokens (the template writes
//! them), or, without a template, the raw text encoded with the tokenizer's special tokens.

use std::collections::BTreeMap;

use super::LlamaError;
use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::checkpoint::LoadedModel;

/// How a prompt is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// One user message (or raw text when the chat template is off).
    Text(String),
    /// A whole conversation (role, content), rendered by the chat template.
    Messages(Vec<ChatMessage>),
}

/// The chat template of a loaded checkpoint, with its special tokens, if it has one.
pub fn chat_template_of(m: &LoadedModel) -> Result<Option<ChatTemplate>, LlamaError> {
    let Some(source) = m.tokenizer_config.chat_template.as_deref() else {
        return Ok(None);
    };
    let mut special = BTreeMap::new();
    if let Some(b) = &m.tokenizer_config.bos_token {
        special.insert("bos_token".to_string(), b.clone());
    }
    if let Some(e) = &m.tokenizer_config.eos_token {
        special.insert("eos_token".to_string(), e.clone());
    }
    ChatTemplate::new(source, special)
        .map(Some)
        .map_err(|e| LlamaError::Input(format!("{}: {e}", m.path.display())))
}

/// The text the model sees for `prompt` (the rendered template, or the raw text).
pub fn render_prompt(
    m: &LoadedModel,
    template: Option<&ChatTemplate>,
    prompt: &Prompt,
) -> Result<String, LlamaError> {
    match (template, prompt) {
        (Some(t), Prompt::Text(s)) => t
            .render(&[ChatMessage::new("user", s.as_str())], true)
            .map_err(|e| LlamaError::Input(e.to_string())),
        (Some(t), Prompt::Messages(ms)) => t.render(ms, true).map_err(|e| LlamaError::Input(e.to_string())),
        (None, Prompt::Text(s)) => Ok(s.clone()),
        (None, Prompt::Messages(_)) => Err(LlamaError::Input(format!(
            "{}: a messages prompt needs a chat template (this checkpoint has none, or it was turned off)",
            m.path.display()
        ))),
    }
}

/// Token ids of `prompt`: with a template, the rendered text without added special tokens;
/// without one, the text with the tokenizer's special tokens (e.g. a leading bos).
pub fn encode_prompt(
    m: &LoadedModel,
    template: Option<&ChatTemplate>,
    prompt: &Prompt,
) -> Result<Vec<u32>, LlamaError> {
    let text = render_prompt(m, template, prompt)?;
    let enc = m
        .tokenizer
        .encode(text.as_str(), template.is_none())
        .map_err(|e| LlamaError::Input(format!("cannot tokenize the prompt: {e}")))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        return Err(LlamaError::Input("the prompt encodes to no tokens".into()));
    }
    Ok(ids)
}

/// Text of generated ids, special tokens (eos) skipped.
pub fn decode_text(m: &LoadedModel, ids: &[u32]) -> Result<String, LlamaError> {
    m.tokenizer
        .decode(ids, true)
        .map_err(|e| LlamaError::Input(format!("cannot decode tokens: {e}")))
}

/// Prompts of a JSONL file, one per non-blank line: a JSON string, or an object with
/// `"messages"` ([{role, content}, ...]), `"prompt"`, `"text"`, or `"instruction"` (plus an
/// optional `"input"`, joined by a blank line). Errors name the line.
pub fn parse_prompts_jsonl(text: &str) -> Result<Vec<Prompt>, LlamaError> {
    use serde_json::Value;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| LlamaError::Input(format!("line {}: {why}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let str_of = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let p = if let Some(s) = v.as_str() {
            Prompt::Text(s.to_string())
        } else if let Some(ms) = v.get("messages") {
            let arr = ms
                .as_array()
                .ok_or_else(|| bad("\"messages\" must be a list"))?;
            let mut msgs = Vec::with_capacity(arr.len());
            for m in arr {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a message lacks a string \"role\""))?;
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a message lacks a string \"content\""))?;
                msgs.push(ChatMessage::new(role, content));
            }
            if msgs.is_empty() {
                return Err(bad("\"messages\" is empty"));
            }
            Prompt::Messages(msgs)
        } else if let Some(s) = str_of("prompt").or_else(|| str_of("text")) {
            Prompt::Text(s)
        } else if let Some(ins) = str_of("instruction") {
            match str_of("input").filter(|s| !s.is_empty()) {
                Some(inp) => Prompt::Text(format!("{ins}\n\n{inp}")),
                None => Prompt::Text(ins),
            }
        } else {
            return Err(bad("expected a string or an object with \"messages\", \"prompt\", \"text\" or \"instruction\""));
        };
        out.push(p);
    }
    if out.is_empty() {
        return Err(LlamaError::Input("no prompts in the file".into()));
    }
    Ok(out)
}
