//! A dataset row parsed into one of the supported forms.

use serde_json::{Map, Value};

use super::DatasetFormat;
use crate::chat_template::ChatMessage;

/// One training row, before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An Alpaca instruction, its optional input and the expected output.
    Alpaca {
        /// The task.
        instruction: String,
        /// Context for the task; empty when absent.
        input: String,
        /// The expected response.
        output: String,
    },
    /// A conversation; the assistant turns are the completions.
    Messages(Vec<ChatMessage>),
    /// A prompt and its completion (`question`/`answer` rows land here too).
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// The expected completion.
        completion: String,
    },
    /// Plain text, trained on entirely.
    Text(String),
}

impl Record {
    /// Parses a row's fields as `format`; the error names the missing or mistyped field.
    pub fn parse(fields: &Map<String, Value>, format: DatasetFormat) -> Result<Self, String> {
        match format {
            DatasetFormat::Alpaca => Ok(Self::Alpaca {
                instruction: string_field(fields, "instruction")?,
                input: optional_string_field(fields, "input")?,
                output: string_field(fields, "output")?,
            }),
            DatasetFormat::Messages => parse_messages(fields),
            DatasetFormat::PromptCompletion => {
                let (prompt, completion) = if fields.contains_key("prompt") {
                    ("prompt", "completion")
                } else {
                    ("question", "answer")
                };
                Ok(Self::PromptCompletion {
                    prompt: string_field(fields, prompt)?,
                    completion: string_field(fields, completion)?,
                })
            }
            DatasetFormat::Text => Ok(Self::Text(string_field(fields, "text")?)),
        }
    }

    /// The row as a user/assistant conversation, or `None` for plain text. Alpaca's input
    /// follows its instruction after a blank line in the user turn.
    pub fn to_chat(&self) -> Option<Vec<ChatMessage>> {
        match self {
            Self::Alpaca {
                instruction,
                input,
                output,
            } => {
                let user = if input.is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                Some(vec![
                    ChatMessage::new("user", user),
                    ChatMessage::new("assistant", output.clone()),
                ])
            }
            Self::Messages(messages) => Some(messages.clone()),
            Self::PromptCompletion { prompt, completion } => Some(vec![
                ChatMessage::new("user", prompt.clone()),
                ChatMessage::new("assistant", completion.clone()),
            ]),
            Self::Text(_) => None,
        }
    }

    /// The expected final answer: the output, the completion, or the last assistant message.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Self::Alpaca { output, .. } => Some(output),
            Self::PromptCompletion { completion, .. } => Some(completion),
            Self::Messages(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "assistant")
                .map(|m| m.content.as_str()),
            Self::Text(_) => None,
        }
    }
}

fn string_field(fields: &Map<String, Value>, name: &str) -> Result<String, String> {
    match fields.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!("field {name:?} must be a string, found {other}")),
        None => Err(format!("missing field {name:?}")),
    }
}

fn optional_string_field(fields: &Map<String, Value>, name: &str) -> Result<String, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(_) => string_field(fields, name),
    }
}

fn parse_messages(fields: &Map<String, Value>) -> Result<Record, String> {
    let Some(Value::Array(items)) = fields.get("messages") else {
        return Err("field \"messages\" must be an array of {role, content} objects".to_owned());
    };
    if items.is_empty() {
        return Err("field \"messages\" is empty".to_owned());
    }
    let messages = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let Value::Object(message) = item else {
                return Err(format!("messages[{index}] is not an object"));
            };
            let role =
                string_field(message, "role").map_err(|e| format!("messages[{index}]: {e}"))?;
            let content =
                string_field(message, "content").map_err(|e| format!("messages[{index}]: {e}"))?;
            Ok(ChatMessage::new(role, content))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Record::Messages(messages))
}
