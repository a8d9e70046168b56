//! Outlier buffers kept from one pack to the next.
//!
//! Every parallel task of an OPQ pack collects its outliers into a vector. Fresh vectors cost
//! more than the collection itself: growing them reallocates, and once freed their memory goes
//! back to the OS, so the next pack faults the same pages in again. [`OutlierParts`] hands its
//! vectors back to a small process-wide stock when dropped; the next pack's tasks take them, with
//! their capacity, from there.

use crate::blockwise::opq::Outlier;
use std::ops::Deref;
use std::sync::Mutex;

/// Most vectors the stock keeps (a 4096² tensor at the default task size has 512 tasks).
const MAX_KEPT: usize = 4096;
/// Most outlier slots the stock keeps, all vectors together (64 MiB).
const MAX_KEPT_SLOTS: usize = (64 << 20) / std::mem::size_of::<Outlier>();

struct Stock {
    vectors: Vec<Vec<Outlier>>,
    slots: usize,
}

static STOCK: Mutex<Stock> = Mutex::new(Stock {
    vectors: Vec::new(),
    slots: 0,
});

/// An empty vector for one task's outliers: a kept one (with its capacity) when there is one.
pub fn take() -> Vec<Outlier> {
    let Ok(mut stock) = STOCK.lock() else {
        return Vec::new();
    };
    match stock.vectors.pop() {
        Some(v) => {
            stock.slots -= v.capacity();
            v
        }
        None => Vec::new(),
    }
}

/// Returns vectors to the stock (cleared), as far as its limits allow; the rest are freed.
fn give_back(vectors: impl IntoIterator<Item = Vec<Outlier>>) {
    let Ok(mut stock) = STOCK.lock() else {
        return;
    };
    for mut v in vectors {
        let capacity = v.capacity();
        if capacity == 0
            || stock.vectors.len() >= MAX_KEPT
            || stock.slots + capacity > MAX_KEPT_SLOTS
        {
            continue;
        }
        v.clear();
        stock.slots += capacity;
        stock.vectors.push(v);
    }
}

/// The outliers of a pack as its tasks found them: consecutive parts in flat order. Dropping
/// it hands the parts' vectors back for the next pack.
#[derive(Debug, Default)]
pub struct OutlierParts {
    parts: Vec<Vec<Outlier>>,
}

impl OutlierParts {
    /// Wraps parts (in flat order).
    pub fn new(parts: Vec<Vec<Outlier>>) -> Self {
        Self { parts }
    }

    /// Number of outliers over all parts.
    pub fn total(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    /// All outliers in one vector, in flat order.
    pub fn concat(&self) -> Vec<Outlier> {
        let mut all = Vec::with_capacity(self.total());
        for part in &self.parts {
            all.extend_from_slice(part);
        }
        all
    }
}

impl Deref for OutlierParts {
    type Target = [Vec<Outlier>];

    fn deref(&self) -> &Self::Target {
        &self.parts
    }
}

impl Drop for OutlierParts {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.parts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_parts_come_back_cleared_with_their_capacity() {
        let mut v = Vec::with_capacity(1000);
        v.extend((0..10u64).map(|i| Outlier::new(i, i as u16)));
        let parts = OutlierParts::new(vec![v, Vec::new()]);
        assert_eq!(parts.total(), 10);
        drop(parts);
        // Other tests may use the stock concurrently: look for our vector among a few.
        let taken: Vec<_> = (0..64).map(|_| take()).collect();
        assert!(taken.iter().all(Vec::is_empty));
        assert!(taken.iter().any(|v| v.capacity() >= 1000));
        give_back(taken);
    }

    #[test]
    fn the_stock_never_exceeds_its_limits() {
        give_back((0..MAX_KEPT + 10).map(|_| Vec::with_capacity(1)));
        give_back([Vec::with_capacity(MAX_KEPT_SLOTS + 1)]);
        let stock = STOCK.lock().unwrap();
        assert!(stock.vectors.len() <= MAX_KEPT);
        assert!(stock.slots <= MAX_KEPT_SLOTS);
        let counted: usize = stock.vectors.iter().map(Vec::capacity).sum();
        assert_eq!(counted, stock.slots);
    }
}
