//! Reading a dataset file into JSON objects with their line numbers: a JSON array of objects,
//! or JSON Lines (one object per line, blank lines skipped). The first non-blank character
//! decides: `[` is an array, anything else is JSON Lines.

use std::path::Path;

use serde_json::{Map, Value};

use super::DataError;

/// One row of a dataset file.
pub(super) struct Row {
    /// 1-based line where the row starts.
    pub line: usize,
    /// The row's fields.
    pub fields: Map<String, Value>,
}

/// Reads every row of `path`.
pub(super) fn read_rows(path: &Path) -> Result<Vec<Row>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|err| DataError::Io {
        path: path.to_owned(),
        reason: err.to_string(),
    })?;
    let rows = if text.trim_start().starts_with('[') {
        read_array(path, &text)?
    } else {
        read_lines(path, &text)?
    };
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(rows)
}

fn malformed(path: &Path, line: usize, reason: impl Into<String>) -> DataError {
    DataError::Malformed {
        path: path.to_owned(),
        line,
        reason: reason.into(),
    }
}

fn object(path: &Path, line: usize, value: Value) -> Result<Row, DataError> {
    match value {
        Value::Object(fields) => Ok(Row { line, fields }),
        other => Err(malformed(
            path,
            line,
            format!("expected a JSON object, found {}", kind(&other)),
        )),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_lines(path: &Path, text: &str) -> Result<Vec<Row>, DataError> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|err| malformed(path, index + 1, format!("invalid JSON: {err}")))?;
        rows.push(object(path, index + 1, value)?);
    }
    Ok(rows)
}

fn read_array(path: &Path, text: &str) -> Result<Vec<Row>, DataError> {
    let values: Vec<&serde_json::value::RawValue> = serde_json::from_str(text)
        .map_err(|err| malformed(path, err.line(), format!("invalid JSON array: {err}")))?;
    values
        .into_iter()
        .map(|raw| {
            let line = line_of(text, raw.get());
            let value: Value = serde_json::from_str(raw.get())
                .map_err(|err| malformed(path, line, format!("invalid JSON: {err}")))?;
            object(path, line, value)
        })
        .collect()
}

/// The 1-based line on which `slice` (a sub-slice of `text`) starts.
fn line_of(text: &str, slice: &str) -> usize {
    let offset = (slice.as_ptr() as usize).saturating_sub(text.as_ptr() as usize);
    text[..offset.min(text.len())].matches('\n').count() + 1
}
