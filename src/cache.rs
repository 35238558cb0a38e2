//! The answer store: sharded, bounded, with CLOCK eviction, expiry, a serve-stale window
//! and prefetch marks.
//!
//! Invariants: entries are immutable once inserted (an [`Answer`] plus the time it was
//! stored); only their hit counter and flags change, atomically, under a read lock. The
//! hit path takes one shard read lock, renders straight from the stored bytes and never
//! allocates. An entry stays in the table until `ttl + stale window` has passed or the
//! CLOCK hand evicts it to make room.
//!
//! Two budgets hold per shard, entries (`capacity`) and bytes (`max_bytes`): answers range
//! from 50 bytes to 64 KiB, so a count alone bounds nothing (20,000 entries of 58 KB are
//! 1.1 GB). Each entry is charged its real cost, [`entry_cost`]: key, stored answer, TTL
//! offsets and a fixed overhead for the allocations around them. An answer bigger than
//! `max_answer_bytes` is refused (the caller serves it uncached), so one huge answer never
//! pushes out hundreds of small popular ones.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use crate::dns::{Answer, Key};

/// Shards of the table; each holds `capacity / SHARDS` entries and `max_bytes / SHARDS` bytes.
pub const SHARDS: usize = 64;

/// A cached answer with its bookkeeping.
#[derive(Debug)]
pub struct Entry {
    key: Box<[u8]>,
    pub answer: Answer,
    /// Milliseconds since the cache's epoch when the answer was stored.
    stored_ms: u64,
    hits: AtomicU32,
    referenced: AtomicBool,
    /// 0, [`PREFETCH_RUNNING`], or the time (ms) before which no prefetch starts.
    prefetch_mark: AtomicU64,
    /// Bytes charged to the shard's budget for this entry ([`entry_cost`]).
    cost: usize,
}

impl Entry {
    /// Whole seconds since the answer was stored, as of `now_ms`.
    pub fn age_secs(&self, now_ms: u64) -> u32 {
        (now_ms.saturating_sub(self.stored_ms) / 1000) as u32
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.stored_ms) < u64::from(self.answer.ttl) * 1000
    }

    fn expired_beyond(&self, now_ms: u64, stale_ms: u64) -> bool {
        now_ms.saturating_sub(self.stored_ms) >= u64::from(self.answer.ttl) * 1000 + stale_ms
    }
}

/// Memory an entry holds besides its key and answer bytes, estimated from the layout:
/// the `Entry` in its `Arc` (two counts), its slot in the shard's `Vec`, its index and
/// control byte in the hash table (at a 7/8 load factor, rounded up), and a malloc
/// chunk header plus rounding (16 bytes) on each of its four allocations (the `Arc`, the
/// key, the answer's wire bytes and its TTL offsets). About 190 bytes on x86-64: a
/// 100-byte answer costs about three times its size, which is what a count of entries
/// alone cannot see.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>()
    + 2 * std::mem::size_of::<usize>()
    + std::mem::size_of::<Option<(u64, Arc<Entry>)>>()
    + 6
    + 4 * 16;

/// What an entry costs the byte budget: `key` bytes, `wire` answer bytes, `records`
/// TTL offsets of two bytes each, and [`ENTRY_OVERHEAD`].
pub fn entry_cost(key: usize, wire: usize, records: usize) -> usize {
    key + wire + 2 * records + ENTRY_OVERHEAD
}

/// The prefetch mark of an entry being refreshed.
const PREFETCH_RUNNING: u64 = u64::MAX;
/// After a failed prefetch (no answer, SERVFAIL, REFUSED, or not started), the entry is not
/// prefetched again for this long: an upstream that fails fast would otherwise get one
/// refresh per hit in the prefetch window.
pub const PREFETCH_BACKOFF_MS: u64 = 5000;

/// May a prefetch of an entry whose mark is `mark` start at `now`? Never while one runs
/// (the mark is then [`PREFETCH_RUNNING`], later than any time), nor during a back-off.
fn prefetch_allowed(mark: u64, now: u64) -> bool {
    now >= mark
}

/// The mark of an entry whose prefetch failed at `now`.
fn prefetch_backoff(now: u64) -> u64 {
    now.saturating_add(PREFETCH_BACKOFF_MS)
        .min(PREFETCH_RUNNING - 1)
}

/// When to refresh an entry before it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchPolicy {
    pub enabled: bool,
    pub min_hits: u32,
    /// Refresh once less than this percentage of the TTL remains.
    pub percent: u8,
}

impl From<&crate::config::Cache> for PrefetchPolicy {
    fn from(c: &crate::config::Cache) -> PrefetchPolicy {
        PrefetchPolicy {
            enabled: c.prefetch,
            min_hits: c.prefetch_min_hits,
            percent: c.prefetch_percent,
        }
    }
}

/// The outcome of a hit-path lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit<T> {
    /// Fresh entry found; `prefetch` says the caller should refresh it now (the entry is
    /// marked, so only one caller is told).
    Fresh {
        value: T,
        prefetch: bool,
    },
    Miss,
}

pub struct Cache {
    shards: Box<[RwLock<Shard>]>,
    hasher: ahash::RandomState,
    // Limits are atomics so that a reload can change them in place.
    per_shard: AtomicUsize,
    /// `max_bytes / SHARDS`.
    per_shard_bytes: AtomicUsize,
    max_answer_bytes: AtomicUsize,
    stale_ms: AtomicU64,
    prefetch_enabled: AtomicBool,
    prefetch_min_hits: AtomicU32,
    prefetch_percent: AtomicU8,
    epoch: Instant,
    /// Entries evicted to make room (success, denial) and answers refused as too big,
    /// on a cache line of their own so that counting never invalidates the line the hit
    /// path reads.
    evicted: Evictions,
}

#[derive(Default)]
#[repr(align(128))]
struct Evictions {
    by_kind: [AtomicU64; 2],
    too_big: AtomicU64,
}

#[derive(Default)]
struct Shard {
    table: hashbrown::HashTable<u32>,
    slots: Vec<Option<(u64, Arc<Entry>)>>,
    free: Vec<u32>,
    hand: usize,
    /// Sum of the entries' [`Entry::cost`].
    bytes: usize,
}

/// Does an entry of `cost` bytes fit a shard holding `len` entries and `bytes` bytes,
/// under the per-shard budgets? `false` means: evict first.
fn fits(len: usize, bytes: usize, cost: usize, per_shard: usize, per_shard_bytes: usize) -> bool {
    len < per_shard && bytes.saturating_add(cost) <= per_shard_bytes
}

impl Cache {
    /// A cache holding at most about `capacity` entries (rounded up to a multiple of the
    /// shard count), keeping expired entries for `stale_secs` for serve-stale, with no
    /// byte budget until [`Cache::set_bytes`].
    pub fn new(capacity: usize, stale_secs: u64, prefetch: PrefetchPolicy) -> Cache {
        let cache = Cache {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: ahash::RandomState::new(),
            per_shard: AtomicUsize::new(1),
            per_shard_bytes: AtomicUsize::new(usize::MAX),
            max_answer_bytes: AtomicUsize::new(usize::MAX),
            stale_ms: AtomicU64::new(0),
            prefetch_enabled: AtomicBool::new(false),
            prefetch_min_hits: AtomicU32::new(0),
            prefetch_percent: AtomicU8::new(0),
            epoch: Instant::now(),
            evicted: Evictions::default(),
        };
        cache.set(capacity, stale_secs, prefetch);
        cache
    }

    /// Change capacity, stale window and prefetch policy in place. A smaller capacity
    /// takes effect as entries are inserted.
    pub fn set(&self, capacity: usize, stale_secs: u64, prefetch: PrefetchPolicy) {
        let r = Ordering::Relaxed;
        self.per_shard.store(capacity.div_ceil(SHARDS).max(1), r);
        self.stale_ms.store(stale_secs.saturating_mul(1000), r);
        self.prefetch_enabled.store(prefetch.enabled, r);
        self.prefetch_min_hits.store(prefetch.min_hits, r);
        self.prefetch_percent.store(prefetch.percent, r);
    }

    /// Change the byte budget (`max_bytes` for the whole cache, split evenly over the
    /// shards) and the largest answer stored. A smaller budget takes effect as entries
    /// are inserted, like a smaller capacity.
    pub fn set_bytes(&self, max_bytes: usize, max_answer_bytes: usize) {
        let r = Ordering::Relaxed;
        self.per_shard_bytes.store((max_bytes / SHARDS).max(1), r);
        self.max_answer_bytes.store(max_answer_bytes, r);
    }

    /// A cache built from the `[cache]` config section.
    pub fn from_config(c: &crate::config::Cache) -> Cache {
        let cache = Cache::new(c.capacity, c.serve_stale.as_secs(), PrefetchPolicy::from(c));
        cache.set_bytes(c.max_bytes, c.max_answer_bytes);
        cache
    }

    /// [`Cache::set`] and [`Cache::set_bytes`] from the `[cache]` config section.
    pub fn set_limits(&self, c: &crate::config::Cache) {
        self.set(c.capacity, c.serve_stale.as_secs(), PrefetchPolicy::from(c));
        self.set_bytes(c.max_bytes, c.max_answer_bytes);
    }

    /// Keep only the entries whose key satisfies `keep`; returns how many were dropped.
    pub fn retain(&self, mut keep: impl FnMut(&Key) -> bool) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            let doomed: Vec<usize> = shard
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let (_, e) = s.as_ref()?;
                    let key = Key::from_bytes(&e.key)?;
                    (!keep(&key)).then_some(i)
                })
                .collect();
            for i in doomed {
                shard.remove_slot(i);
                dropped += 1;
            }
        }
        dropped
    }

    /// Call `f` with the key bytes, answer and age (whole seconds) of every fresh positive
    /// or negative entry, one shard read lock at a time (for a snapshot).
    pub fn for_each_fresh(&self, mut f: impl FnMut(&[u8], &Answer, u32)) {
        let now = self.now_ms();
        for shard in self.shards.iter() {
            let shard = shard.read();
            for (_, e) in shard.slots.iter().flatten() {
                if e.is_fresh(now) && e.answer.is_cacheable_kind() {
                    f(&e.key, &e.answer, e.age_secs(now));
                }
            }
        }
    }

    /// Milliseconds on the cache's clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn locate(&self, key: &[u8]) -> (u64, &RwLock<Shard>) {
        let hash = self.hasher.hash_one(key);
        (hash, &self.shards[(hash >> 58) as usize % SHARDS])
    }

    /// The hit path: if an entry fresh at `now` (from [`Cache::now_ms`]; a receive loop
    /// reads the clock once per batch) exists, call `f` with it and its age under the
    /// shard's read lock, and return what `f` returns.
    pub fn with_fresh<T>(&self, key: &Key, now: u64, f: impl FnOnce(&Entry, u32) -> T) -> Hit<T> {
        let (hash, shard) = self.locate(key.as_bytes());
        let shard = shard.read();
        let Some(entry) = shard.find(hash, key.as_bytes()) else {
            return Hit::Miss;
        };
        if !entry.is_fresh(now) {
            return Hit::Miss;
        }
        if !entry.referenced.load(Ordering::Relaxed) {
            entry.referenced.store(true, Ordering::Relaxed);
        }
        let r = Ordering::Relaxed;
        // Hits are counted only up to the prefetch threshold, the one thing they are for:
        // a popular entry then costs no atomic read-modify-write per hit.
        let min_hits = self.prefetch_min_hits.load(r);
        let mut hits = entry.hits.load(r);
        if hits < min_hits {
            hits = entry.hits.fetch_add(1, r) + 1;
        }
        let age = entry.age_secs(now);
        let prefetch = self.prefetch_enabled.load(r)
            && hits >= min_hits
            && u64::from(entry.answer.ttl - age.min(entry.answer.ttl)) * 100
                < u64::from(entry.answer.ttl) * u64::from(self.prefetch_percent.load(r))
            && {
                let mark = entry.prefetch_mark.load(r);
                prefetch_allowed(mark, now)
                    && entry
                        .prefetch_mark
                        .compare_exchange(mark, PREFETCH_RUNNING, r, r)
                        .is_ok()
            };
        Hit::Fresh {
            value: f(entry, age),
            prefetch,
        }
    }

    /// Any entry for `key` still inside its stale window (fresh or not).
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let now = self.now_ms();
        let (hash, shard) = self.locate(key.as_bytes());
        let shard = shard.read();
        let idx = shard.index(hash, key.as_bytes())?;
        let (_, entry) = shard.slots[idx as usize].as_ref()?;
        (!entry.expired_beyond(now, self.stale_ms.load(Ordering::Relaxed)))
            .then(|| Arc::clone(entry))
    }

    /// Store an answer for `key`, replacing any previous one; evicts until the shard's
    /// entry and byte budgets hold. Not stored (`None`): answers with a zero TTL, and
    /// answers over `max_answer_bytes` or the shard's byte budget (counted in
    /// [`Cache::refused`]). Returns the stored entry, or gives the answer back when it was
    /// not stored, so the caller serves it without having kept a copy (a copy per miss
    /// was two allocations and a memcpy, and freed bytes between the cache's entries).
    pub fn insert(&self, key: &Key, answer: Answer) -> Result<Arc<Entry>, Answer> {
        if answer.ttl == 0 {
            return Err(answer);
        }
        let r = Ordering::Relaxed;
        let (limit, limit_bytes, stale_ms) = (
            self.per_shard.load(r),
            self.per_shard_bytes.load(r),
            self.stale_ms.load(r),
        );
        let cost = match answer.stored_size() {
            (wire, _) if wire > self.max_answer_bytes.load(r) => None,
            (wire, records) => Some(entry_cost(key.as_bytes().len(), wire, records)),
        };
        let Some(cost) = cost.filter(|&c| c <= limit_bytes) else {
            self.evicted.too_big.fetch_add(1, r);
            return Err(answer);
        };
        let now = self.now_ms();
        let entry = Arc::new(Entry {
            key: key.as_bytes().into(),
            answer,
            stored_ms: now,
            hits: AtomicU32::new(0),
            referenced: AtomicBool::new(false),
            prefetch_mark: AtomicU64::new(0),
            cost,
        });
        let (hash, shard) = self.locate(key.as_bytes());
        let mut shard = shard.write();
        // A replaced entry gives its room back first: the new one may differ in size.
        if let Some(idx) = shard.index(hash, key.as_bytes()) {
            shard.remove_slot(idx as usize);
        }
        while !fits(shard.table.len(), shard.bytes, cost, limit, limit_bytes) {
            let Some(denial) = shard.evict_one(now, stale_ms) else {
                break;
            };
            self.evicted.by_kind[usize::from(denial)].fetch_add(1, r);
        }
        shard.bytes += cost;
        let idx = match shard.free.pop() {
            Some(i) => i,
            None => {
                shard.slots.push(None);
                (shard.slots.len() - 1) as u32
            }
        };
        shard.slots[idx as usize] = Some((hash, Arc::clone(&entry)));
        let Shard { table, slots, .. } = &mut *shard;
        table.insert_unique(hash, idx, |&i| slot_hash(slots, i));
        Ok(entry)
    }

    /// A prefetch of `key` failed or could not start: allow the next one only after
    /// [`PREFETCH_BACKOFF_MS`].
    pub fn prefetch_failed(&self, key: &Key) {
        if let Some(e) = self.get(key) {
            e.prefetch_mark
                .store(prefetch_backoff(self.now_ms()), Ordering::Relaxed);
        }
    }

    /// Number of entries held (fresh and stale).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().table.len()).sum()
    }

    /// Entries held (success, denial): positive answers, and NXDOMAIN/NODATA/SERVFAIL.
    /// Reads every shard (for a scrape, not for the hit path).
    pub fn entries_by_kind(&self) -> [u64; 2] {
        let mut n = [0u64; 2];
        for shard in self.shards.iter() {
            for (_, e) in shard.read().slots.iter().flatten() {
                n[usize::from(e.answer.kind != crate::dns::Kind::Positive)] += 1;
            }
        }
        n
    }

    /// Entries evicted to make room so far (success, denial).
    pub fn evictions(&self) -> [u64; 2] {
        [0, 1].map(|i| self.evicted.by_kind[i].load(Ordering::Relaxed))
    }

    /// Answers refused so far because they were bigger than `max_answer_bytes` (or than
    /// a shard's byte budget); each was served to its client, uncached.
    pub fn refused(&self) -> u64 {
        self.evicted.too_big.load(Ordering::Relaxed)
    }

    /// Bytes charged to the byte budget now, all shards ([`entry_cost`] summed).
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.read().bytes).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn slot_hash(slots: &[Option<(u64, Arc<Entry>)>], i: u32) -> u64 {
    slots[i as usize].as_ref().map_or(0, |(h, _)| *h)
}

impl Shard {
    fn index(&self, hash: u64, key: &[u8]) -> Option<u32> {
        self.table
            .find(hash, |&i| {
                self.slots[i as usize]
                    .as_ref()
                    .is_some_and(|(_, e)| &*e.key == key)
            })
            .copied()
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<&Entry> {
        let idx = self.index(hash, key)?;
        self.slots[idx as usize].as_ref().map(|(_, e)| &**e)
    }

    /// CLOCK: sweep from the hand, giving referenced entries a second chance; entries past
    /// their stale window go first. Bounded to two sweeps. Returns whether the entry
    /// evicted was a denial (anything but a positive answer), or `None` when none was.
    fn evict_one(&mut self, now: u64, stale_ms: u64) -> Option<bool> {
        let n = self.slots.len();
        for _ in 0..2 * n + 1 {
            let at = self.hand % n.max(1);
            self.hand = at + 1;
            let Some((_, entry)) = &self.slots[at] else {
                continue;
            };
            if !entry.expired_beyond(now, stale_ms)
                && entry.referenced.swap(false, Ordering::Relaxed)
            {
                continue;
            }
            let denial = entry.answer.kind != crate::dns::Kind::Positive;
            self.remove_slot(at);
            return Some(denial);
        }
        None
    }

    fn remove_slot(&mut self, at: usize) {
        let Some((hash, entry)) = self.slots[at].take() else {
            return;
        };
        self.bytes -= entry.cost;
        if let Ok(found) = self.table.find_entry(hash, |&i| i as usize == at) {
            found.remove();
        }
        self.free.push(at as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::answer::tests::POLICY;
    use crate::dns::query::tests::query;
    use crate::dns::Query;

    /// An upstream answer for `name` with one record of `qtype` and `rdata`.
    fn one_record(name: &str, qtype: u16, ttl: u32, rdata: &[u8]) -> (Key, Answer) {
        let q = query(1, name, qtype, None);
        let key = Query::parse(&q).unwrap().key();
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(rdata);
        (key, Answer::from_upstream(&r, 1, &key, &POLICY).unwrap())
    }

    fn answer(name: &str, ttl: u32) -> (Key, Answer) {
        one_record(name, 1, ttl, &[10, 0, 0, 1])
    }

    /// A TXT answer for `name` whose record data is `rdlen` bytes (strings of 255 or less).
    fn txt(name: &str, rdlen: usize) -> (Key, Answer) {
        let mut rdata = Vec::with_capacity(rdlen);
        while rdata.len() < rdlen {
            let n = (rdlen - rdata.len() - 1).min(255);
            rdata.push(n as u8);
            rdata.extend(std::iter::repeat_n(b'x', n));
        }
        one_record(name, 16, 60, &rdata)
    }

    /// The sum of the costs of the entries held, recomputed from scratch.
    fn recount(c: &Cache) -> usize {
        c.shards
            .iter()
            .map(|s| {
                let s = s.read();
                s.slots.iter().flatten().map(|(_, e)| e.cost).sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn an_entry_costs_its_key_answer_and_overhead() {
        let c = Cache::new(100, 0, NO_PREFETCH);
        let (k, a) = txt("t.example", 1000);
        let e = c.insert(&k, a).unwrap();
        // Header 12, the question, the record.
        let (wire, records) = e.answer.stored_size();
        let question = 1 + "t.example".len() + 1 + 4;
        assert_eq!(wire, 12 + question + 12 + 1000);
        assert_eq!(records, 1);
        assert_eq!(e.cost, k.as_bytes().len() + wire + 2 + ENTRY_OVERHEAD);
        assert_eq!(c.bytes(), e.cost);
        // The overhead is the layout's, not a guess far off: between 150 and 400 bytes.
        assert!((150..400).contains(&ENTRY_OVERHEAD), "{ENTRY_OVERHEAD}");
    }

    #[test]
    fn the_byte_budget_holds_whatever_the_answers_size() {
        // 20,000 entries allowed, but only 2 MiB (32 KiB a shard): 2-22 KB answers would
        // take up to 440 MB by count.
        let c = Cache::new(20_000, 0, NO_PREFETCH);
        let budget = 2 << 20;
        c.set_bytes(budget, 30_000);
        for i in 0..2000 {
            let (k, a) = txt(&format!("n{i}.example"), 2_000 + (i % 5) * 5_000);
            assert!(c.insert(&k, a).is_ok(), "fits a shard's share: stored");
            assert!(c.bytes() <= budget, "{} over {budget} at {i}", c.bytes());
        }
        assert_eq!(c.bytes(), recount(&c));
        assert!(c.len() < 2000 / 10, "evicted by bytes: {} held", c.len());
        let [positive, _] = c.evictions();
        assert_eq!(positive as usize + c.len(), 2000);
        assert_eq!(c.refused(), 0);
    }

    #[test]
    fn a_smaller_budget_applies_as_entries_arrive_and_accounts_stay_exact() {
        let c = Cache::new(20_000, 0, NO_PREFETCH);
        for i in 0..1000 {
            let (k, a) = answer(&format!("a{i}.example"), 60);
            let _ = c.insert(&k, a);
        }
        let before = c.bytes();
        assert_eq!(before, recount(&c));
        assert!(before > 1000 * ENTRY_OVERHEAD);
        // A reload halves the budget: new entries push old ones out until it holds.
        c.set_bytes(before / 2, 16 * 1024);
        for i in 0..1000 {
            let (k, a) = answer(&format!("b{i}.example"), 60);
            let _ = c.insert(&k, a);
        }
        assert!(c.bytes() <= before / 2);
        // Replacing an entry charges it once; dropping entries gives their bytes back.
        let (k, a) = answer("b1.example", 60);
        let _ = c.insert(&k, a.clone());
        let _ = c.insert(&k, a);
        assert_eq!(c.bytes(), recount(&c));
        c.retain(|_| false);
        assert_eq!((c.bytes(), c.len()), (0, 0));
    }

    #[test]
    fn answers_over_the_cap_are_refused_and_counted() {
        let c = Cache::new(100, 0, NO_PREFETCH);
        c.set_bytes(64 << 20, 16 * 1024);
        let (k, a) = txt("big.example", 20_000);
        assert!(c.insert(&k, a).is_err(), "over max_answer_bytes");
        assert_eq!((c.len(), c.bytes(), c.refused()), (0, 0, 1));
        // Just under the cap is stored.
        let (k, a) = txt("fits.example", 16 * 1024 - 100);
        assert!(c.insert(&k, a).is_ok());
        assert_eq!(c.refused(), 1);
        // A shard's share smaller than the answer refuses it too (never evicts a whole
        // shard for nothing).
        c.set_bytes(64 * 1024, 65_535);
        let (k, a) = txt("shard.example", 2000);
        assert!(c.insert(&k, a).is_err());
        assert_eq!(c.refused(), 2);
    }

    #[test]
    fn fit_policy() {
        assert!(fits(0, 0, 100, 1, 100));
        assert!(!fits(1, 0, 1, 1, 100), "entry budget");
        assert!(!fits(0, 50, 51, 10, 100), "byte budget");
        assert!(fits(0, 50, 50, 10, 100));
        assert!(!fits(0, usize::MAX, 1, 10, usize::MAX - 1), "no overflow");
    }

    const NO_PREFETCH: PrefetchPolicy = PrefetchPolicy {
        enabled: false,
        min_hits: 1,
        percent: 10,
    };

    #[test]
    fn insert_then_hit() {
        let c = Cache::new(100, 0, NO_PREFETCH);
        let (k, a) = answer("a.example", 60);
        assert_eq!(c.with_fresh(&k, c.now_ms(), |_, _| ()), Hit::Miss);
        let _ = c.insert(&k, a);
        assert_eq!(
            c.with_fresh(&k, c.now_ms(), |e, age| (e.answer.ttl, age)),
            Hit::Fresh {
                value: (60, 0),
                prefetch: false
            }
        );
        assert_eq!(c.len(), 1);
        let (k2, _) = answer("b.example", 60);
        assert_eq!(c.with_fresh(&k2, c.now_ms(), |_, _| ()), Hit::Miss);
    }

    #[test]
    fn zero_ttl_not_stored_and_replace_keeps_one() {
        let c = Cache::new(100, 0, NO_PREFETCH);
        let (k, a) = answer("a.example", 0);
        assert!(c.insert(&k, a).is_err());
        assert!(c.is_empty());
        let (k, a) = answer("a.example", 5);
        let _ = c.insert(&k, a.clone());
        let _ = c.insert(&k, a);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn capacity_is_bounded_and_referenced_entries_survive() {
        let c = Cache::new(SHARDS * 4, 0, NO_PREFETCH);
        let (hot, a) = answer("hot.example", 60);
        let _ = c.insert(&hot, a);
        for i in 0..5000 {
            let (k, a) = answer(&format!("n{i}.example"), 60);
            let _ = c.insert(&k, a);
            // keep touching the hot name, as clients would
            assert!(matches!(
                c.with_fresh(&hot, c.now_ms(), |_, _| ()),
                Hit::Fresh { .. }
            ));
        }
        assert!(c.len() <= SHARDS * 4);
    }

    #[test]
    fn prefetch_mark_given_once() {
        let mut c = Cache::new(
            100,
            0,
            PrefetchPolicy {
                enabled: true,
                min_hits: 2,
                percent: 100,
            },
        );
        let (k, a) = answer("p.example", 60);
        let _ = c.insert(&k, a);
        c.epoch -= std::time::Duration::from_secs(2);
        let marks: Vec<bool> = (0..4)
            .map(|_| match c.with_fresh(&k, c.now_ms(), |_, _| ()) {
                Hit::Fresh { prefetch, .. } => prefetch,
                Hit::Miss => panic!("miss"),
            })
            .collect();
        assert_eq!(marks, [false, true, false, false]);
        // A failed prefetch backs off: no mark until PREFETCH_BACKOFF_MS have passed.
        c.prefetch_failed(&k);
        let now = c.now_ms();
        for at in [now, now + PREFETCH_BACKOFF_MS - 1] {
            assert!(matches!(
                c.with_fresh(&k, at, |_, _| ()),
                Hit::Fresh {
                    prefetch: false,
                    ..
                }
            ));
        }
        let later = now + PREFETCH_BACKOFF_MS;
        let marks: Vec<bool> = (0..2)
            .map(|_| match c.with_fresh(&k, later, |_, _| ()) {
                Hit::Fresh { prefetch, .. } => prefetch,
                Hit::Miss => panic!("miss"),
            })
            .collect();
        assert_eq!(marks, [true, false]);
    }

    #[test]
    fn prefetch_back_off_policy() {
        assert!(prefetch_allowed(0, 0), "never tried");
        assert!(
            !prefetch_allowed(PREFETCH_RUNNING, u64::MAX - 1),
            "one runs"
        );
        let mark = prefetch_backoff(1000);
        assert_eq!(mark, 1000 + PREFETCH_BACKOFF_MS);
        assert!(!prefetch_allowed(mark, mark - 1));
        assert!(prefetch_allowed(mark, mark));
        assert_eq!(prefetch_backoff(u64::MAX - 1), PREFETCH_RUNNING - 1);
    }

    #[test]
    fn stale_window_keeps_expired_entries_for_get_only() {
        // An entry stored "in the past": fake by building the cache and moving the epoch.
        let mut c = Cache::new(100, 10, NO_PREFETCH);
        let (k, a) = answer("s.example", 1);
        let _ = c.insert(&k, a);
        c.epoch -= std::time::Duration::from_millis(1500);
        assert_eq!(c.with_fresh(&k, c.now_ms(), |_, _| ()), Hit::Miss);
        assert!(c.get(&k).is_some_and(|e| !e.is_fresh(c.now_ms())));
        c.epoch -= std::time::Duration::from_secs(10);
        assert!(c.get(&k).is_none());
    }
}
