//! Hugging Face chat templates, rendered with `minijinja` the way transformers'
//! `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders them.
//!
//! transformers compiles templates in a Jinja2 sandbox with `trim_blocks`, `lstrip_blocks` and
//! loop controls, replaces `tojson` with `json.dumps` (no HTML escaping), and adds the globals
//! `raise_exception`, `strftime_now`, `dict` and `namespace`. The render context holds the
//! tokenizer's named special tokens (`bos_token`, `eos_token`, ...), `messages`, `tools`,
//! `documents`, `add_generation_prompt` and any extra keyword arguments. Messages are normalised
//! first: keys whose value is null are dropped, and a message's reasoning (`reasoning_content`,
//! `thinking` or `reasoning`) is copied to both `thinking` and `reasoning_content`.
//!
//! Python string methods (`strip`, `split`, `startswith`, `items`, ...) come from
//! `minijinja_contrib::pycompat`; printed values follow Python's `str()` (`None`, `True`,
//! `['a']`). Known gaps against Jinja2: the `~` operator and the `string` filter still print
//! minijinja's spelling of `none`/booleans, and `strftime_now` reads the clock in UTC rather than
//! the local time zone.

mod pyjson;
mod pystr;
mod strftime;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

pub use minijinja::Value;

/// The named special tokens transformers passes to every template (its `special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Message keys that carry a model's reasoning, in transformers' order of preference.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// Name of the single template held by each environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Where `strftime_now` takes the current time from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// The system clock, read in UTC.
    System,
    /// A fixed instant, in seconds since the Unix epoch (UTC): makes renders reproducible.
    Fixed(i64),
}

impl Clock {
    fn now(self) -> i64 {
        match self {
            Clock::Fixed(seconds) => seconds,
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs() as i64),
        }
    }
}

/// One chat message with plain text content, the common case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// The message as a template value: `{"role": ..., "content": ...}`.
    pub fn to_value(&self) -> Value {
        Value::from_pairs([
            ("role", self.role.as_str()),
            ("content", self.content.as_str()),
        ])
    }
}

/// Everything besides the messages that `apply_chat_template` can pass to a template.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the header that starts the assistant's reply.
    pub add_generation_prompt: bool,
    /// Tool schemas (JSON), or `None`.
    pub tools: Option<Value>,
    /// Documents for retrieval templates, or `None`.
    pub documents: Option<Value>,
    /// Extra template variables (`enable_thinking`, `date_string`, ...); they override special
    /// tokens of the same name, as keyword arguments do in transformers.
    pub extra: Vec<(String, Value)>,
}

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The tokenizer config could not be read or parsed.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The template does not compile.
    #[error("chat template does not compile: {0:#}")]
    Syntax(Error),
    /// Rendering failed, including a template's own `raise_exception(...)`.
    #[error("chat template failed to render: {0:#}")]
    Render(Error),
}

/// A compiled chat template plus the special tokens its tokenizer defines.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: Arc<str>,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` with transformers' environment; `special_tokens` maps names such as
    /// `bos_token` to token strings. `strftime_now` uses the system clock.
    pub fn new(
        source: &str,
        special_tokens: BTreeMap<String, String>,
    ) -> Result<Self, ChatTemplateError> {
        Self::with_clock(source, special_tokens, Clock::System)
    }

    /// Like [`ChatTemplate::new`], with `strftime_now` reading `clock`.
    pub fn with_clock(
        source: &str,
        special_tokens: BTreeMap<String, String>,
        clock: Clock,
    ) -> Result<Self, ChatTemplateError> {
        let source: Arc<str> = Arc::from(source);
        let env = build_environment(source.clone(), clock).map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
            source,
            special_tokens,
        })
    }

    /// Reads the template and special tokens from a `tokenizer_config.json`. Returns `Ok(None)`
    /// when the config has no `chat_template`. A list of named templates selects `default`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let config = read_config(path)?;
        let Some(source) = template_source(&config) else {
            return Ok(None);
        };
        Self::new(&source, special_tokens_of(&config)).map(Some)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A named special token (`bos_token`, `eos_token`, ...), if the tokenizer defines it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).map(String::as_str)
    }

    /// Renders plain text messages, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let messages: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        let options = RenderOptions {
            add_generation_prompt,
            ..RenderOptions::default()
        };
        self.render_values(&messages, &options)
    }

    /// Renders arbitrary message objects (tool calls, reasoning, content blocks) with options.
    pub fn render_values(
        &self,
        messages: &[Value],
        options: &RenderOptions,
    ) -> Result<String, ChatTemplateError> {
        let mut context: Vec<(Value, Value)> = Vec::new();
        for (name, token) in &self.special_tokens {
            upsert(
                &mut context,
                Value::from(name.as_str()),
                Value::from(token.as_str()),
            );
        }
        for (name, value) in &options.extra {
            upsert(&mut context, Value::from(name.as_str()), value.clone());
        }
        let messages: Vec<Value> = messages.iter().map(normalize_message).collect();
        upsert(&mut context, Value::from("messages"), Value::from(messages));
        upsert(
            &mut context,
            Value::from("tools"),
            option_value(&options.tools),
        );
        upsert(
            &mut context,
            Value::from("documents"),
            option_value(&options.documents),
        );
        upsert(
            &mut context,
            Value::from("add_generation_prompt"),
            Value::from(options.add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Syntax)?;
        template
            .render(Value::from_pairs(context))
            .map_err(ChatTemplateError::Render)
    }
}

/// An optional value as the template sees it: absent is Python's `None`.
fn option_value(value: &Option<Value>) -> Value {
    value.clone().unwrap_or(Value::from(()))
}

/// The environment transformers' `_compile_jinja_template` builds, holding `source`.
fn build_environment(source: Arc<str>, clock: Clock) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        out.write_str(&pystr::python_str(value))
            .map_err(Error::from)
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", move |format: &str| {
        strftime::format_utc(clock.now(), format)
    });
    env.add_template_owned(TEMPLATE_NAME, source.to_string())?;
    Ok(env)
}

/// `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// i.e. Python's `json.dumps` with those arguments.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut params: [Value; 4] = Default::default();
    for (slot, arg) in params.iter_mut().zip(args.iter()) {
        *slot = arg.clone();
    }
    for (slot, name) in params.iter_mut().zip(NAMES) {
        if let Some(value) = kwargs.get::<Option<Value>>(name)? {
            *slot = value;
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;
    let options =
        pyjson::DumpOptions::from_values(&ensure_ascii, &indent, &separators, &sort_keys)?;
    pyjson::dumps(value, &options).map(Value::from)
}

/// transformers' message normalisation: drop null-valued keys, alias the reasoning fields.
fn normalize_message(message: &Value) -> Value {
    if message.kind() != ValueKind::Map {
        return message.clone();
    }
    let mut entries: Vec<(Value, Value)> = Vec::new();
    if let Ok(keys) = message.try_iter() {
        for key in keys {
            let value = message.get_item(&key).unwrap_or_default();
            if !value.is_none() && !value.is_undefined() {
                entries.push((key, value));
            }
        }
    }
    let reasoning = REASONING_FIELDS
        .iter()
        .find_map(|field| entries.iter().find(|(key, _)| key.as_str() == Some(field)))
        .map(|(_, value)| value.clone());
    // Python's `{"thinking": r, **message, "reasoning_content": r}`.
    let mut normalized: Vec<(Value, Value)> = Vec::new();
    if let Some(reasoning) = &reasoning {
        upsert(&mut normalized, Value::from("thinking"), reasoning.clone());
    }
    for (key, value) in entries {
        upsert(&mut normalized, key, value);
    }
    if let Some(reasoning) = reasoning {
        upsert(&mut normalized, Value::from("reasoning_content"), reasoning);
    }
    Value::from_pairs(normalized)
}

/// Python's `dict[key] = value` on an insertion-ordered list of entries.
fn upsert(entries: &mut Vec<(Value, Value)>, key: Value, value: Value) {
    match entries.iter_mut().find(|(existing, _)| *existing == key) {
        Some(entry) => entry.1 = value,
        None => entries.push((key, value)),
    }
}

/// The named special tokens (`bos_token`, `eos_token`, ...) of a `tokenizer_config.json`.
pub fn read_special_tokens(path: &Path) -> Result<BTreeMap<String, String>, ChatTemplateError> {
    read_config(path).map(|config| special_tokens_of(&config))
}

/// Reads a JSON config file.
fn read_config(path: &Path) -> Result<serde_json::Value, ChatTemplateError> {
    let config_error = |reason: String| ChatTemplateError::Config {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| config_error(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| config_error(format!("invalid JSON: {e}")))
}

/// The template text of a tokenizer config: a string, or the `default` of a named list.
fn template_source(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(source) => Some(source.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// The named special tokens of a tokenizer config; each is a string or an `AddedToken` object.
fn special_tokens_of(config: &serde_json::Value) -> BTreeMap<String, String> {
    SPECIAL_TOKEN_NAMES
        .iter()
        .filter_map(|name| {
            let token = match config.get(*name)? {
                serde_json::Value::String(token) => token.clone(),
                serde_json::Value::Object(added) => added.get("content")?.as_str()?.to_owned(),
                _ => return None,
            };
            Some((name.to_string(), token))
        })
        .collect()
}
