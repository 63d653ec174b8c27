//! What a node id may look like. Node ids come from peers and from config files, become store
//! keys and log fields, so they are checked once where they enter.

use std::fmt;

/// Longest node id accepted.
pub const MAX_NODE_ID_LEN: usize = 64;

/// Why a node id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIdProblem {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_NODE_ID_LEN`] bytes.
    TooLong,
    /// The id has a character outside `[A-Za-z0-9._-]`, or does not start with a letter or digit.
    BadCharacter,
}

impl fmt::Display for NodeIdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeIdProblem::Empty => f.write_str("is empty"),
            NodeIdProblem::TooLong => write!(f, "is longer than {MAX_NODE_ID_LEN} bytes"),
            NodeIdProblem::BadCharacter => f.write_str(
                "must start with a letter or digit and use only letters, digits, '.', '_' and '-'",
            ),
        }
    }
}

/// Checks a node id: 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit (host names
/// qualify).
pub fn check_node_id(id: &str) -> Result<(), NodeIdProblem> {
    let Some(first) = id.bytes().next() else {
        return Err(NodeIdProblem::Empty);
    };
    if id.len() > MAX_NODE_ID_LEN {
        return Err(NodeIdProblem::TooLong);
    }
    let ok = first.is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NodeIdProblem::BadCharacter)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn host_names_pass_and_odd_ids_do_not() {
        assert_eq!(check_node_id("pi-4.local"), Ok(()));
        assert_eq!(check_node_id("node_7"), Ok(()));
        assert_eq!(check_node_id(""), Err(NodeIdProblem::Empty));
        assert_eq!(check_node_id(&"a".repeat(65)), Err(NodeIdProblem::TooLong));
        assert_eq!(check_node_id("-x"), Err(NodeIdProblem::BadCharacter));
        assert_eq!(check_node_id("a/b"), Err(NodeIdProblem::BadCharacter));
        assert_eq!(check_node_id("a b"), Err(NodeIdProblem::BadCharacter));
        assert_eq!(check_node_id("é"), Err(NodeIdProblem::BadCharacter));
    }
}
