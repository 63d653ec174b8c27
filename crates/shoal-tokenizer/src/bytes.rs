//! The GPT-2 byte-to-character table of byte-level BPE vocabularies. Such vocabularies spell every
//! byte as one printable character (bytes that are printable Latin-1 stand for themselves, the
//! rest are moved to U+0100 and up, in byte order), so token texts are valid strings even when a
//! token holds half of a UTF-8 sequence.

/// One past the highest character the table produces (U+0100 + 68 moved bytes).
const CHAR_LIMIT: usize = 0x144;
const NO_BYTE: u16 = u16::MAX;

/// Both directions of the byte/character correspondence.
#[derive(Debug, Clone)]
pub(crate) struct ByteMap {
    to_char: [char; 256],
    from_char: [u16; CHAR_LIMIT],
}

fn stands_for_itself(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

impl ByteMap {
    pub(crate) fn new() -> Self {
        let mut to_char = ['\0'; 256];
        let mut from_char = [NO_BYTE; CHAR_LIMIT];
        let mut moved = 0u32;
        for b in 0..=255u8 {
            let code = if stands_for_itself(b) {
                u32::from(b)
            } else {
                moved += 1;
                0xFF + moved
            };
            // Every code is below CHAR_LIMIT, far from the surrogate range.
            let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
            to_char[usize::from(b)] = c;
            from_char[code as usize] = u16::from(b);
        }
        Self { to_char, from_char }
    }

    /// The character standing for byte `b`.
    #[inline]
    pub(crate) fn char_of(&self, b: u8) -> char {
        self.to_char[usize::from(b)]
    }

    /// The byte a character stands for, if it is one of the table's characters.
    #[inline]
    pub(crate) fn byte_of(&self, c: char) -> Option<u8> {
        let code = c as usize;
        if code < CHAR_LIMIT {
            u8::try_from(self.from_char[code]).ok()
        } else {
            None
        }
    }

    /// Appends the bytes a token text spells. Characters outside the table (never present in
    /// well-formed vocabularies) are kept as their own UTF-8.
    pub(crate) fn decode_into(&self, text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            match self.byte_of(c) {
                Some(b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }

    /// Appends the table spelling of `bytes` to `out`.
    pub(crate) fn encode_into(&self, bytes: &[u8], out: &mut String) {
        out.extend(bytes.iter().map(|&b| self.char_of(b)));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection_with_known_anchors() {
        let m = ByteMap::new();
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = m.char_of(b);
            assert!(seen.insert(c), "character {c:?} used twice");
            assert_eq!(m.byte_of(c), Some(b));
        }
        // The anchors every GPT-2 style vocabulary relies on.
        assert_eq!(m.char_of(b' '), 'Ġ');
        assert_eq!(m.char_of(b'\n'), 'Ċ');
        assert_eq!(m.char_of(b'\t'), 'ĉ');
        assert_eq!(m.char_of(b'a'), 'a');
        assert_eq!(m.char_of(0xAD), 'Ń');
        assert_eq!(m.char_of(0), 'Ā');
        assert_eq!(m.byte_of('€'), None);
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let m = ByteMap::new();
        let bytes: Vec<u8> = (0..=255u8).collect();
        let mut s = String::new();
        m.encode_into(&bytes, &mut s);
        let mut back = Vec::new();
        m.decode_into(&s, &mut back);
        assert_eq!(back, bytes);
    }
}
