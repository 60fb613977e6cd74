//! Python's `json.dumps`, the `tojson` filter transformers installs in its template environment.

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

/// Names Python uses for non-finite floats (`json.dumps` and `repr` spell them differently).
pub(super) trait NonFiniteNames {
    /// Not-a-number.
    fn nan(&self) -> &'static str;
    /// Positive infinity; negative infinity is this with a leading `-`.
    fn infinity(&self) -> &'static str;
}

/// `json.dumps`' spelling: `NaN`, `Infinity`.
struct JsonNames;

impl NonFiniteNames for JsonNames {
    fn nan(&self) -> &'static str {
        "NaN"
    }
    fn infinity(&self) -> &'static str {
        "Infinity"
    }
}

/// The keyword arguments of `json.dumps` that transformers' `tojson` forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DumpOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl DumpOptions {
    /// Reads the filter's arguments; `none`/undefined means the Python default.
    pub(super) fn from_values(
        ensure_ascii: &Value,
        indent: &Value,
        separators: &Value,
        sort_keys: &Value,
    ) -> Result<Self, Error> {
        let indent = if is_absent(indent) {
            None
        } else if let Some(text) = indent.as_str() {
            Some(text.to_owned())
        } else {
            let width = i64::try_from(indent.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson indent must be an integer or string",
                )
            })?;
            Some(" ".repeat(width.max(0) as usize))
        };
        let (item_separator, key_separator) = if is_absent(separators) {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_owned(), ": ".to_owned())
        } else {
            let parts: Vec<String> = separators
                .try_iter()
                .map(|items| {
                    items
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be two strings",
                    ))
                }
            }
        };
        Ok(Self {
            ensure_ascii: !is_absent(ensure_ascii) && ensure_ascii.is_true(),
            indent,
            item_separator,
            key_separator,
            sort_keys: !is_absent(sort_keys) && sort_keys.is_true(),
        })
    }
}

fn is_absent(value: &Value) -> bool {
    value.is_none() || value.is_undefined()
}

/// `json.dumps(value, **options)`.
pub(super) fn dumps(value: &Value, options: &DumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, options, 0)?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    options: &DumpOptions,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number(value)),
        ValueKind::String => write_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(
                out,
                ('[', ']'),
                items.len(),
                options,
                depth,
                |out, index| write_value(out, &items[index], options, depth + 1),
            )?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((key_string(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                ('{', '}'),
                entries.len(),
                options,
                depth,
                |out, index| {
                    let (key, item) = &entries[index];
                    write_string(out, key, options.ensure_ascii);
                    out.push_str(&options.key_separator);
                    write_value(out, item, options, depth + 1)
                },
            )?;
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {} is not JSON serializable", value.kind()),
            ))
        }
    }
    Ok(())
}

/// Writes `[...]`/`{...}` with `count` items, indented the way `json.dumps` indents.
fn write_container(
    out: &mut String,
    (open, close): (char, char),
    count: usize,
    options: &DumpOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if count == 0 {
        out.push(close);
        return Ok(());
    }
    let inner_newline = options
        .indent
        .as_ref()
        .map(|unit| format!("\n{}", unit.repeat(depth + 1)));
    if let Some(newline) = &inner_newline {
        out.push_str(newline);
    }
    for index in 0..count {
        if index > 0 {
            out.push_str(&options.item_separator);
            if let Some(newline) = &inner_newline {
                out.push_str(newline);
            }
        }
        write_item(out, index)?;
    }
    if let Some(unit) = &options.indent {
        out.push('\n');
        out.push_str(&unit.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A dict key as `json.dumps` converts it: strings as they are, scalars spelled as JSON.
fn key_string(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Number => Ok(number(key)),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(float) => float_repr(float, JsonNames),
        Err(_) => value.to_string(),
    }
}

/// Python's `float.__repr__`: the shortest round-trip digits, in positional notation when the
/// decimal exponent is in `-4..16`, otherwise as `d.ddde+XX`.
pub(super) fn float_repr(value: f64, names: impl NonFiniteNames) -> String {
    if value.is_nan() {
        return names.nan().to_owned();
    }
    if value.is_infinite() {
        let sign = if value < 0.0 { "-" } else { "" };
        return format!("{sign}{}", names.infinity());
    }
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (whole, fraction) = digits.split_at(point as usize);
            format!("{whole}.{fraction}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.abs()
        )
    }
}

/// A JSON string literal as `json.dumps` writes it.
fn write_string(out: &mut String, text: &str, ensure_ascii: bool) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        for (value, expected) in [
            (0.5, "0.5"),
            (1.0, "1.0"),
            (-2.25, "-2.25"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(float_repr(value, JsonNames), expected, "{value}");
        }
    }

    #[test]
    fn dumps_like_python() {
        let absent = Value::from(());
        let value: Value =
            serde_json::from_str(r#"{"b": [1, 2.5, "é\n"], "a": {}, "c": []}"#).unwrap();
        let plain = DumpOptions::from_values(&absent, &absent, &absent, &absent).unwrap();
        assert_eq!(
            dumps(&value, &plain).unwrap(),
            r#"{"b": [1, 2.5, "é\n"], "a": {}, "c": []}"#
        );
        let pretty = DumpOptions::from_values(
            &Value::from(true),
            &Value::from(2),
            &absent,
            &Value::from(true),
        )
        .unwrap();
        assert_eq!(
            dumps(&value, &pretty).unwrap(),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    \"\\u00e9\\n\"\n  ],\n  \"c\": []\n}"
        );
    }
}
