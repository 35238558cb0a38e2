//! The cache across restarts: a snapshot of the fresh answers in a memfd that systemd's fd
//! store keeps beside the sockets, so that a restart or an upgrade starts warm instead of
//! sending every pod's names to kube-dns again (a fleet upgrade would otherwise be a
//! synchronised miss storm on CoreDNS).
//!
//! The format is pure and unit-tested ([`encode`], [`decode`]); [`Keeper`] is the I/O
//! edge. The snapshot is written every [`EVERY`] while serving and once more at the stop,
//! after the last answer; a `kill -9` loses only what was cached since the last one.
//!
//! A snapshot is trusted for nothing: each answer is validated again as an upstream answer
//! ([`Answer::from_upstream`], under the current TTL policy) for its own key, its TTLs
//! aged by the time since it was written; a snapshot with a wrong checksum (a write torn
//! by a crash) or another version is ignored whole. `systemctl stop` empties the fd
//! store, so a stop followed by a start begins cold, as it should.
//!
//! Layout (integers little-endian): `LDNSSNAP`, version (1 byte), written at (u64 ms since
//! the Unix epoch), entries (u32), body length (u32), FNV-1a 64 of the body (u64); then per
//! entry: key length (u16), key, answer length (u32), answer (header with ID 0, question,
//! records, TTLs as they stood when written), TTL field count (u16), their offsets (u16).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::Cache;
use crate::dns::{Answer, Key, TtlPolicy};
use crate::systemd::{self, Inherited};

/// The fd store name of the snapshot.
pub const FD_NAME: &str = "cache-snapshot";
/// How often the snapshot is written while serving.
pub const EVERY: Duration = Duration::from_secs(10);
/// A snapshot older than this is not used.
pub const MAX_AGE: Duration = Duration::from_secs(3600);

const MAGIC: &[u8; 8] = b"LDNSSNAP";
const VERSION: u8 = 1;
const HEADER: usize = 8 + 1 + 8 + 4 + 4 + 8;

/// Why a snapshot was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a localdns cache snapshot")]
    NotASnapshot,
    #[error("snapshot version {0}, this localdns reads version {VERSION}")]
    Version(u8),
    #[error("snapshot damaged (length or checksum wrong: a write cut short)")]
    Damaged,
    #[error("snapshot written {0:?} ago, more than {MAX_AGE:?}")]
    TooOld(Duration),
}

/// What [`decode`] found.
#[derive(Debug)]
pub struct Restored {
    pub answers: Vec<(Key, Answer)>,
    /// Entries expired meanwhile or not valid any more.
    pub skipped: usize,
    /// How long ago the snapshot was written.
    pub age: Duration,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Lower every TTL field at `offsets` of `wire` by `age` seconds; `None` when an offset
/// is outside the message.
fn aged(wire: &[u8], offsets: &[u16], age: u32) -> Option<Vec<u8>> {
    let mut out = wire.to_vec();
    for &off in offsets {
        let at = usize::from(off);
        let field = out.get_mut(at..at + 4)?;
        let ttl = u32::from_be_bytes(field.try_into().ok()?);
        field.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
    }
    Some(out)
}

/// The snapshot of `cache`'s fresh positive and negative answers, written at `now`
/// (ms since the Unix epoch).
pub fn encode(cache: &Cache, now: u64) -> Vec<u8> {
    let mut body = Vec::new();
    let mut count: u32 = 0;
    cache.for_each_fresh(|key, answer, age| {
        let (wire, offsets) = answer.parts();
        let (Some(wire), Ok(key_len), Ok(wire_len), Ok(n)) = (
            aged(wire, offsets, age),
            u16::try_from(key.len()),
            u32::try_from(wire.len()),
            u16::try_from(offsets.len()),
        ) else {
            return;
        };
        body.extend_from_slice(&key_len.to_le_bytes());
        body.extend_from_slice(key);
        body.extend_from_slice(&wire_len.to_le_bytes());
        body.extend_from_slice(&wire);
        body.extend_from_slice(&n.to_le_bytes());
        for off in offsets {
            body.extend_from_slice(&off.to_le_bytes());
        }
        count += 1;
    });
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&now.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The entry count of an encoded snapshot.
fn entries(bytes: &[u8]) -> u32 {
    bytes
        .get(17..21)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Reads little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The answers of a snapshot, aged to `now` (ms since the Unix epoch) and validated
/// under `policy`.
pub fn decode(bytes: &[u8], now: u64, policy: &TtlPolicy) -> Result<Restored, SnapshotError> {
    let mut r = Reader(bytes);
    if r.take(8) != Some(MAGIC.as_slice()) {
        return Err(SnapshotError::NotASnapshot);
    }
    let version = r.take(1).ok_or(SnapshotError::Damaged)?[0];
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let (Some(written), Some(count), Some(len), Some(sum)) = (r.u64(), r.u32(), r.u32(), r.u64())
    else {
        return Err(SnapshotError::Damaged);
    };
    let body = r.take(len as usize).ok_or(SnapshotError::Damaged)?;
    if fnv1a(body) != sum {
        return Err(SnapshotError::Damaged);
    }
    // A clock that went back counts as no time at all.
    let age = Duration::from_millis(now.saturating_sub(written));
    if age > MAX_AGE {
        return Err(SnapshotError::TooOld(age));
    }
    let age_secs = age.as_secs() as u32;
    let mut r = Reader(body);
    let mut answers = Vec::with_capacity(count as usize);
    let mut skipped = 0;
    for _ in 0..count {
        let entry = (|| {
            let key_len = r.u16()?;
            let key = r.take(usize::from(key_len))?;
            let wire_len = r.u32()?;
            let wire = r.take(wire_len as usize)?;
            let n = r.u16()?;
            let offsets: Vec<u16> = (0..n).map(|_| r.u16()).collect::<Option<_>>()?;
            Some((key, wire, offsets))
        })();
        // The checksum held, so a short entry is a bug of the writer: stop there.
        let Some((key, wire, offsets)) = entry else {
            return Err(SnapshotError::Damaged);
        };
        let answer = Key::from_bytes(key).and_then(|key| {
            let wire = aged(wire, &offsets, age_secs)?;
            let answer = Answer::from_upstream(&wire, 0, &key, policy).ok()?;
            (answer.ttl > 0 && answer.is_cacheable_kind()).then_some((key, answer))
        });
        match answer {
            Some(a) => answers.push(a),
            None => skipped += 1,
        }
    }
    Ok(Restored {
        answers,
        skipped,
        age,
    })
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The memfd the snapshot lives in, kept in systemd's fd store.
pub struct Keeper {
    file: std::fs::File,
}

/// The whole memfd, from offset 0 whatever offset the last process left.
fn read_all(file: &std::fs::File) -> Option<Vec<u8>> {
    let len = file.metadata().map_or(0, |m| m.len() as usize);
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0).ok().map(|()| bytes)
}

impl Keeper {
    /// The snapshot among the kept descriptors, read and closed (the bridge across a
    /// restart, [`crate::bridge`], restores it and leaves the fd store's copy alone).
    pub fn read_kept(kept: &mut Inherited) -> Option<Vec<u8>> {
        read_all(&std::fs::File::from(kept.take(FD_NAME)?))
    }

    /// The snapshot memfd: the one kept by systemd across the restart (with what it
    /// holds), or a new one handed to the fd store. `None` without systemd (no store to
    /// keep it in) or when no memfd can be made.
    pub fn open(kept: &mut Inherited) -> Option<(Keeper, Option<Vec<u8>>)> {
        std::env::var_os("NOTIFY_SOCKET")?;
        if let Some(fd) = kept.take(FD_NAME) {
            let file = std::fs::File::from(fd);
            let bytes = read_all(&file);
            return Some((Keeper { file }, bytes));
        }
        let fd: OwnedFd = match nix::sys::memfd::memfd_create(
            c"localdns-cache-snapshot",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("no cache snapshot across restarts: memfd_create: {e}");
                return None;
            }
        };
        systemd::store(FD_NAME, fd.as_fd());
        Some((
            Keeper {
                file: std::fs::File::from(fd),
            },
            None,
        ))
    }

    /// The memfd, to hand to the next process ([`crate::handover`]).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Put `cache`'s snapshot in place of the last one. Blocking (a few ms for 20,000
    /// answers): call off the async threads.
    /// Returns the number of answers written.
    pub fn save(&self, cache: &Cache) -> std::io::Result<u32> {
        let bytes = encode(cache, now_unix_ms());
        // Written over the old one, then cut to length: a crash in between leaves a
        // snapshot whose checksum fails, which the next start ignores.
        self.file.write_all_at(&bytes, 0)?;
        self.file.set_len(bytes.len() as u64)?;
        Ok(entries(&bytes))
    }

    /// Fill `cache` from the snapshot `bytes` (what [`Keeper::open`] read); logs what it
    /// did. Returns the number of answers restored.
    pub fn restore(bytes: &[u8], cache: &Cache, policy: &TtlPolicy) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        match decode(bytes, now_unix_ms(), policy) {
            Ok(r) => {
                // What the cache took (a smaller budget than the last process's may refuse
                // some), not what the snapshot held.
                let n = r
                    .answers
                    .into_iter()
                    .filter_map(|(key, answer)| cache.insert(&key, answer).ok())
                    .count();
                tracing::info!(
                    restored = n,
                    skipped = r.skipped,
                    "cache: {n} answers taken over from the previous process (snapshot {} ms old; {} expired or invalid)",
                    r.age.as_millis(),
                    r.skipped
                );
                n
            }
            Err(e) => {
                tracing::warn!(
                    "cache starts empty: the snapshot of the previous process is not used: {e}"
                );
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PrefetchPolicy;
    use crate::dns::answer::tests::POLICY;

    const NO_PREFETCH: PrefetchPolicy = PrefetchPolicy {
        enabled: false,
        min_hits: 0,
        percent: 0,
    };

    fn response(name: &str, ttl: u32) -> (Key, Vec<u8>) {
        crate::dns::answer::tests::a_response(name, ttl)
    }

    fn cache_with(names: &[(&str, u32)]) -> Cache {
        let cache = Cache::new(1000, 0, NO_PREFETCH);
        for (name, ttl) in names {
            let (key, wire) = response(name, *ttl);
            let answer = Answer::from_upstream(&wire, 0, &key, &POLICY).unwrap();
            cache.insert(&key, answer).unwrap();
        }
        cache
    }

    #[test]
    fn a_snapshot_gives_back_every_fresh_answer_aged_by_the_time_since() {
        let cache = cache_with(&[("a.example.", 300), ("b.example.", 60)]);
        let bytes = encode(&cache, 1_000_000);
        assert_eq!(entries(&bytes), 2);
        let r = decode(&bytes, 1_000_000 + 10_500, &POLICY).unwrap();
        assert_eq!(r.skipped, 0);
        assert_eq!(r.age, Duration::from_millis(10_500));
        let mut ttls: Vec<u32> = r.answers.iter().map(|(_, a)| a.ttl).collect();
        ttls.sort();
        assert_eq!(ttls, [50, 290]);
    }

    #[test]
    fn answers_expired_since_are_skipped_and_an_old_snapshot_is_not_used() {
        let cache = cache_with(&[("a.example.", 300), ("b.example.", 5)]);
        let bytes = encode(&cache, 1_000_000);
        let r = decode(&bytes, 1_000_000 + 6_000, &POLICY).unwrap();
        assert_eq!((r.answers.len(), r.skipped), (1, 1));
        let e = decode(&bytes, 1_000_000 + 2 * 3_600_000, &POLICY).unwrap_err();
        assert!(matches!(e, SnapshotError::TooOld(_)), "{e}");
    }

    #[test]
    fn a_torn_or_foreign_snapshot_is_refused_whole() {
        let cache = cache_with(&[("a.example.", 300)]);
        let bytes = encode(&cache, 1_000);
        let mut torn = bytes.clone();
        let last = torn.len() - 1;
        torn[last] ^= 0xff;
        assert_eq!(
            decode(&torn, 1_000, &POLICY).unwrap_err(),
            SnapshotError::Damaged
        );
        assert_eq!(
            decode(&bytes[..bytes.len() - 3], 1_000, &POLICY).unwrap_err(),
            SnapshotError::Damaged
        );
        assert_eq!(
            decode(b"hello", 1_000, &POLICY).unwrap_err(),
            SnapshotError::NotASnapshot
        );
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert_eq!(
            decode(&v2, 1_000, &POLICY).unwrap_err(),
            SnapshotError::Version(2)
        );
        assert!(decode(&[], 1_000, &POLICY).is_err());
    }

    #[test]
    fn an_answer_that_does_not_validate_for_its_key_is_skipped() {
        let cache = cache_with(&[("a.example.", 300)]);
        let mut bytes = encode(&cache, 1_000);
        // Rewrite the stored key's last name byte and fix the checksum: the answer's
        // question no longer matches its key.
        let key_at = HEADER + 2;
        bytes[key_at + 1] ^= 0x01;
        let sum = fnv1a(&bytes[HEADER..]);
        bytes[HEADER - 8..HEADER].copy_from_slice(&sum.to_le_bytes());
        let r = decode(&bytes, 1_000, &POLICY).unwrap();
        assert_eq!((r.answers.len(), r.skipped), (0, 1));
    }

    #[test]
    fn restore_fills_the_cache() {
        let cache = cache_with(&[("a.example.", 300), ("b.example.", 300)]);
        let bytes = encode(&cache, now_unix_ms());
        let fresh = Cache::new(1000, 0, NO_PREFETCH);
        assert_eq!(Keeper::restore(&bytes, &fresh, &POLICY), 2);
        assert_eq!(fresh.len(), 2);
        let (key, _) = response("a.example.", 300);
        assert!(fresh.get(&key).is_some());
    }
}
