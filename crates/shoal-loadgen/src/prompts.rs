//! Prompts a load run cycles through: a built-in set, or a JSONL file.
//!
//! A file has one JSON object per line, either `{"prompt": "..."}` or
//! `{"messages": [{"role": "...", "content": "..."}, ...]}`; other keys are ignored (datasets
//! often carry ids), blank lines are skipped. On the chat endpoint a plain prompt becomes one
//! user message; on the completions endpoint a message list becomes its contents joined by
//! blank lines (there is no template on the client side).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// One prompt of a load run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A plain text prompt.
    Text(String),
    /// A conversation.
    Messages(Vec<ChatMessage>),
}

impl Prompt {
    /// The prompt as chat messages.
    pub fn to_messages(&self) -> Vec<ChatMessage> {
        match self {
            Self::Text(text) => vec![ChatMessage::new("user", text.clone())],
            Self::Messages(messages) => messages.clone(),
        }
    }

    /// The prompt as one completion string.
    pub fn to_text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Messages(messages) => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }
}

/// Why a prompts file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PromptsError {
    /// The file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not one of the two accepted shapes.
    #[error("line {line}: {problem}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The file holds no prompt.
    #[error("no prompts (every line is blank)")]
    Empty,
}

#[derive(Deserialize)]
struct Line {
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// Parses JSONL prompts; see the module docs for the format.
pub fn parse_prompts(text: &str) -> Result<Vec<Prompt>, PromptsError> {
    let mut prompts = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(raw).map_err(|e| PromptsError::Line {
            line,
            problem: e.to_string(),
        })?;
        let prompt = match (parsed.prompt, parsed.messages) {
            (Some(text), None) => Prompt::Text(text),
            (None, Some(messages)) if !messages.is_empty() => Prompt::Messages(messages),
            (None, Some(_)) => {
                return Err(PromptsError::Line {
                    line,
                    problem: "`messages` is empty".into(),
                });
            }
            (Some(_), Some(_)) => {
                return Err(PromptsError::Line {
                    line,
                    problem: "has both `prompt` and `messages`".into(),
                });
            }
            (None, None) => {
                return Err(PromptsError::Line {
                    line,
                    problem: "needs `prompt` or `messages`".into(),
                });
            }
        };
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        return Err(PromptsError::Empty);
    }
    Ok(prompts)
}

/// Reads and parses a JSONL prompts file.
pub async fn load_prompts(path: &Path) -> Result<Vec<Prompt>, PromptsError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| PromptsError::Read {
            path: path.to_owned(),
            source,
        })?;
    parse_prompts(&text)
}

/// Short chat prompts of varied kinds (facts, reasoning, code, rewriting, lists, open
/// writing), so that answer lengths and stop behaviour vary as in real traffic.
const BUILTIN: [&str; 16] = [
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a haiku about a lighthouse keeper at dawn.",
    "List five things to pack for a weekend hike in the mountains.",
    "What is the difference between a process and a thread?",
    "Translate 'the train leaves at seven tomorrow morning' into French.",
    "A shop sells pens at 3 for 2 euros. How much do 12 pens cost? Show the steps.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarize the plot of a detective story set on a night ferry, in three lines.",
    "Give me three tips for keeping a sourdough starter healthy.",
    "Rewrite this sentence to sound more formal: 'we gotta fix the build before friday'.",
    "Why do cats purr? Answer briefly.",
    "Name four planets of the solar system and one fact about each.",
    "Suggest a name for a small bakery by the sea and explain the choice.",
    "What does an HTTP 429 status code mean, and how should a client react to it?",
    "Describe the smell of rain on warm stone to someone who has never noticed it.",
    "Count from one to ten in Spanish.",
];

/// The built-in prompt set.
pub fn builtin_prompts() -> Vec<Prompt> {
    BUILTIN
        .iter()
        .map(|p| Prompt::Text((*p).to_owned()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_shapes_and_skips_blank_lines() {
        let text = "{\"prompt\": \"hi\", \"id\": 3}\n\n  \n{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"why?\"}]}\n";
        let prompts = parse_prompts(text).unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[0], Prompt::Text("hi".into()));
        assert_eq!(
            prompts[0].to_messages(),
            vec![ChatMessage::new("user", "hi")]
        );
        assert_eq!(prompts[1].to_text(), "be brief\n\nwhy?");
        assert_eq!(prompts[1].to_messages().len(), 2);
    }

    #[test]
    fn reports_the_bad_line() {
        for (text, line) in [
            ("{\"prompt\": \"a\"}\nnot json\n", 2),
            ("{\"other\": 1}\n", 1),
            ("\n{\"prompt\": \"a\", \"messages\": []}\n", 2),
            ("{\"messages\": []}\n", 1),
            ("{\"prompt\": 5}\n", 1),
        ] {
            match parse_prompts(text) {
                Err(PromptsError::Line { line: got, .. }) => assert_eq!(got, line, "{text}"),
                other => panic!("{text}: expected a line error, got {other:?}"),
            }
        }
        assert!(matches!(parse_prompts("\n \n"), Err(PromptsError::Empty)));
    }

    #[test]
    fn builtin_set_is_varied() {
        let prompts = builtin_prompts();
        assert_eq!(prompts.len(), 16);
        let mut texts: Vec<String> = prompts.iter().map(Prompt::to_text).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 16);
    }

    #[tokio::test]
    async fn missing_file_is_a_read_error() {
        let err = load_prompts(Path::new("/nonexistent/prompts.jsonl"))
            .await
            .unwrap_err();
        assert!(matches!(err, PromptsError::Read { .. }));
    }
}
