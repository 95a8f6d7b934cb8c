//! A stored value of the remote tier: a 48-byte header (magic, version, the chunk key,
//! length, xxh3-64 checksum, conversation), then the chunk's bytes; and the checks every
//! fetched value passes before its chunk is used.

use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;

use crate::pool::checksum;

/// Bytes of a value's header.
pub const HEADER_BYTES: usize = 48;
const MAGIC: &[u8; 4] = b"KVTR";
const VERSION: u8 = 1;

/// A chunk fetched and verified.
#[derive(Debug)]
pub struct Fetched {
    /// The value (header, then the chunk); [`Fetched::bytes`] is the chunk.
    value: Vec<u8>,
    /// The chunk's length.
    pub len: u32,
    /// Its xxh3-64.
    pub checksum: u64,
    /// The conversation it was saved under.
    pub conversation: ConversationKey,
}

impl Fetched {
    /// The chunk's bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.value[HEADER_BYTES..]
    }
}

/// A value for `key`: the header, then `data`.
#[must_use]
pub fn encode(key: ChunkKey, data: &[u8], sum: u64, conversation: ConversationKey) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("a chunk is smaller than 4 GiB");
    let mut v = Vec::with_capacity(HEADER_BYTES + data.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&[VERSION, 0, 0, 0]);
    v.extend_from_slice(&key.0.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&sum.to_le_bytes());
    v.extend_from_slice(&conversation.0.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// Checks a value fetched for `key`: header, length and checksum of the bytes.
///
/// # Errors
/// What is wrong with it.
pub fn decode(key: ChunkKey, value: Vec<u8>) -> Result<Fetched, String> {
    if value.len() < HEADER_BYTES {
        return Err(format!("{} bytes, shorter than a header", value.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(value[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().expect("8 bytes"));
    if &value[..4] != MAGIC || value[4] != VERSION {
        return Err("not a kvtier chunk of this version".into());
    }
    let stored = u128::from_le_bytes(value[8..24].try_into().expect("16 bytes"));
    if stored != key.0 {
        return Err(format!("holds chunk {stored:032x}"));
    }
    let len = u32_at(24);
    if value.len() - HEADER_BYTES != len as usize {
        return Err(format!("{} bytes of {len}", value.len() - HEADER_BYTES));
    }
    let sum = u64_at(32);
    if checksum(&value[HEADER_BYTES..]) != sum {
        return Err("checksum mismatch".into());
    }
    Ok(Fetched { len, checksum: sum, conversation: ConversationKey(u64_at(40)), value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_every_damage_is_caught() {
        let key = ChunkKey(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let v = encode(key, &data, checksum(&data), ConversationKey(9));
        let f = decode(key, v.clone()).expect("intact");
        assert_eq!((f.bytes(), f.len, f.conversation), (&data[..], 10_000, ConversationKey(9)));
        // Truncated, a flipped bit, another key, another version: each refused.
        assert!(decode(key, v[..v.len() - 1].to_vec()).is_err());
        assert!(decode(key, v[..20].to_vec()).is_err());
        let mut flipped = v.clone();
        flipped[HEADER_BYTES + 5_000] ^= 1;
        assert!(decode(key, flipped).is_err());
        assert!(decode(ChunkKey(key.0 + 1), v.clone()).is_err());
        let mut other = v;
        other[4] = VERSION + 1;
        assert!(decode(key, other).is_err());
    }
}
