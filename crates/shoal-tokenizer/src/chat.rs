//! Chat templates: the Jinja template a model ships in `tokenizer.chat_template`, rendered the
//! way Hugging Face `transformers` renders it (`trim_blocks` and `lstrip_blocks` on, loop
//! controls, Python string methods, `raise_exception`, `strftime_now`, Python-style `tojson`).
//!
//! Templates come from model files, i.e. untrusted input: every failure is an error value, and
//! rendering runs on a fuel budget so a hostile template cannot loop for ever.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

use crate::TokenizerError;
use crate::pyjson;

const TEMPLATE_NAME: &str = "chat_template";

/// Instruction budget of one render; a long conversation needs a few thousand per message.
const FUEL: u64 = 5_000_000;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// The payload of a `raise_exception` call, found again in the error chain after rendering.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(
        Error::new(ErrorKind::InvalidOperation, "template raised an exception")
            .with_source(RaisedException(message)),
    )
}

fn describe(err: &Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", pyjson::tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|source| TokenizerError::TemplateSyntax {
                message: describe(&source),
                line: source.line(),
                source,
            })?;
        Ok(Self { env })
    }

    /// Renders a conversation. `add_generation_prompt` asks the template to open an assistant
    /// turn; `bos_token`/`eos_token` are the texts the template may splice in.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let render_error = |source: Error| {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
            while let Some(e) = cause {
                if let Some(raised) = e.downcast_ref::<RaisedException>() {
                    return TokenizerError::TemplateException {
                        message: raised.0.clone(),
                    };
                }
                cause = e.source();
            }
            TokenizerError::TemplateRender {
                message: describe(&source),
                line: source.line(),
                source,
            }
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(render_error)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(render_error)
    }
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime`
/// directives (`%Y %y %m %d %e %j %H %M %S %b %B %a %A %p %%`); other directives are kept
/// verbatim.
fn strftime_now(format: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01, proleptic
/// Gregorian calendar, by counting 400-year eras from 0000-03-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn strftime(format: &str, unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = WEEKDAYS[((days + 3).rem_euclid(7)) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUMULATIVE[(month - 1) as usize] + day + u32::from(month > 2 && is_leap(year));
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_instants() {
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a", 0),
            "1970-01-01 00:00:00 Thu"
        );
        // 2024-02-29T13:05:09Z, a leap day.
        assert_eq!(
            strftime("%d %b %Y, %A %j %p %y %e%%", 1_709_211_909),
            "29 Feb 2024, Thursday 060 PM 24 29%"
        );
        assert_eq!(strftime("%B %q", 951_782_400), "February %q"); // 2000-02-29
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn raise_exception_becomes_a_typed_error() {
        let t = ChatTemplate::new("{{ raise_exception('no ' ~ messages[0].role) }}").unwrap();
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false, "", "")
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::TemplateException { ref message } if message == "no tool"),
            "{err:?}"
        );
    }

    #[test]
    fn syntax_and_render_errors_are_reported_not_panicked() {
        let err = ChatTemplate::new("line one\n{% for x in %}").unwrap_err();
        assert!(
            matches!(err, TokenizerError::TemplateSyntax { line: Some(2), .. }),
            "{err:?}"
        );
        let t = ChatTemplate::new("{{ nope() }}").unwrap();
        assert!(matches!(
            t.render(&[], true, "", ""),
            Err(TokenizerError::TemplateRender { .. })
        ));
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        assert!(matches!(
            t.render(&[], true, "", ""),
            Err(TokenizerError::TemplateRender { .. })
        ));
    }

    #[test]
    fn tojson_writes_python_json() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson(indent=2) }}",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "é \"q\"")], false, "", "")
            .unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"é \\\"q\\\"\"}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
        );
    }
}
