//! A `tojson` filter that writes what Python's `json.dumps` writes, because that is what the
//! Hugging Face chat-template environment installs: `", "`/`": "` separators, non-ASCII kept,
//! no HTML escaping. (minijinja's own `tojson` is compact and HTML-safe, so tool-calling
//! templates would render different prompts than the model was trained on.)

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// Nesting beyond this is refused instead of recursing further.
const MAX_DEPTH: usize = 128;

struct Options {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// The `tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)` filter.
pub(crate) fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(mut pair) if pair.len() == 2 => {
            let key = pair.pop().unwrap_or_default();
            (pair.pop().unwrap_or_default(), key)
        }
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson separators must be a pair of strings",
            ));
        }
        // Python drops the space after commas when indenting.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = Options {
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    write_value(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

fn newline(out: &mut String, opts: &Options, depth: usize) {
    if let Some(unit) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(unit);
        }
    }
}

fn write_value(out: &mut String, value: &Value, opts: &Options, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String => {
            write_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, opts, depth, '[', ']', &items, write_value)?;
        }
        ValueKind::Map => {
            let mut keys: Vec<(String, Value)> =
                value.try_iter()?.map(|k| (key_string(&k), k)).collect();
            if opts.sort_keys {
                keys.sort_by(|a, b| a.0.cmp(&b.0));
            }
            let mut entries = Vec::with_capacity(keys.len());
            for (name, key) in keys {
                entries.push((name, value.get_item(&key)?));
            }
            write_container(
                out,
                opts,
                depth,
                '{',
                '}',
                &entries,
                |out, (name, v), opts, depth| {
                    write_string(out, name, opts.ensure_ascii);
                    out.push_str(&opts.key_sep);
                    write_value(out, v, opts, depth)
                },
            )?;
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: a value of kind {} is not JSON serializable",
                    value.kind()
                ),
            ));
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    opts: &Options,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T, &Options, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        newline(out, opts, depth + 1);
        write_item(out, item, opts, depth + 1)?;
    }
    newline(out, opts, depth);
    out.push(close);
    Ok(())
}

/// Python turns non-string keys into strings: `true`, `null`, `1`, `1.5`.
fn key_string(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None | ValueKind::Undefined => "null".to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key);
            s
        }
        _ => key.to_string(),
    }
}

fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(f) => out.push_str(&python_float(f)),
        Err(_) => {
            let _ = write!(out, "{value}");
        }
    }
}

/// `repr(float)` as Python writes it: shortest round-trip digits, exponent with a sign and at
/// least two digits, `NaN`/`Infinity` as `json.dumps` spells them.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // Rust's Debug picks the same decimal/scientific switch points as Python's repr.
    let s = format!("{f:?}");
    let Some((mantissa, exp)) = s.split_once('e') else {
        return s;
    };
    let (sign, digits) = match exp.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exp),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
        assert_eq!(python_float(123456789.0), "123456789.0");
        assert_eq!(python_float(-2.5e300), "-2.5e+300");
        assert_eq!(python_float(f64::NAN), "NaN");
    }

    #[test]
    fn strings_escape_like_python() {
        let mut s = String::new();
        write_string(&mut s, "a\"b\\c\nd\u{1}é😀\u{7f}", false);
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001é😀\u{7f}\"");
        let mut s = String::new();
        write_string(&mut s, "é😀\u{7f}", true);
        assert_eq!(s, r#""\u00e9\ud83d\ude00\u007f""#);
    }
}
