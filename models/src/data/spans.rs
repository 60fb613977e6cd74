//! Locating the assistant turns of a rendered conversation, for assistant-only loss.
//!
//! A turn starts where the conversation before it, rendered with the generation prompt, ends:
//! that rendering must be a prefix of the full conversation's (TRL's prompt/completion split,
//! applied to every assistant turn). The turn ends after its content and the special token
//! that immediately follows it, the template's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`,
//! `<end_of_turn>`, ...), which the model must learn to emit. Text the template puts between
//! the start and the content (a Qwen3 `<think>` block, a channel header) belongs to the turn.
//! When the template changes the content (`trim`, `lstrip`), the trimmed content is looked for.

use std::ops::Range;

use crate::chat_template::{ChatMessage, ChatTemplate};

/// A conversation rendered to text, with the byte ranges of its assistant turns.
pub(super) struct RenderedChat {
    pub text: String,
    pub spans: Vec<Range<usize>>,
}

/// Renders `messages` and finds each assistant turn; `end_markers` are the tokenizer's special
/// token strings.
pub(super) fn render_with_spans(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    end_markers: &[String],
) -> Result<RenderedChat, String> {
    let text = template
        .render(messages, false)
        .map_err(|err| err.to_string())?;
    let mut spans = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let prefix = template
            .render(&messages[..index], true)
            .map_err(|err| format!("rendering the turns before message {index}: {err}"))?;
        if !text.starts_with(&prefix) {
            return Err(format!(
                "the chat template renders the conversation before assistant message {index} \
                 differently from the full conversation, so the turn cannot be located"
            ));
        }
        let start = prefix.len();
        let end = turn_end(&text, start, &message.content, end_markers).ok_or_else(|| {
            format!("the content of assistant message {index} does not appear in the rendered text")
        })?;
        spans.push(start..end);
    }
    Ok(RenderedChat { text, spans })
}

/// End of the turn starting at `start`: after the first occurrence of the content that an end
/// marker follows (marker included), else after the first occurrence.
fn turn_end(text: &str, start: usize, content: &str, end_markers: &[String]) -> Option<usize> {
    let rest = &text[start..];
    let marker_after = |at: usize| {
        end_markers
            .iter()
            .find(|marker| rest[at..].starts_with(marker.as_str()))
            .map(String::len)
    };
    let candidates = [content, content.trim()];
    for needle in candidates {
        if needle.is_empty() {
            continue;
        }
        let ends: Vec<usize> = rest
            .match_indices(needle)
            .map(|(at, found)| at + found.len())
            .collect();
        if let Some(end) = ends
            .iter()
            .find_map(|&end| marker_after(end).map(|len| end + len))
        {
            return Some(start + end);
        }
        if let Some(&end) = ends.first() {
            return Some(start + end);
        }
    }
    content
        .trim()
        .is_empty()
        .then(|| start + marker_after(0).unwrap_or(0))
}
