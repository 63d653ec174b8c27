//! Server-sent events, read incrementally, and the OpenAI payloads they carry.
//!
//! [`SseParser`] is the framing layer: bytes in (split anywhere, including inside a line or a
//! `\r\n` pair), one `data` string out per completed event. Comment lines (`: keep-alive`) and
//! the fields `event`, `id` and `retry` are consumed without producing anything; an event with
//! several `data:` lines joins them with `\n`, as the SSE specification says. A pending event
//! left at end of input is discarded (also per the specification), which is how a truncated
//! stream shows up.
//!
//! [`interpret`] is the OpenAI layer: a `data` string is `[DONE]`, a chunk (content delta,
//! finish reason, usage) or an error object, which shoal's gateway sends in place of the next
//! chunk when a generation fails after the headers went out.

use serde::Deserialize;

use crate::client::{BadReply, RequestFailure};

/// Longest event the parser buffers; a server that sends more without a blank line is broken
/// (or hostile), and the request fails instead of growing memory without bound.
pub(crate) const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// A framing error: the stream is not usable from here on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SseError {
    /// A `data` field is not UTF-8.
    #[error("event data is not UTF-8")]
    InvalidUtf8,
    /// An event grew past [`MAX_EVENT_BYTES`].
    #[error("event longer than {MAX_EVENT_BYTES} bytes")]
    TooLarge,
}

/// Incremental SSE parser; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// `data` of the current event so far (lines joined with `\n`).
    data: Vec<u8>,
    /// Whether the current event has had a `data` field at all (an empty one counts).
    has_data: bool,
    /// The previous byte was a `\r`, so a following `\n` belongs to the same line break.
    after_cr: bool,
    /// A framing error happened; everything after it is ignored.
    failed: bool,
}

impl SseParser {
    /// Feeds bytes; pushes the `data` of every event they complete onto `out`, in order.
    /// After an error is pushed the parser ignores all further input.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<Result<String, SseError>>) {
        for &b in bytes {
            if self.failed {
                return;
            }
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => {
                    if self.line.len() + self.data.len() >= MAX_EVENT_BYTES {
                        self.fail(SseError::TooLarge, out);
                        return;
                    }
                    self.line.push(b);
                }
            }
        }
    }

    /// Whether input ended in the middle of an event (bytes of a line or an undispatched
    /// `data` field are pending).
    pub(crate) fn has_partial_event(&self) -> bool {
        !self.failed && (!self.line.is_empty() || self.has_data)
    }

    fn fail(&mut self, err: SseError, out: &mut Vec<Result<String, SseError>>) {
        self.failed = true;
        self.line.clear();
        self.data.clear();
        out.push(Err(err));
    }

    fn end_line(&mut self, out: &mut Vec<Result<String, SseError>>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return; // a comment: keep-alive or padding
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        // `event`, `id`, `retry` and unknown fields carry nothing an OpenAI client uses.
    }

    fn dispatch(&mut self, out: &mut Vec<Result<String, SseError>>) {
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        match String::from_utf8(data) {
            Ok(text) => out.push(Ok(text)),
            Err(_) => self.fail(SseError::InvalidUtf8, out),
        }
    }
}

/// Token counts of a response's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// What one chunk (or a whole non-streamed response) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChunkInfo {
    /// The text it adds (`delta.content`, `message.content` or `text`); empty when none.
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// One interpreted stream event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamItem {
    /// `data: [DONE]`: the stream completed.
    Done,
    Chunk(ChunkInfo),
}

/// The parts of an OpenAI response or chunk this crate reads; everything else is ignored.
#[derive(Debug, Deserialize)]
struct WireObject {
    choices: Option<Vec<WireChoice>>,
    usage: Option<Usage>,
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    delta: Option<WireContent>,
    message: Option<WireContent>,
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireContent {
    content: Option<String>,
}

/// OpenAI's error object; `code` is a string in OpenAI's API but some servers send numbers.
#[derive(Debug, Deserialize)]
pub(crate) struct WireError {
    pub message: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub code: Option<serde_json::Value>,
}

impl WireError {
    /// The code to group by: `code`, else `type`.
    pub(crate) fn code(&self) -> Option<String> {
        match &self.code {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => self.kind.clone().filter(|k| !k.is_empty()),
        }
    }

    pub(crate) fn message(&self) -> String {
        self.message
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "(no message)".to_owned())
    }
}

/// `{"error": {...}}` bodies of failed requests.
#[derive(Debug, Deserialize)]
pub(crate) struct WireErrorBody {
    pub error: WireError,
}

/// Reads a chunk or a whole response. An `error` object becomes [`RequestFailure::InStream`]
/// (the caller turns it into an HTTP-status failure for non-streamed replies).
pub(crate) fn parse_object(json: &str) -> Result<ChunkInfo, RequestFailure> {
    let object: WireObject = serde_json::from_str(json)
        .map_err(|e| RequestFailure::bad_reply(BadReply::InvalidJson, e.to_string()))?;
    if let Some(error) = object.error {
        return Err(RequestFailure::InStream {
            code: error.code(),
            message: error.message(),
        });
    }
    let Some(choices) = object.choices else {
        return Err(RequestFailure::bad_reply(
            BadReply::MissingChoices,
            "neither `choices` nor `error`",
        ));
    };
    let mut info = ChunkInfo {
        usage: object.usage,
        ..ChunkInfo::default()
    };
    // Requests ask for one choice (n = 1); others, if a server sent any, are not counted.
    if let Some(first) = choices.into_iter().next() {
        let content = first
            .delta
            .and_then(|d| d.content)
            .or_else(|| first.message.and_then(|m| m.content))
            .or(first.text);
        info.content = content.unwrap_or_default();
        info.finish_reason = first.finish_reason;
    }
    Ok(info)
}

/// Interprets the `data` of one stream event.
pub(crate) fn interpret(data: &str) -> Result<StreamItem, RequestFailure> {
    if data.trim() == "[DONE]" {
        return Ok(StreamItem::Done);
    }
    parse_object(data).map(StreamItem::Chunk)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(parts: &[&[u8]]) -> (Vec<Result<String, SseError>>, SseParser) {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for part in parts {
            parser.feed(part, &mut out);
        }
        (out, parser)
    }

    fn ok(items: Vec<Result<String, SseError>>) -> Vec<String> {
        items.into_iter().map(Result::unwrap).collect()
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let (out, parser) = parse_all(&[&stream[..cut], &stream[cut..]]);
            assert_eq!(ok(out), vec!["{\"a\":1}", "[DONE]"], "cut at {cut}");
            assert!(!parser.has_partial_event());
        }
        // One byte per read.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(ok(parse_all(&bytes).0), vec!["{\"a\":1}", "[DONE]"]);
    }

    #[test]
    fn crlf_and_cr_line_endings_split_between_reads() {
        let (out, _) = parse_all(&[b"data: x\r", b"\n\r", b"\ndata: y\r\r"]);
        assert_eq!(ok(out), vec!["x", "y"]);
    }

    #[test]
    fn comments_and_other_fields_are_skipped() {
        let (out, _) =
            parse_all(&[b": keep-alive\n\n:\n\nevent: message\nid: 7\nretry: 10\ndata: a\n\n"]);
        assert_eq!(ok(out), vec!["a"]);
    }

    #[test]
    fn multi_line_data_is_joined_and_space_is_optional() {
        let (out, _) = parse_all(&[b"data:one\ndata: two\ndata\n\n"]);
        assert_eq!(ok(out), vec!["one\ntwo\n"]);
    }

    #[test]
    fn truncated_event_is_pending_not_emitted() {
        let (out, parser) = parse_all(&[b"data: {\"a\":1}\n\ndata: {\"b\""]);
        assert_eq!(ok(out), vec!["{\"a\":1}"]);
        assert!(parser.has_partial_event());
        let (_, parser) = parse_all(&[b"data: x\n"]);
        assert!(
            parser.has_partial_event(),
            "data line without the blank line"
        );
    }

    #[test]
    fn invalid_utf8_and_oversized_events_are_errors() {
        let (out, _) = parse_all(&[b"data: \xff\xfe\n\ndata: later\n\n"]);
        assert_eq!(out, vec![Err(SseError::InvalidUtf8)]);
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        let big = vec![b'a'; 64 * 1024];
        parser.feed(b"data: ", &mut out);
        for _ in 0..(MAX_EVENT_BYTES / big.len() + 1) {
            parser.feed(&big, &mut out);
        }
        assert_eq!(out, vec![Err(SseError::TooLarge)]);
    }

    #[test]
    fn interprets_chat_and_text_chunks() {
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(
            interpret(role).unwrap(),
            StreamItem::Chunk(ChunkInfo::default())
        );
        let piece = r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        assert_eq!(
            interpret(piece).unwrap(),
            StreamItem::Chunk(ChunkInfo {
                content: "hi".into(),
                ..ChunkInfo::default()
            })
        );
        let text = r#"{"choices":[{"index":0,"text":" yo","finish_reason":"length"}]}"#;
        let StreamItem::Chunk(info) = interpret(text).unwrap() else {
            panic!("a chunk")
        };
        assert_eq!(info.content, " yo");
        assert_eq!(info.finish_reason.as_deref(), Some("length"));
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        let StreamItem::Chunk(info) = interpret(usage).unwrap() else {
            panic!("a chunk")
        };
        assert_eq!(
            info.usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3
            })
        );
        assert_eq!(interpret("[DONE]").unwrap(), StreamItem::Done);
    }

    #[test]
    fn error_object_mid_stream_is_a_failure_with_its_code() {
        let err = r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":"engine_failed"}}"#;
        match interpret(err) {
            Err(RequestFailure::InStream { code, message }) => {
                assert_eq!(code.as_deref(), Some("engine_failed"));
                assert_eq!(message, "The server had an error");
            }
            other => panic!("expected an in-stream error, got {other:?}"),
        }
        let typed_only = r#"{"error":{"message":"m","type":"server_error","code":null}}"#;
        match interpret(typed_only) {
            Err(RequestFailure::InStream { code, .. }) => {
                assert_eq!(code.as_deref(), Some("server_error"));
            }
            other => panic!("expected an in-stream error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_chunks_are_bad_replies() {
        for (data, want) in [
            ("{not json", BadReply::InvalidJson),
            ("[1,2]", BadReply::InvalidJson),
            (
                r#"{"choices":[{"delta":{"content":5}}]}"#,
                BadReply::InvalidJson,
            ),
            (r#"{"id":"x"}"#, BadReply::MissingChoices),
        ] {
            match interpret(data) {
                Err(RequestFailure::BadReply { reason, .. }) => assert_eq!(reason, want, "{data}"),
                other => panic!("{data}: expected a bad reply, got {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn any_split_of_any_events_gives_the_same_data(
            events in proptest::collection::vec("[a-z {}\":,]{0,20}", 0..6),
            cuts in proptest::collection::vec(0usize..200, 0..8),
            crlf in any::<bool>(),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut stream = String::new();
            for e in &events {
                stream.push_str(&format!(": ping{nl}data: {e}{nl}{nl}"));
            }
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut prev = 0;
            for c in cuts {
                parts.push(&bytes[prev..c]);
                prev = c;
            }
            parts.push(&bytes[prev..]);
            let (out, parser) = parse_all(&parts);
            let got: Vec<String> = out.into_iter().map(Result::unwrap).collect();
            // "data: " strips one space; the event text itself may start with spaces.
            prop_assert_eq!(got, events);
            prop_assert!(!parser.has_partial_event());
        }

        #[test]
        fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut parser = SseParser::default();
            let mut out = Vec::new();
            parser.feed(&bytes, &mut out);
            for item in out.into_iter().flatten() {
                let _ = interpret(&item);
            }
        }
    }
}
