//! The key/value metadata of a GGUF file, in file order, with typed accessors whose errors name
//! the key and the expected type, so model loaders do not each re-invent the same `match`.

use std::collections::HashMap;

use crate::value::{MetaArray, MetaValue, StringArray};
use crate::{GgufError, ValueType};

/// Ordered metadata with lookup by key. Keys are unique.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, MetaValue)>,
    index: HashMap<String, usize>,
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    let found = match found {
        MetaValue::Array(a) => match a.element_type() {
            ValueType::U8 => "array of u8",
            ValueType::I8 => "array of i8",
            ValueType::U16 => "array of u16",
            ValueType::I16 => "array of i16",
            ValueType::U32 => "array of u32",
            ValueType::I32 => "array of i32",
            ValueType::F32 => "array of f32",
            ValueType::Bool => "array of bool",
            ValueType::String => "array of string",
            ValueType::Array => "array of array",
            ValueType::U64 => "array of u64",
            ValueType::I64 => "array of i64",
            ValueType::F64 => "array of f64",
        },
        other => other.value_type().name(),
    };
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
        found,
    }
}

fn missing(key: &str) -> GgufError {
    GgufError::MissingKey {
        key: key.to_owned(),
    }
}

macro_rules! int_getter {
    ($get:ident, $require:ident, $t:ty) => {
        #[doc = concat!("The value at `key` as `", stringify!($t), "`: any integer type is accepted if the value fits.")]
        pub fn $get(&self, key: &str) -> Result<Option<$t>, GgufError> {
            let Some(v) = self.get(key) else {
                return Ok(None);
            };
            let wide = v
                .as_integer()
                .ok_or_else(|| wrong_type(key, stringify!($t), v))?;
            <$t>::try_from(wide).map(Some).map_err(|_| GgufError::OutOfRange {
                key: key.to_owned(),
                expected: stringify!($t),
                value: wide.to_string(),
            })
        }

        #[doc = concat!("Like [`Metadata::", stringify!($get), "`], but a missing key is an error.")]
        pub fn $require(&self, key: &str) -> Result<$t, GgufError> {
            self.$get(key)?.ok_or_else(|| missing(key))
        }
    };
}

macro_rules! array_getter {
    ($get:ident, $require:ident, $variant:ident, $t:ty, $name:literal) => {
        #[doc = concat!("The value at `key` if it is an ", $name, ".")]
        pub fn $get(&self, key: &str) -> Result<Option<&[$t]>, GgufError> {
            match self.get(key) {
                None => Ok(None),
                Some(MetaValue::Array(MetaArray::$variant(v))) => Ok(Some(v)),
                Some(other) => Err(wrong_type(key, $name, other)),
            }
        }

        #[doc = concat!("Like [`Metadata::", stringify!($get), "`], but a missing key is an error.")]
        pub fn $require(&self, key: &str) -> Result<&[$t], GgufError> {
            self.$get(key)?.ok_or_else(|| missing(key))
        }
    };
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry; a key already present is an error.
    pub fn insert(&mut self, key: impl Into<String>, value: MetaValue) -> Result<(), GgufError> {
        let key = key.into();
        if self.index.contains_key(&key) {
            return Err(GgufError::DuplicateKey { key });
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }

    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        let i = *self.index.get(key)?;
        self.entries.get(i).map(|(_, v)| v)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in file order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &MetaValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    int_getter!(get_u32, require_u32, u32);
    int_getter!(get_u64, require_u64, u64);
    int_getter!(get_i32, require_i32, i32);
    int_getter!(get_i64, require_i64, i64);
    int_getter!(get_usize, require_usize, usize);

    /// The value at `key` as `f32`: an `f32`, or an `f64` (narrowed).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::F32(v)) => Ok(Some(*v)),
            // Narrowing is the intent: callers compute in f32.
            Some(MetaValue::F64(v)) => Ok(Some(*v as f32)),
            Some(other) => Err(wrong_type(key, "f32", other)),
        }
    }

    /// Like [`Metadata::get_f32`], but a missing key is an error.
    pub fn require_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get_f32(key)?.ok_or_else(|| missing(key))
    }

    /// The value at `key` if it is a bool.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(v)) => Ok(Some(*v)),
            Some(other) => Err(wrong_type(key, "bool", other)),
        }
    }

    /// Like [`Metadata::get_bool`], but a missing key is an error.
    pub fn require_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.get_bool(key)?.ok_or_else(|| missing(key))
    }

    /// The value at `key` if it is a string.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::String(v)) => Ok(Some(v)),
            Some(other) => Err(wrong_type(key, "string", other)),
        }
    }

    /// Like [`Metadata::get_str`], but a missing key is an error.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_str(key)?.ok_or_else(|| missing(key))
    }

    /// The value at `key` if it is an array (of any element type).
    pub fn get_array(&self, key: &str) -> Result<Option<&MetaArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(v)) => Ok(Some(v)),
            Some(other) => Err(wrong_type(key, "array", other)),
        }
    }

    /// The value at `key` if it is an array of strings (index it or iterate it; no copies).
    pub fn get_str_array(&self, key: &str) -> Result<Option<&StringArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::String(v))) => Ok(Some(v)),
            Some(other) => Err(wrong_type(key, "array of string", other)),
        }
    }

    /// Like [`Metadata::get_str_array`], but a missing key is an error.
    pub fn require_str_array(&self, key: &str) -> Result<&StringArray, GgufError> {
        self.get_str_array(key)?.ok_or_else(|| missing(key))
    }

    array_getter!(get_f32_array, require_f32_array, F32, f32, "array of f32");
    array_getter!(get_i32_array, require_i32_array, I32, i32, "array of i32");
    array_getter!(get_u32_array, require_u32_array, U32, u32, "array of u32");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn sample() -> Metadata {
        let mut m = Metadata::new();
        m.insert("a.u8", MetaValue::U8(7)).unwrap();
        m.insert("a.neg", MetaValue::I64(-1)).unwrap();
        m.insert("a.big", MetaValue::U64(1 << 40)).unwrap();
        m.insert("a.f64", MetaValue::F64(0.5)).unwrap();
        m.insert("a.s", "hi".into()).unwrap();
        m.insert(
            "a.toks",
            ["x", "y"].into_iter().collect::<StringArray>().into(),
        )
        .unwrap();
        m.insert("a.scores", vec![1.0f32, 2.0].into()).unwrap();
        m
    }

    #[test]
    fn integer_accessor_accepts_any_fitting_type() {
        let m = sample();
        assert_eq!(m.get_u32("a.u8").unwrap(), Some(7));
        assert_eq!(m.get_i64("a.neg").unwrap(), Some(-1));
        assert_eq!(m.get_u64("a.big").unwrap(), Some(1 << 40));
        assert_eq!(m.get_u32("absent").unwrap(), None);
    }

    #[test]
    fn integer_out_of_range_names_the_key() {
        let m = sample();
        match m.get_u32("a.neg") {
            Err(GgufError::OutOfRange { key, expected, .. }) => {
                assert_eq!(key, "a.neg");
                assert_eq!(expected, "u32");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            m.get_u32("a.big"),
            Err(GgufError::OutOfRange { .. })
        ));
    }

    #[test]
    fn wrong_type_names_key_and_types() {
        let m = sample();
        match m.get_u32("a.s") {
            Err(GgufError::WrongType {
                key,
                expected,
                found,
            }) => {
                assert_eq!((key.as_str(), expected, found), ("a.s", "u32", "string"));
            }
            other => panic!("unexpected {other:?}"),
        }
        match m.get_i32_array("a.scores") {
            Err(GgufError::WrongType { found, .. }) => assert_eq!(found, "array of f32"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn require_reports_missing_key() {
        let m = sample();
        match m.require_str("general.architecture") {
            Err(GgufError::MissingKey { key }) => assert_eq!(key, "general.architecture"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn floats_strings_and_arrays() {
        let mut m = sample();
        assert_eq!(m.require_f32("a.f64").unwrap(), 0.5);
        assert_eq!(m.require_str("a.s").unwrap(), "hi");
        assert_eq!(m.require_str_array("a.toks").unwrap().to_vec(), ["x", "y"]);
        assert_eq!(m.require_f32_array("a.scores").unwrap(), &[1.0, 2.0]);
        assert!(matches!(
            m.insert("a.s", MetaValue::Bool(true)),
            Err(GgufError::DuplicateKey { .. })
        ));
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys[0], "a.u8");
        assert_eq!(keys.len(), 7);
    }
}
