//! The dataset forms, and detecting one from a row's keys.

use std::str::FromStr;

use super::DataError;

/// How a dataset's rows are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// `{"instruction", "input"?, "output"}` (Stanford Alpaca).
    Alpaca,
    /// `{"messages": [{"role", "content"}, ...]}`, rendered through the chat template.
    Messages,
    /// `{"prompt", "completion"}`, or `{"question", "answer"}`.
    PromptCompletion,
    /// `{"text"}`: language modelling on the whole text.
    Text,
}

impl DatasetFormat {
    /// The supported forms and their keys, for error messages.
    pub const SUPPORTED: &'static str = "alpaca {instruction, input?, output}, messages \
        {messages: [{role, content}]}, prompt-completion {prompt, completion} or {question, \
        answer}, text {text}";

    /// The form whose keys `keys` holds, trying messages, alpaca, prompt/completion, then text.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> Option<Self> {
        let has = |name: &str| keys.clone().into_iter().any(|key| key == name);
        if has("messages") {
            Some(Self::Messages)
        } else if has("instruction") && has("output") {
            Some(Self::Alpaca)
        } else if (has("prompt") && has("completion")) || (has("question") && has("answer")) {
            Some(Self::PromptCompletion)
        } else if has("text") {
            Some(Self::Text)
        } else {
            None
        }
    }
}

impl FromStr for DatasetFormat {
    type Err = DataError;

    /// Parses `alpaca`, `messages`, `prompt-completion` or `text`.
    fn from_str(name: &str) -> Result<Self, DataError> {
        match name {
            "alpaca" => Ok(Self::Alpaca),
            "messages" | "chat" => Ok(Self::Messages),
            "prompt-completion" | "prompt_completion" => Ok(Self::PromptCompletion),
            "text" => Ok(Self::Text),
            other => Err(DataError::FormatName {
                name: other.to_owned(),
            }),
        }
    }
}
