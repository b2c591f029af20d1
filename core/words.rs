//! A fixed run of 64-bit atomic words, on this process's heap or in a named
//! shared-memory region (`shm::Region`) that every worker of a host maps: the
//! one backing of a pool's block (`block.rs`) and of the key table. Either way
//! it is read through one pointer and length, so the heap path costs what a
//! `Box<[_]>` did.

use crate::sync::AtomicU64;

/// Who owns the words. Only kept alive; never read through.
enum Backing {
    Heap(#[allow(dead_code)] Box<[AtomicU64]>),
    #[cfg(not(loom))]
    Shm(#[allow(dead_code)] crate::shm::Region),
}

/// Cloning shares the backing: a pool retuned by a reload keeps its words.
#[derive(Clone)]
pub struct Words {
    ptr: *const AtomicU64,
    len: usize,
    _backing: std::sync::Arc<Backing>,
}

// SAFETY: `ptr`/`len` point into `_backing`, which is owned by the Words and
// never moved out or freed before it; all access is through `&AtomicU64`.
unsafe impl Send for Words {}
// SAFETY: as above; the words are atomics, safe to share between threads.
unsafe impl Sync for Words {}

impl Words {
    /// `n` zeroed words on the heap (one process; tests and loom).
    pub fn heap(n: usize) -> Words {
        let words: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        Words { ptr: words.as_ptr(), len: words.len(), _backing: std::sync::Arc::new(Backing::Heap(words)) }
    }

    /// The words of a mapped region (kept mapped as long as this lives).
    #[cfg(not(loom))]
    pub fn shm(region: crate::shm::Region) -> Words {
        let w = region.words();
        Words { ptr: w.as_ptr(), len: w.len(), _backing: std::sync::Arc::new(Backing::Shm(region)) }
    }

    #[inline]
    pub fn get(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` and `len` describe the backing's words (see the Send
        // impl), which live exactly as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}
