//! The portable decoder: the definition of the results.

use crate::numeric::element::Element;

/// Decodes one block: `value = level[code] * scale` in f32, rounded to the output type.
#[inline(always)]
pub(super) fn decode_block<E: Element>(
    codes: &[u8],
    scale: f32,
    levels: &[f32; 16],
    out: &mut [E],
) {
    let mut scaled = [0f32; 16];
    for (s, &l) in scaled.iter_mut().zip(levels) {
        *s = l * scale;
    }
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &byte) in (&mut pairs).zip(codes) {
        pair[0] = E::from_f32(scaled[(byte >> 4) as usize]);
        pair[1] = E::from_f32(scaled[(byte & 15) as usize]);
    }
    if let ([last], Some(&byte)) = (pairs.into_remainder(), codes.last()) {
        *last = E::from_f32(scaled[(byte >> 4) as usize]);
    }
}
