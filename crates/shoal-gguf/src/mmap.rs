//! The crate's only `unsafe`: mapping a model file read-only, so tensor data is paged in on
//! demand instead of copied (a model is hundreds of megabytes; loading must take milliseconds).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::Mmap;

/// Maps `file` read-only.
pub(crate) fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: the mapping is read-only and only ever exposed as `&[u8]`. The remaining hazard is
    // another process truncating or rewriting the file while it is mapped, which would change
    // (or fault on) bytes we already validated; model files are written once and replaced by
    // rename, never modified in place, and that is a documented requirement of `GgufFile::open`.
    unsafe { Mmap::map(file) }
}
