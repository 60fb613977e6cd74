//! Python's `str()` and `repr()` of template values, which Jinja2 prints for `{{ value }}`.

use minijinja::value::ValueKind;
use minijinja::Value;

use super::pyjson::float_repr;

/// What Jinja2 prints for `{{ value }}`: Python's `str(value)`; undefined prints nothing.
pub(super) fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        _ => python_repr(value),
    }
}

/// Python's `repr(value)` for the JSON-like values templates handle.
fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => "None".to_owned(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_owned(),
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(float) if !value.is_integer() => float_repr(float, PythonFloatNames),
            _ => value.to_string(),
        },
        ValueKind::String => string_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = value
                .try_iter()
                .map(|items| items.map(|item| python_repr(&item)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = value
                .try_iter()
                .map(|keys| {
                    keys.map(|key| {
                        let item = value.get_item(&key).unwrap_or_default();
                        format!("{}: {}", python_repr(&key), python_repr(&item))
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        _ => value.to_string(),
    }
}

/// Spelling of non-finite floats in Python's `repr`.
struct PythonFloatNames;

impl super::pyjson::NonFiniteNames for PythonFloatNames {
    fn nan(&self) -> &'static str {
        "nan"
    }
    fn infinity(&self) -> &'static str {
        "inf"
    }
}

/// Python's `repr(str)`: single quotes unless the text holds `'` and no `"`.
fn string_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_python() {
        assert_eq!(python_str(&Value::from(())), "None");
        assert_eq!(python_str(&Value::from(true)), "True");
        assert_eq!(python_str(&Value::from(1.5)), "1.5");
        assert_eq!(python_str(&Value::from(2.0)), "2.0");
        assert_eq!(python_str(&Value::from("it's")), "it's");
        let list = Value::from(vec![Value::from("a"), Value::from("it's"), Value::from(())]);
        assert_eq!(python_str(&list), "['a', \"it's\", None]");
    }
}
