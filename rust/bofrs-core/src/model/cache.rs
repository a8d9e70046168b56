//! The KV cache: keys and values of every layer and key/value head, f32, preallocated for
//! [`LlamaConfig::max_positions`](super::LlamaConfig::max_positions) positions.

use crate::runtime::buffer::zeroed_vec;

/// Keys and values laid out `[layer][kv_head][position][head_dim]`, and how many positions
/// hold entries.
pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache (OS-zeroed memory: pages are touched only as positions fill).
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let n = layers * kv_heads * capacity * head_dim;
        KvCache {
            keys: zeroed_vec(n),
            values: zeroed_vec(n),
            kv_heads,
            head_dim,
            capacity,
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps positions `0..len` (`len <= self.len()`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Marks positions up to `len` (`<= capacity`) as held (after writing them).
    pub(super) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    fn offset(&self, layer: usize, head: usize) -> usize {
        ((layer * self.kv_heads + head) * self.capacity) * self.head_dim
    }

    /// Keys and values of one layer and head, positions `0..capacity`.
    pub fn head(&self, layer: usize, head: usize) -> (&[f32], &[f32]) {
        let (at, n) = (self.offset(layer, head), self.capacity * self.head_dim);
        (&self.keys[at..at + n], &self.values[at..at + n])
    }

    /// Writes the key and value of `position` for one layer and head.
    pub fn write(
        &mut self,
        layer: usize,
        head: usize,
        position: usize,
        key: &[f32],
        value: &[f32],
    ) {
        let at = self.offset(layer, head) + position * self.head_dim;
        self.keys[at..at + self.head_dim].copy_from_slice(key);
        self.values[at..at + self.head_dim].copy_from_slice(value);
    }
}
