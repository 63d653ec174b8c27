//! Half-open layer ranges: `[start, end)` of a model's transformer blocks.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A validated, non-empty, half-open range of transformer layers `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawRange", into = "RawRange")]
pub struct LayerRange {
    start: u32,
    end: u32,
}

/// Why a layer range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerRangeError {
    /// `start >= end`.
    #[error("layer range [{start}, {end}) is empty")]
    Empty {
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
    },
    /// The range reaches past the model's last layer.
    #[error("layer range [{start}, {end}) exceeds the model's {n_layers} layers")]
    OutOfModel {
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
        /// Layers in the model.
        n_layers: u32,
    },
}

#[derive(Serialize, Deserialize)]
struct RawRange {
    start: u32,
    end: u32,
}

impl TryFrom<RawRange> for LayerRange {
    type Error = LayerRangeError;
    fn try_from(raw: RawRange) -> Result<Self, Self::Error> {
        Self::new(raw.start, raw.end)
    }
}

impl From<LayerRange> for RawRange {
    fn from(r: LayerRange) -> Self {
        RawRange {
            start: r.start,
            end: r.end,
        }
    }
}

impl LayerRange {
    /// A non-empty range `[start, end)`.
    pub fn new(start: u32, end: u32) -> Result<Self, LayerRangeError> {
        if start >= end {
            return Err(LayerRangeError::Empty { start, end });
        }
        Ok(Self { start, end })
    }

    /// The whole model `[0, n_layers)`.
    pub fn full(n_layers: u32) -> Result<Self, LayerRangeError> {
        Self::new(0, n_layers)
    }

    /// Checks that the range lies inside a model of `n_layers` layers.
    pub fn check_within(self, n_layers: u32) -> Result<Self, LayerRangeError> {
        if self.end > n_layers {
            return Err(LayerRangeError::OutOfModel {
                start: self.start,
                end: self.end,
                n_layers,
            });
        }
        Ok(self)
    }

    /// First layer.
    pub fn start(self) -> u32 {
        self.start
    }
    /// One past the last layer.
    pub fn end(self) -> u32 {
        self.end
    }
    /// Number of layers.
    pub fn len(self) -> u32 {
        self.end - self.start
    }
    /// Always false: an empty range cannot be built. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(self) -> bool {
        false
    }
    /// Whether this range starts at layer 0 (it takes tokens, not hidden states).
    pub fn is_first(self) -> bool {
        self.start == 0
    }
    /// Whether this range ends at the model's last layer (it produces logits).
    pub fn is_last(self, n_layers: u32) -> bool {
        self.end == n_layers
    }
    /// Whether `layer` is in the range.
    pub fn contains(self, layer: u32) -> bool {
        (self.start..self.end).contains(&layer)
    }
    /// The layers as an iterator.
    pub fn iter(self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_and_out_of_model_are_refused() {
        assert!(matches!(
            LayerRange::new(3, 3),
            Err(LayerRangeError::Empty { .. })
        ));
        assert!(matches!(
            LayerRange::new(0, 31).and_then(|r| r.check_within(30)),
            Err(LayerRangeError::OutOfModel { .. })
        ));
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<LayerRange>(r#"{"start":4,"end":2}"#).is_err());
        let r: LayerRange = serde_json::from_str(r#"{"start":2,"end":4}"#).expect("valid");
        assert_eq!(r.len(), 2);
    }

    proptest! {
        #[test]
        fn valid_ranges_have_positive_length(start in 0u32..1000, len in 1u32..1000) {
            let r = LayerRange::new(start, start + len).expect("non-empty");
            prop_assert_eq!(r.len(), len);
            prop_assert!(r.contains(start) && !r.contains(start + len));
        }
    }
}
