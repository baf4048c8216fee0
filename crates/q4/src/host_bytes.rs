//! Host byte buffers that are either owned or borrowed from a memory-mapped checkpoint, so that
//! quantized weights already laid out on disk are used in place without a copy.

use std::ops::Deref;
use std::sync::Arc;

/// Immutable bytes in host memory.
#[derive(Clone)]
pub enum HostBytes {
    Owned(Arc<Vec<u8>>),
    /// A byte range of a memory-mapped file; the map stays alive as long as any view of it.
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl HostBytes {
    /// Takes ownership of a vector.
    pub fn owned(v: Vec<u8>) -> Self {
        HostBytes::Owned(Arc::new(v))
    }

    /// A view of `len` bytes at `offset` of a mapped file.
    pub fn mapped(map: Arc<memmap2::Mmap>, offset: usize, len: usize) -> Self {
        assert!(offset + len <= map.len(), "mapped range out of bounds");
        HostBytes::Mapped { map, offset, len }
    }

    /// Whether the bytes live in a mapped file (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self, HostBytes::Mapped { .. })
    }
}

impl Deref for HostBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            HostBytes::Owned(v) => v,
            HostBytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "HostBytes({kind}, {} bytes)", self.len())
    }
}
