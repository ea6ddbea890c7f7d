//! The messages of one mailbox, packed for memory, and the shard's table of senders they name.
//!
//! A relay holds millions of small messages, so the per-message cost beyond the payload is what
//! sizes a relay's memory. Each message keeps only what a `Deliver` needs and cannot be
//! recomputed: signature (64 B), nonce (8 B), sender, time and payload. The payload hash is
//! recomputed when the message is delivered; the sender (33-byte key and device) is interned
//! once per shard and named by a small number; the id is a bit in its chunk's presence map.
//!
//! Messages live in chunks of at most [`CHUNK_IDS`] consecutive ids. A chunk packs its records
//! in one byte buffer (`varint payload_len | varint sender | varint zigzag(received − base) |
//! signature | payload`) and its nonces in a second, dense one, so the idempotency check scans
//! 8 bytes per message instead of keeping a hash index (a mailbox holds at most
//! `mailbox_max_messages`, so the scan is bounded). Removing a message moves at most one chunk's
//! bytes; a chunk that takes no more appends is shrunk to fit, so unused capacity is bounded by
//! one open chunk per mailbox.

use std::collections::VecDeque;

use ahash::AHashMap;

use prost::encoding::{decode_varint, encode_varint};

use crate::store::{Identity, NONCE_LEN};
use botd_protocol::keys::SIGNATURE_LEN;

/// Ids one chunk spans: its presence map is one `u64`.
const CHUNK_IDS: u64 = 64;
/// Appends go to a new chunk once the last one's records reach this size, which bounds the bytes
/// one removal moves (plus one payload) and the unused capacity of the open chunk.
const CHUNK_TARGET_BYTES: usize = 16 * 1024;

/// Longest record header: three varints of at most 10 bytes.
const MAX_RECORD_HEADER: usize = 30;

/// A sender (identity and device) interned in its shard's [`SenderTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderRef(u32);

#[derive(Debug, Clone)]
struct SenderEntry {
    identity: Identity,
    device: u32,
    /// Stored messages naming this entry; at zero the slot is freed for reuse.
    refs: u32,
}

/// The senders named by a shard's stored messages, each stored once, reference counted.
#[derive(Debug, Clone, Default)]
pub struct SenderTable {
    entries: Vec<Option<SenderEntry>>,
    index: AHashMap<(Identity, u32), u32>,
    free: Vec<u32>,
}

impl SenderTable {
    /// Interns `(identity, device)` for one more stored message.
    pub fn acquire(&mut self, identity: &Identity, device: u32) -> SenderRef {
        if let Some(&slot) = self.index.get(&(*identity, device)) {
            if let Some(entry) = self.entries[slot as usize].as_mut() {
                entry.refs += 1;
                return SenderRef(slot);
            }
        }
        let entry = Some(SenderEntry {
            identity: *identity,
            device,
            refs: 1,
        });
        let slot = match self.free.pop() {
            Some(slot) => {
                self.entries[slot as usize] = entry;
                slot
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        self.index.insert((*identity, device), slot);
        SenderRef(slot)
    }

    /// Drops one stored message's reference.
    pub fn release(&mut self, sender: SenderRef) {
        let slot = &mut self.entries[sender.0 as usize];
        if let Some(entry) = slot {
            entry.refs -= 1;
            if entry.refs == 0 {
                self.index.remove(&(entry.identity, entry.device));
                *slot = None;
                self.free.push(sender.0);
            }
        }
    }

    /// The identity and device behind a reference held by a stored message.
    pub fn resolve(&self, sender: SenderRef) -> (&Identity, u32) {
        let entry = self.entries[sender.0 as usize]
            .as_ref()
            .expect("a stored message holds a reference to its sender");
        (&entry.identity, entry.device)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }
}

/// A message to store.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    pub sender: SenderRef,
    pub nonce: [u8; NONCE_LEN],
    pub signature: &'a [u8; SIGNATURE_LEN],
    pub payload: &'a [u8],
    pub received_at_ms: u64,
}

/// A stored message, borrowed from its mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredMessage<'a> {
    pub id: u64,
    pub sender: SenderRef,
    pub nonce: [u8; NONCE_LEN],
    pub signature: &'a [u8; SIGNATURE_LEN],
    pub payload: &'a [u8],
    pub received_at_ms: u64,
}

/// One record's fields, parsed from the start of a chunk's record bytes.
struct Record<'a> {
    sender: SenderRef,
    received_at_ms: u64,
    signature: &'a [u8; SIGNATURE_LEN],
    payload: &'a [u8],
    /// Bytes the whole record takes.
    len: usize,
}

fn zigzag(delta: i64) -> u64 {
    ((delta << 1) ^ (delta >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

impl<'a> Record<'a> {
    fn encode(message: &NewRecord<'_>, base_ms: u64, out: &mut Vec<u8>) {
        encode_varint(message.payload.len() as u64, out);
        encode_varint(u64::from(message.sender.0), out);
        encode_varint(
            zigzag(message.received_at_ms.wrapping_sub(base_ms) as i64),
            out,
        );
        out.extend_from_slice(message.signature);
        out.extend_from_slice(message.payload);
    }

    /// Parses the record at the start of `bytes`, which this module wrote.
    fn parse(bytes: &'a [u8], base_ms: u64) -> Self {
        const WRITTEN_HERE: &str = "records are written by this module";
        let mut rest = bytes;
        let payload_len = decode_varint(&mut rest).expect(WRITTEN_HERE) as usize;
        let sender = SenderRef(decode_varint(&mut rest).expect(WRITTEN_HERE) as u32);
        let delta = unzigzag(decode_varint(&mut rest).expect(WRITTEN_HERE));
        let header = bytes.len() - rest.len();
        let (signature, rest) = rest.split_at(SIGNATURE_LEN);
        Record {
            sender,
            received_at_ms: base_ms.wrapping_add(delta as u64),
            signature: signature.try_into().expect(WRITTEN_HERE),
            payload: &rest[..payload_len],
            len: header + SIGNATURE_LEN + payload_len,
        }
    }
}

/// Up to [`CHUNK_IDS`] consecutive ids from `first_id`; `present` says which are stored, and
/// the k-th present id owns the k-th nonce and the k-th record.
#[derive(Debug, Clone)]
struct Chunk {
    first_id: u64,
    /// Times are stored relative to this one (the chunk's first message).
    base_ms: u64,
    present: u64,
    nonces: Vec<[u8; NONCE_LEN]>,
    records: Vec<u8>,
    /// Bytes at the front of `records` that belonged to removed messages: acks mostly remove
    /// the oldest message, and skipping it costs nothing where moving the rest would.
    dead: usize,
}

impl Chunk {
    fn new(first_id: u64, base_ms: u64) -> Self {
        Self {
            first_id,
            base_ms,
            present: 0,
            nonces: Vec::new(),
            records: Vec::new(),
            dead: 0,
        }
    }

    fn bit(&self, id: u64) -> Option<u32> {
        id.checked_sub(self.first_id)
            .filter(|offset| *offset < CHUNK_IDS)
            .map(|offset| offset as u32)
    }

    /// The bit of `id` if the chunk holds it.
    fn present_bit(&self, id: u64) -> Option<u32> {
        self.bit(id).filter(|bit| self.present & (1 << bit) != 0)
    }

    fn last_id(&self) -> Option<u64> {
        (self.present != 0).then(|| self.first_id + 63 - u64::from(self.present.leading_zeros()))
    }

    /// Position among the present ids that `bit` has (or would have).
    fn rank(&self, bit: u32) -> usize {
        (self.present & ((1u64 << bit) - 1)).count_ones() as usize
    }

    /// Byte offset of the `rank`-th record.
    fn offset_of(&self, rank: usize) -> usize {
        let mut offset = self.dead;
        for _ in 0..rank {
            offset += Record::parse(&self.records[offset..], self.base_ms).len;
        }
        offset
    }

    fn message(&self, id: u64, rank: usize, offset: usize) -> (StoredMessage<'_>, usize) {
        let record = Record::parse(&self.records[offset..], self.base_ms);
        let message = StoredMessage {
            id,
            sender: record.sender,
            nonce: self.nonces[rank],
            signature: record.signature,
            payload: record.payload,
            received_at_ms: record.received_at_ms,
        };
        (message, record.len)
    }

    /// The stored messages in id order.
    fn iter(&self) -> impl Iterator<Item = StoredMessage<'_>> + '_ {
        let mut bits = self.present;
        let mut offset = self.dead;
        (0..self.nonces.len()).map(move |rank| {
            let id = self.first_id + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let (message, len) = self.message(id, rank, offset);
            offset += len;
            message
        })
    }

    fn insert(&mut self, id: u64, message: &NewRecord<'_>) {
        let bit = self.bit(id).expect("the chunk spans the id");
        let rank = self.rank(bit);
        // Grown by half rather than doubled: most mailboxes are small and idle, and their
        // open chunk's spare room is memory held per message until a sweep trims it.
        let needed = MAX_RECORD_HEADER + SIGNATURE_LEN + message.payload.len();
        if self.records.capacity() - self.records.len() < needed {
            self.records
                .reserve_exact(needed.max(self.records.len() / 2));
        }
        if self.nonces.capacity() == self.nonces.len() {
            self.nonces.reserve_exact((self.nonces.len() / 2).max(1));
        }
        if rank == self.nonces.len() {
            Record::encode(message, self.base_ms, &mut self.records);
        } else {
            let mut record = Vec::with_capacity(SIGNATURE_LEN + message.payload.len() + 16);
            Record::encode(message, self.base_ms, &mut record);
            let offset = self.offset_of(rank);
            self.records.splice(offset..offset, record);
        }
        self.nonces.insert(rank, message.nonce);
        self.present |= 1 << bit;
    }

    /// Removes a present id; returns its sender and payload length. A chunk that takes no more
    /// appends gives back the capacity removals free once it is a fifth of what it holds.
    fn remove(&mut self, id: u64, closed: bool) -> Option<(SenderRef, usize)> {
        let bit = self.present_bit(id)?;
        let rank = self.rank(bit);
        let offset = self.offset_of(rank);
        let record = Record::parse(&self.records[offset..], self.base_ms);
        let removed = (record.sender, record.payload.len());
        let len = record.len;
        if offset == self.dead {
            self.dead += len;
            if self.dead * 2 > self.records.len() {
                self.records.drain(..self.dead);
                self.dead = 0;
            }
        } else {
            self.records.drain(offset..offset + len);
        }
        self.nonces.remove(rank);
        self.present &= !(1 << bit);
        if closed && self.slack() > self.live_bytes() / 4 {
            self.shrink();
        }
        Some(removed)
    }

    /// Allocated bytes beyond what the chunk holds.
    fn slack(&self) -> usize {
        self.records.capacity() - self.records.len()
            + self.dead
            + NONCE_LEN * (self.nonces.capacity() - self.nonces.len())
    }

    /// Bytes of records the chunk holds.
    fn live_bytes(&self) -> usize {
        self.records.len() - self.dead
    }

    fn shrink(&mut self) {
        self.records.drain(..self.dead);
        self.dead = 0;
        self.records.shrink_to_fit();
        self.nonces.shrink_to_fit();
    }
}

/// A mailbox's stored messages in id order.
#[derive(Debug, Clone, Default)]
pub struct MessageLog {
    chunks: VecDeque<Chunk>,
    len: usize,
    payload_bytes: usize,
}

impl MessageLog {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// Index of the chunk that spans `id` (or would, if it had room).
    fn chunk_index(&self, id: u64) -> Option<usize> {
        self.chunks
            .partition_point(|c| c.first_id <= id)
            .checked_sub(1)
            .filter(|&i| self.chunks[i].bit(id).is_some())
    }

    pub fn contains(&self, id: u64) -> bool {
        self.chunk_index(id)
            .is_some_and(|i| self.chunks[i].present_bit(id).is_some())
    }

    pub fn get(&self, id: u64) -> Option<StoredMessage<'_>> {
        let chunk = &self.chunks[self.chunk_index(id)?];
        let bit = chunk.present_bit(id)?;
        let rank = chunk.rank(bit);
        Some(chunk.message(id, rank, chunk.offset_of(rank)).0)
    }

    /// Stores `message` as `id`. Ids normally arrive in increasing order (appends); any other
    /// order is placed correctly too. Returns the sender and payload length of a message it
    /// replaced.
    pub fn insert(&mut self, id: u64, message: &NewRecord<'_>) -> Option<(SenderRef, usize)> {
        let replaced = self.remove(id);
        let position = self.chunks.partition_point(|c| c.first_id <= id);
        let target = position.checked_sub(1).filter(|&i| {
            let chunk = &self.chunks[i];
            let appending = chunk.last_id().is_none_or(|last| id > last);
            chunk.bit(id).is_some() && !(appending && chunk.live_bytes() >= CHUNK_TARGET_BYTES)
        });
        let index = match target {
            Some(i) => i,
            None => {
                if let Some(previous) = position.checked_sub(1) {
                    self.chunks[previous].shrink();
                }
                // Most mailboxes hold a few messages: one chunk, not the deque's default four.
                if self.chunks.capacity() == 0 {
                    self.chunks.reserve_exact(1);
                }
                self.chunks
                    .insert(position, Chunk::new(id, message.received_at_ms));
                position
            }
        };
        self.chunks[index].insert(id, message);
        self.len += 1;
        self.payload_bytes += message.payload.len();
        replaced
    }

    /// Removes `id`; returns its sender, whose reference the caller releases, and its payload
    /// length.
    pub fn remove(&mut self, id: u64) -> Option<(SenderRef, usize)> {
        let index = self.chunk_index(id)?;
        let closed = index + 1 < self.chunks.len();
        let chunk = &mut self.chunks[index];
        let (sender, payload_len) = chunk.remove(id, closed)?;
        if chunk.present == 0 {
            self.chunks.remove(index);
        }
        self.len -= 1;
        self.payload_bytes -= payload_len;
        Some((sender, payload_len))
    }

    /// The messages with ids from `first` on, in id order.
    pub fn iter_from(&self, first: u64) -> impl Iterator<Item = StoredMessage<'_>> + '_ {
        let start = self
            .chunks
            .partition_point(|c| c.first_id <= first)
            .saturating_sub(1);
        self.chunks
            .range(start..)
            .flat_map(Chunk::iter)
            .skip_while(move |m| m.id < first)
    }

    pub fn iter(&self) -> impl Iterator<Item = StoredMessage<'_>> + '_ {
        self.chunks.iter().flat_map(Chunk::iter)
    }

    /// The id of the stored message with `nonce` whose sender `is_sender` accepts.
    pub fn find_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        is_sender: impl Fn(SenderRef) -> bool,
    ) -> Option<u64> {
        // Compared as words: an array comparison calls `memcmp` for every stored nonce.
        let nonce = u64::from_ne_bytes(*nonce);
        self.chunks.iter().find_map(|chunk| {
            chunk
                .nonces
                .iter()
                .enumerate()
                .filter(|(_, n)| u64::from_ne_bytes(**n) == nonce)
                .find_map(|(rank, _)| {
                    let message = chunk.iter().nth(rank).expect("one record per nonce");
                    is_sender(message.sender).then_some(message.id)
                })
        })
    }

    /// Gives back the growth room of the open chunk and of the chunk list, for a mailbox that
    /// may stay idle (the maintenance sweep calls this). Returns the bytes freed.
    pub fn trim(&mut self) -> usize {
        let mut freed = 0;
        if let Some(open) = self.chunks.back_mut() {
            let slack = open.slack();
            if slack > open.live_bytes() / 8 + 256 {
                open.shrink();
                freed += slack - open.slack();
            }
        }
        if self.chunks.capacity() > self.chunks.len() + self.chunks.len() / 4 + 1 {
            let before = self.chunks.capacity();
            self.chunks.shrink_to_fit();
            freed += (before - self.chunks.capacity()) * std::mem::size_of::<Chunk>();
        }
        freed
    }

    /// Removes every message; returns their senders, whose references the caller releases.
    pub fn clear(&mut self) -> Vec<SenderRef> {
        let senders = self.iter().map(|m| m.sender).collect();
        *self = Self::default();
        senders
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::collections::BTreeMap;

    const SIGNATURE: [u8; SIGNATURE_LEN] = [7; SIGNATURE_LEN];

    fn message(sender: u32, nonce: u64, payload: &[u8], at: u64) -> NewRecord<'_> {
        NewRecord {
            sender: SenderRef(sender),
            nonce: nonce.to_be_bytes(),
            signature: &SIGNATURE,
            payload,
            received_at_ms: at,
        }
    }

    /// (sender, nonce, payload, time) of a model entry.
    type Model = BTreeMap<u64, (u32, u64, Vec<u8>, u64)>;

    fn assert_matches(log: &MessageLog, model: &Model) {
        assert_eq!(log.len(), model.len());
        assert_eq!(
            log.payload_bytes(),
            model.values().map(|m| m.2.len()).sum::<usize>()
        );
        let stored: Vec<_> = log
            .iter()
            .map(|m| {
                (
                    m.id,
                    (
                        m.sender.0,
                        u64::from_be_bytes(m.nonce),
                        m.payload.to_vec(),
                        m.received_at_ms,
                    ),
                )
            })
            .collect();
        let expected: Vec<_> = model.iter().map(|(id, m)| (*id, m.clone())).collect();
        assert_eq!(stored, expected);
        for (id, m) in model {
            let got = log.get(*id).expect("stored");
            assert_eq!((got.id, got.sender.0, got.payload), (*id, m.0, &m.2[..]));
            assert_eq!(got.signature, &SIGNATURE);
        }
        // Chunks stay sorted, non-empty and within their span.
        for pair in log.chunks.iter().collect::<Vec<_>>().windows(2) {
            assert!(pair[0].last_id().unwrap() < pair[1].first_id);
        }
        assert!(log.chunks.iter().all(|c| c.present != 0));
    }

    #[test]
    fn random_operations_match_a_model() {
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut log = MessageLog::default();
            let mut model = Model::new();
            let mut next_id = 1u64;
            let mut now = 1_000_000u64;
            for _ in 0..600 {
                match rng.gen_range(0..10) {
                    0..=5 => {
                        // Appends, sometimes skipping ids (as after a restart) or with the
                        // clock stepping back.
                        next_id += rng.gen_range(0..3) * rng.gen_range(0..40);
                        now = now.saturating_add_signed(rng.gen_range(-50..5_000));
                        let len = rng.gen_range(0..600);
                        let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                        let sender = rng.gen_range(0..5);
                        let nonce = rng.gen();
                        log.insert(next_id, &message(sender, nonce, &payload, now));
                        model.insert(next_id, (sender, nonce, payload, now));
                        next_id += 1;
                    }
                    6..=8 => {
                        let id = rng.gen_range(0..next_id + 2);
                        let removed = log.remove(id).map(|(s, _)| s.0);
                        assert_eq!(removed, model.remove(&id).map(|m| m.0));
                    }
                    _ => {
                        // An insert out of order, into a gap or over a stored id.
                        let id = rng.gen_range(1..next_id + 1);
                        let payload = vec![9u8; rng.gen_range(0..50)];
                        let replaced = log
                            .insert(id, &message(4, id, &payload, now))
                            .map(|(s, _)| s.0);
                        let previous = model.insert(id, (4, id, payload, now)).map(|m| m.0);
                        assert_eq!(replaced, previous);
                        next_id = next_id.max(id + 1);
                    }
                }
            }
            assert_matches(&log, &model);
            let from = next_id / 2;
            let tail: Vec<u64> = log.iter_from(from).map(|m| m.id).collect();
            let expected: Vec<u64> = model.range(from..).map(|(id, _)| *id).collect();
            assert_eq!(tail, expected, "seed {seed}");
        }
    }

    #[test]
    fn nonces_are_found_only_for_their_sender() {
        let mut log = MessageLog::default();
        for id in 1..=200u64 {
            log.insert(id, &message((id % 3) as u32, id / 2, b"x", id));
        }
        // Nonce 10 is used by ids 20 (sender 2) and 21 (sender 0).
        assert_eq!(log.find_nonce(&10u64.to_be_bytes(), |s| s.0 == 0), Some(21));
        assert_eq!(log.find_nonce(&10u64.to_be_bytes(), |s| s.0 == 2), Some(20));
        assert_eq!(log.find_nonce(&10u64.to_be_bytes(), |s| s.0 == 1), None);
        log.remove(21);
        assert_eq!(log.find_nonce(&10u64.to_be_bytes(), |s| s.0 == 0), None);
    }

    #[test]
    fn appends_fill_chunks_and_closed_chunks_are_shrunk() {
        let mut log = MessageLog::default();
        let payload = [1u8; 100];
        for id in 1..=1000u64 {
            log.insert(id, &message(0, id, &payload, 5));
        }
        let closed = log.chunks.len() - 1;
        assert!(log.chunks.len() >= 1000 / CHUNK_IDS as usize);
        for chunk in log.chunks.range(..closed) {
            assert_eq!(chunk.records.capacity(), chunk.records.len());
            assert_eq!(chunk.nonces.capacity(), chunk.nonces.len());
        }
        // Removals from a closed chunk give its capacity back; the open one keeps its room
        // for appends until a sweep trims it.
        for id in (1..=64).step_by(2) {
            log.remove(id);
        }
        let first = &log.chunks[0];
        assert!(
            first.slack() <= first.records.len() / 4,
            "{}",
            first.slack()
        );
        // Emptying the open chunk but for its last message leaves its room allocated.
        let open_first = log.chunks.back().unwrap().first_id;
        for id in open_first..1000 {
            log.remove(id);
        }
        let open = log.chunks.back().unwrap();
        let open_slack = open.slack();
        assert!(open_slack > open.live_bytes() / 8 + 256, "{open_slack}");
        assert_eq!(log.trim(), open_slack);
        assert_eq!(log.chunks.back().unwrap().slack(), 0);
        assert_eq!(log.trim(), 0, "nothing left to trim");
        assert_eq!(log.get(1000).map(|m| m.payload), Some(&payload[..]));
        let cleared = log.clear();
        assert_eq!(cleared.len(), 1000 - 32 - (1000 - open_first as usize));
        assert!(log.is_empty() && log.chunks.is_empty());
    }

    #[test]
    fn the_sender_table_reuses_freed_slots() {
        let mut table = SenderTable::default();
        let (a, b) = ([2u8; 33], [3u8; 33]);
        let first = table.acquire(&a, 1);
        assert_eq!(table.acquire(&a, 1), first);
        let other = table.acquire(&b, 1);
        assert_ne!(other, first);
        assert_ne!(
            table.acquire(&a, 2),
            first,
            "the device is part of the sender"
        );
        assert_eq!(table.resolve(other), (&b, 1));
        table.release(first);
        assert_eq!(table.len(), 3, "one reference left");
        table.release(first);
        assert_eq!(table.len(), 2);
        assert_eq!(table.acquire(&b, 7), first, "the freed slot is reused");
    }

    #[test]
    fn zigzag_round_trips_negative_deltas() {
        for delta in [0i64, 1, -1, 1 << 40, -(1 << 40), i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(delta)), delta);
        }
    }
}
