//! CRC-32 (IEEE) of stored buffers, computed in parallel and combined.

use crate::runtime::pool::pool;
use rayon::prelude::*;

const PIECE: usize = 1 << 22;

/// CRC-32 of `bytes`, identical to zlib's `crc32`.
pub fn crc32(bytes: &[u8]) -> u32 {
    if bytes.len() <= PIECE {
        return crc32fast::hash(bytes);
    }
    let pieces: Vec<(u32, usize)> = pool().install(|| {
        bytes
            .par_chunks(PIECE)
            .map(|c| (crc32fast::hash(c), c.len()))
            .collect()
    });
    let mut total = crc32fast::Hasher::new();
    for (crc, len) in pieces {
        total.combine(&crc32fast::Hasher::new_with_initial_len(crc, len as u64));
    }
    total.finalize()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_equals_serial() {
        let data: Vec<u8> = (0..(super::PIECE * 3 + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        assert_eq!(super::crc32(&data), crc32fast::hash(&data));
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }
}
