//! Turning records into token ids and labels: the tokenizer, the optional chat template, and
//! the end-of-sequence token.
//!
//! Choice of prompt: like TRL, a model with a chat template gets instruction data (alpaca,
//! prompt/completion) as a user turn and an assistant turn rendered through the template,
//! so fine-tuning teaches the format the model is prompted with at inference; without a
//! template (or with `use_chat_template` off) the standard Alpaca prompt is used. Conversations
//! need a template. Chat text is tokenized without added special tokens (the template writes
//! them, as `apply_chat_template(tokenize=True)` does); plain prompts are tokenized with them
//! (a BOS where the tokenizer's post-processor adds one) and end with the EOS token.

use std::ops::Range;
use std::path::Path;

use tokenizers::{Encoding, Tokenizer};

use super::spans::render_with_spans;
use super::{DataError, Example, Record, IGNORE_INDEX};
use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::checkpoint::LoadedModel;
use std::collections::BTreeMap;

/// Opening of Stanford Alpaca's prompt for an instruction with an input.
const ALPACA_INTRO_WITH_INPUT: &str = "Below is an instruction that describes a task, paired \
with an input that provides further context. Write a response that appropriately completes the \
request.\n\n";

/// Opening of Stanford Alpaca's prompt for an instruction alone.
const ALPACA_INTRO_NO_INPUT: &str = "Below is an instruction that describes a task. Write a \
response that appropriately completes the request.\n\n";

/// Tokenizer, chat template and EOS token of one model.
pub struct PromptRenderer {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    eos: Option<(String, u32)>,
    special_tokens: Vec<String>,
}

impl PromptRenderer {
    /// Wraps a tokenizer, an optional chat template, and the EOS token string (ignored when the
    /// vocabulary lacks it).
    pub fn new(
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        eos_token: Option<&str>,
    ) -> Self {
        let eos = eos_token.and_then(|t| tokenizer.token_to_id(t).map(|id| (t.to_owned(), id)));
        let mut special_tokens: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|token| token.special)
            .map(|token| token.content)
            .collect();
        // Longest first, so a marker never matches as the prefix of a longer one.
        special_tokens.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Self {
            tokenizer,
            template,
            eos,
            special_tokens,
        }
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (chat template, EOS)
    /// from a Hugging Face model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|err| DataError::Tokenizer {
                path: tokenizer_path,
                reason: err.to_string(),
            })?;
        let config_path = dir.join("tokenizer_config.json");
        if !config_path.exists() {
            return Ok(Self::new(tokenizer, None, None));
        }
        let template = ChatTemplate::from_tokenizer_config(&config_path)?;
        let eos = crate::chat_template::read_special_tokens(&config_path)?.remove("eos_token");
        Ok(Self::new(tokenizer, template, eos.as_deref()))
    }

    /// The tokenizer, chat template (with its bos/eos strings) and EOS of an opened checkpoint
    /// (Hugging Face folder or GGUF).
    pub fn of_model(loaded: &LoadedModel) -> Result<Self, String> {
        let tc = &loaded.tokenizer_config;
        let special: BTreeMap<String, String> =
            [("bos_token", &tc.bos_token), ("eos_token", &tc.eos_token)]
                .into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k.to_owned(), v)))
                .collect();
        let template = tc
            .chat_template
            .as_deref()
            .map(|src| ChatTemplate::new(src, special))
            .transpose()
            .map_err(|e| format!("chat template: {e}"))?;
        Ok(Self::new(
            loaded.tokenizer.clone(),
            template,
            tc.eos_token.as_deref(),
        ))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The EOS token id, if known.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(_, id)| *id)
    }

    /// The chat template and conversation to render `record` with, when that path applies.
    fn chat(
        &self,
        record: &Record,
        use_chat_template: bool,
    ) -> Option<(&ChatTemplate, Vec<ChatMessage>)> {
        let template = self.template.as_ref().filter(|_| use_chat_template)?;
        Some((template, record.to_chat()?))
    }

    /// Token ids and labels of `record`: loss on the assistant turns, the output/completion
    /// (and EOS), or all of a plain text.
    pub fn tokenize(&self, record: &Record, use_chat_template: bool) -> Result<Example, String> {
        if let Some((template, chat)) = self.chat(record, use_chat_template) {
            let rendered = render_with_spans(template, &chat, &self.special_tokens)?;
            return self.encode_with_spans(&rendered.text, &rendered.spans, false);
        }
        let (prompt, completion) = plain_prompt(record)?;
        let text = format!("{prompt}{completion}");
        let mut example = self.encode_with_spans(
            &text,
            std::slice::from_ref(&(prompt.len()..text.len())),
            true,
        )?;
        if let Some((_, eos)) = &self.eos {
            if example.input_ids.last() != Some(eos) {
                example.input_ids.push(*eos);
                example.labels.push(*eos as i32);
            }
        }
        Ok(example)
    }

    /// Token ids of the prompt that should make the model produce `record`'s reference
    /// answer: the conversation up to its last assistant turn with the generation prompt, or
    /// the Alpaca prompt.
    pub fn prompt_ids(&self, record: &Record, use_chat_template: bool) -> Result<Vec<u32>, String> {
        if let Some((template, mut chat)) = self.chat(record, use_chat_template) {
            if let Some(last) = chat.iter().rposition(|m| m.role == "assistant") {
                chat.truncate(last);
            }
            let text = template.render(&chat, true).map_err(|e| e.to_string())?;
            return self.encode(&text, false).map(|e| e.get_ids().to_vec());
        }
        let (prompt, _) = plain_prompt(record)?;
        self.encode(&prompt, true).map(|e| e.get_ids().to_vec())
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding, String> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|err| format!("tokenizer: {err}"))
    }

    /// Encodes `text`; a token is labelled when its bytes overlap one of `spans` (the rule
    /// transformers uses for `return_assistant_tokens_mask`).
    fn encode_with_spans(
        &self,
        text: &str,
        spans: &[Range<usize>],
        add_special_tokens: bool,
    ) -> Result<Example, String> {
        let encoding = self.encode(text, add_special_tokens)?;
        let input_ids = encoding.get_ids().to_vec();
        let offsets = encoding.get_offsets();
        let labels = input_ids
            .iter()
            .zip(offsets)
            .map(|(&id, &(start, end))| {
                let inside = spans
                    .iter()
                    .any(|span| end > span.start && start < span.end);
                if inside {
                    id as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Ok(Example { input_ids, labels })
    }
}

/// Prompt and completion of a record without a chat template: the Alpaca prompt for
/// instructions and prompt/completion pairs, an empty prompt for plain text.
fn plain_prompt(record: &Record) -> Result<(String, String), String> {
    match record {
        Record::Alpaca {
            instruction,
            input,
            output,
        } => Ok((alpaca_prompt(instruction, input), output.clone())),
        Record::PromptCompletion { prompt, completion } => {
            Ok((alpaca_prompt(prompt, ""), completion.clone()))
        }
        Record::Messages(_) => {
            Err("a messages dataset needs a model with a chat template".to_owned())
        }
        Record::Text(text) => Ok((String::new(), text.clone())),
    }
}

/// Stanford Alpaca's prompt, with or without the input section.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("{ALPACA_INTRO_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!(
            "{ALPACA_INTRO_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n\
             ### Response:\n"
        )
    }
}
