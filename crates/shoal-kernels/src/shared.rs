//! Disjoint writes into one output buffer from several pool threads.
//!
//! A [`crate::ThreadPool`] job is a shared `Fn`, so it cannot hold `&mut` to the output. The
//! matrix product writes `out[i * rows + r]` for a row range each thread claims at run time,
//! which cannot be expressed as a split of the slice up front. This wrapper hands out those
//! writes; callers promise that no index is written by two threads at once.
#![allow(unsafe_code)]

use std::marker::PhantomData;

/// A `&mut [T]` that several threads may write to at disjoint indices.
pub(crate) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the wrapper only allows writes of `T: Send` values at indices the callers keep
// disjoint across threads (the contract of `write` / `slice_mut`), like `&mut [T]` split apart.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}
// SAFETY: as above; it is a mutable borrow of `T: Send` data.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    /// Borrows `s` for shared disjoint writing.
    pub(crate) fn new(s: &'a mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// No other thread may read or write index `i` while this `SharedMut` is alive.
    #[inline]
    pub(crate) unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "SharedMut index {i} out of {}", self.len);
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { self.ptr.add(i).write(v) }
    }

    /// A mutable view of `start..start + len`.
    ///
    /// # Safety
    /// No other thread may access any index of the range while the returned slice is alive.
    #[inline]
    #[allow(clippy::mut_from_ref)] // the point of the type; exclusivity is the caller's contract
    pub(crate) unsafe fn slice_mut(&self, start: usize, len: usize) -> &'a mut [T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "SharedMut range {start}+{len} out of {}",
            self.len
        );
        // SAFETY: in bounds (checked above); exclusive by the caller's contract; the data is
        // borrowed for 'a.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
