//! Sizes of the packed buffers for a tensor of `numel` values cut into blocks.

use crate::error::{check_len, Error, Result};

/// Smallest and largest supported block sizes (both powers of two).
pub const MIN_BLOCK_SIZE: usize = 16;
pub const MAX_BLOCK_SIZE: usize = 4096;

/// The block structure of a flattened tensor: `numel` values in blocks of `block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub numel: usize,
    pub block_size: usize,
}

impl BlockLayout {
    /// Validates the block size and builds the layout.
    pub fn new(numel: usize, block_size: usize) -> Result<Self> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::InvalidBlockSize(block_size));
        }
        Ok(Self { numel, block_size })
    }

    /// Number of blocks (the last one may be partial).
    pub fn num_blocks(&self) -> usize {
        self.numel.div_ceil(self.block_size)
    }

    /// Number of bytes of packed 4-bit codes.
    pub fn code_bytes(&self) -> usize {
        self.numel.div_ceil(2)
    }

    /// Checks that `codes` and `scales` buffers have the lengths this layout needs.
    pub fn check_buffers(&self, code_len: usize, scale_len: usize) -> Result<()> {
        check_len("codes", self.code_bytes(), code_len)?;
        check_len("scales", self.num_blocks(), scale_len)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_block_sizes() {
        for b in [0, 1, 8, 15, 24, 100, 8192] {
            assert_eq!(BlockLayout::new(10, b), Err(Error::InvalidBlockSize(b)));
        }
        for b in [16, 32, 64, 4096] {
            assert!(BlockLayout::new(10, b).is_ok());
        }
    }

    #[test]
    fn sizes_round_up() {
        let l = BlockLayout::new(129, 64).unwrap();
        assert_eq!((l.num_blocks(), l.code_bytes()), (3, 65));
        let e = BlockLayout::new(0, 64).unwrap();
        assert_eq!((e.num_blocks(), e.code_bytes()), (0, 0));
    }
}
