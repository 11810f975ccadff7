//! Bit-level and varint I/O for the encoders: LSB-first bit packing of fixed-width fields, and
//! LEB128 variable-length integers. Readers never read past their input: they return
//! [`DecodeError::Truncated`].

use crate::error::DecodeError;

/// Bits needed to write any value in `0..n` (0 when `n ≤ 1`).
pub fn bits_for(n: u64) -> u32 {
    if n <= 1 { 0 } else { 64 - (n - 1).leading_zeros() }
}

/// Packs fixed-width fields into bytes, least significant bit first.
#[derive(Debug, Default)]
pub struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    filled: u32,
}

impl BitWriter {
    /// An empty writer with room for `bits` bits.
    pub fn with_capacity(bits: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bits.div_ceil(8)),
            acc: 0,
            filled: 0,
        }
    }

    /// Writes the low `width` bits of `value` (`width ≤ 32`).
    pub fn write(&mut self, value: u64, width: u32) {
        debug_assert!(width <= 32);
        if width == 0 {
            return;
        }
        self.acc |= (value & ((1u64 << width) - 1)) << self.filled;
        self.filled += width;
        while self.filled >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    /// The bytes written, the last one zero-padded.
    pub fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

/// Reads fixed-width fields written by [`BitWriter`].
#[derive(Debug)]
pub struct BitReader<'a> {
    data: &'a [u8],
    next_byte: usize,
    acc: u64,
    available: u32,
}

impl<'a> BitReader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            next_byte: 0,
            acc: 0,
            available: 0,
        }
    }

    /// Reads `width ≤ 32` bits.
    pub fn read(&mut self, width: u32) -> Result<u64, DecodeError> {
        debug_assert!(width <= 32);
        if width == 0 {
            return Ok(0);
        }
        while self.available < width {
            let byte = *self
                .data
                .get(self.next_byte)
                .ok_or(DecodeError::Truncated("bit stream"))?;
            self.acc |= u64::from(byte) << self.available;
            self.available += 8;
            self.next_byte += 1;
        }
        let value = self.acc & ((1u64 << width) - 1);
        self.acc >>= width;
        self.available -= width;
        Ok(value)
    }

    /// Reads one bit.
    pub fn bit(&mut self) -> Result<u64, DecodeError> {
        self.read(1)
    }

    /// Bytes consumed (a partly read byte counts).
    pub fn bytes_consumed(&self) -> usize {
        self.next_byte
    }
}

/// Appends `value` as an LEB128 varint.
pub fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads an LEB128 varint at `*pos`, advancing it; refuses overlong or overflowing encodings.
pub fn read_varint(data: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos).ok_or(DecodeError::Truncated("varint"))?;
        *pos += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(DecodeError::corrupt("varint overflows 64 bits"));
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::corrupt("varint longer than 10 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn widths_cover_the_range() {
        assert_eq!(bits_for(0), 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(256), 8);
        assert_eq!(bits_for(257), 9);
    }

    proptest! {
        #[test]
        fn fields_round_trip(fields in prop::collection::vec((any::<u32>(), 0u32..=32), 0..200)) {
            let mut w = BitWriter::default();
            for &(v, width) in &fields {
                w.write(u64::from(v), width);
            }
            let bytes = w.finish();
            let total: u32 = fields.iter().map(|f| f.1).sum();
            prop_assert_eq!(bytes.len(), (total as usize).div_ceil(8));
            let mut r = BitReader::new(&bytes);
            for &(v, width) in &fields {
                let mask = if width == 32 { u64::from(u32::MAX) } else { (1u64 << width) - 1 };
                prop_assert_eq!(r.read(width).unwrap(), u64::from(v) & mask);
            }
        }

        #[test]
        fn varints_round_trip(values in prop::collection::vec(any::<u64>(), 0..50)) {
            let mut out = Vec::new();
            for &v in &values {
                write_varint(&mut out, v);
            }
            let mut pos = 0;
            for &v in &values {
                prop_assert_eq!(read_varint(&out, &mut pos).unwrap(), v);
            }
            prop_assert_eq!(pos, out.len());
        }

        #[test]
        fn readers_never_read_past_the_end(data in prop::collection::vec(any::<u8>(), 0..12), width in 1u32..=32) {
            let mut r = BitReader::new(&data);
            let mut read = 0usize;
            while r.read(width).is_ok() {
                read += width as usize;
            }
            prop_assert!(read <= data.len() * 8);
            let mut pos = 0;
            while pos < data.len() && read_varint(&data, &mut pos).is_ok() {}
            prop_assert!(pos <= data.len());
        }
    }

    #[test]
    fn overlong_varints_are_refused() {
        let mut pos = 0;
        assert!(read_varint(&[0xff; 11], &mut pos).is_err());
        let mut pos = 0;
        assert!(read_varint(&[0x80, 0x80], &mut pos).is_err());
    }
}
