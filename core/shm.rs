//! A named POSIX shared-memory region (shm_open + mmap MAP_SHARED) holding a
//! pool's block of atomic words, and the eventfd write that wakes a worker.
//! The region is only ever touched through `AtomicU64`, never through plain
//! loads or stores, so processes sharing it need no lock.

use std::ffi::CString;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use crate::error::CoreError;

/// One mapping of a named region. Dropping it unmaps; only `unlink` removes
/// the name (a forked child dropping its copy must not remove it).
pub struct Region {
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is only accessed through `&[AtomicU64]`, which is Sync;
// the pointer stays valid until `Drop`, which needs `&mut self`.
unsafe impl Send for Region {}
// SAFETY: as above; shared access is atomic-only.
unsafe impl Sync for Region {}

fn c_name(name: &str) -> Result<CString, CoreError> {
    let ok = name.starts_with('/') && name.len() > 1 && name.len() < 250 && !name[1..].contains('/');
    if !ok {
        return Err(CoreError::arg("name", format!("must be \"/something\" without further slashes, got {name:?}")));
    }
    CString::new(name).map_err(|_| CoreError::arg("name", "contains a NUL byte"))
}

fn os_err(what: &str, name: &str) -> CoreError {
    CoreError::Os(format!("{what} {name}: {}", io::Error::last_os_error()))
}

impl Region {
    /// Creates the region `name` (which must not exist) with `words` zeroed words.
    pub fn create(name: &str, words: usize) -> Result<Region, CoreError> {
        let c = c_name(name)?;
        let bytes = words.checked_mul(8).filter(|&b| b > 0 && b <= isize::MAX as usize)
            .ok_or_else(|| CoreError::arg("size", format!("{words} words")))?;
        // SAFETY: `c` is a valid NUL-terminated string; flags and mode are plain ints.
        let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
        if fd < 0 {
            return Err(os_err("shm_open(create)", name));
        }
        // SAFETY: `fd` is the descriptor we just opened; ftruncate zero-fills.
        let rc = unsafe { libc::ftruncate(fd, bytes as libc::off_t) };
        if rc != 0 {
            let e = os_err("ftruncate", name);
            // SAFETY: closing and unlinking what we created; no other use follows.
            unsafe {
                libc::close(fd);
                libc::shm_unlink(c.as_ptr());
            }
            return Err(e);
        }
        let r = Self::map(fd, bytes, name);
        if r.is_err() {
            // SAFETY: unlinking the name we created; `c` is valid.
            unsafe { libc::shm_unlink(c.as_ptr()) };
        }
        r
    }

    /// Maps the existing region `name`; returns it and its size in words.
    pub fn attach(name: &str) -> Result<Region, CoreError> {
        let c = c_name(name)?;
        // SAFETY: valid C string; opening an existing object read-write.
        let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
        if fd < 0 {
            return Err(os_err("shm_open(attach)", name));
        }
        // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `st` is writable.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let e = os_err("fstat", name);
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let bytes = st.st_size as usize;
        if bytes == 0 || bytes % 8 != 0 {
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
            return Err(CoreError::Layout(format!("{name}: size {bytes} is not a state block")));
        }
        Self::map(fd, bytes, name)
    }

    /// Maps `fd` (and closes it: the mapping keeps the object alive).
    fn map(fd: libc::c_int, bytes: usize, name: &str) -> Result<Region, CoreError> {
        // SAFETY: a fresh shared read-write mapping of an fd we own, at a
        // kernel-chosen address; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        let e = (p == libc::MAP_FAILED).then(|| os_err("mmap", name));
        // SAFETY: the descriptor is ours and no longer needed either way.
        unsafe { libc::close(fd) };
        if let Some(e) = e {
            return Err(e);
        }
        // mmap returns page-aligned memory, so it is aligned for AtomicU64.
        let ptr = NonNull::new(p as *mut AtomicU64).ok_or_else(|| CoreError::Os("mmap returned null".into()))?;
        Ok(Region { ptr, words: bytes / 8 })
    }

    /// Removes the name; existing mappings stay valid until unmapped.
    pub fn unlink(name: &str) -> Result<(), CoreError> {
        let c = c_name(name)?;
        // SAFETY: valid C string.
        if unsafe { libc::shm_unlink(c.as_ptr()) } != 0 {
            return Err(os_err("shm_unlink", name));
        }
        Ok(())
    }

    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` maps `words * 8` bytes, page-aligned, alive until Drop;
        // AtomicU64 has u64's size and alignment and every access is atomic,
        // which is sound even while other processes access the same memory.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range `map` mapped; no borrow of it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.words * 8) };
    }
}

/// Wakes the process reading eventfd `fd` (adds 1 to its counter). A full
/// counter (EAGAIN) already means "wake up", so errors are ignored.
#[inline]
pub fn wake(fd: i32) {
    if fd < 0 {
        return;
    }
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid local to a descriptor; a closed or
    // wrong fd yields an error return, never memory unsafety.
    let _ = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}
