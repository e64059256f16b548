//! Who may start an SSH handshake: the defences OpenSSH puts in front of authentication, so that
//! a stranger cannot lock every agent out.
//!
//! - `max_startups = "start:rate:full"` (OpenSSH `MaxStartups`): below `start` unauthenticated
//!   connections every new one is admitted; from `start` on, each is dropped with a probability
//!   rising linearly from `rate` % to 100 % at `full`.
//! - `per_source_max_startups`: unauthenticated connections from one source (an IPv4 address, an
//!   IPv6 /64 by default) at once (OpenSSH `PerSourceMaxStartups`).
//! - A penalty box (OpenSSH 9.8's `PerSourcePenalties`): a source whose connection failed to
//!   authenticate, sent something that is not SSH, or let the login grace time run out is refused
//!   for a while; repeated offences add up, to a maximum. Exempt networks are never penalized.
//!   Connections that end without trying to authenticate (OpenSSH's `noauth`: a key exchange the
//!   gateway paid for, then a hang-up) add up silently and are refused only once their penalties
//!   reach `NOAUTH_ENFORCED_FROM` (OpenSSH's `min`), so a scanner or a misconfigured agent now
//!   and then costs nothing, while a flood of key exchanges from one source is stopped.
//! - Known sources (beyond OpenSSH): a source from which a connection authenticated in the last
//!   `KNOWN_FOR` may use `known_source_startups` more unauthenticated connections beyond `full`,
//!   and random early drop does not apply to it. Strangers from many addresses can fill every
//!   slot `max_startups` has, and an agent reconnecting from where it logged in before still gets
//!   in. (A gateway that restarted knows no source until agents log in again.) A known source
//!   is often a NAT that devices share with strangers (a cellular carrier's, a site's): its
//!   penalties are owed, like `NoAuth`'s, and enforced only once they add up to
//!   `known_source_penalty_min_secs`, so one scanner's guess from behind it does not lock the
//!   devices out, and a flood of them is still stopped.
//!
//! Pure bookkeeping (time and randomness come from the caller), so every rule is unit-tested.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::{Limits, Startups};

/// Penalized sources remembered at most; beyond it, expired entries go first, then the oldest.
const MAX_PENALIZED: usize = 65_536;

/// What a connection did that earns its source a penalty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offence {
    /// Credentials were refused and the connection ended without authenticating.
    AuthFail,
    /// The bytes were not SSH (the handshake failed).
    Junk,
    /// Nothing authenticated within the login grace time.
    GraceExceeded,
    /// The client sent its version line, then ended without presenting a credential.
    NoAuth,
}

/// Penalties for `NoAuth` are enforced only once they add up to this (OpenSSH's
/// `PerSourcePenalties min:15`): fifteen hang-ups in a row at the default of 1 s each.
pub const NOAUTH_ENFORCED_FROM: Duration = Duration::from_secs(15);

impl Offence {
    /// Every offence, in discriminant order (the penalty counters are indexed by it).
    pub const ALL: [Offence; 4] = [
        Offence::AuthFail,
        Offence::Junk,
        Offence::GraceExceeded,
        Offence::NoAuth,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Offence::AuthFail => "auth-failed",
            Offence::Junk => "junk",
            Offence::GraceExceeded => "grace-exceeded",
            Offence::NoAuth => "no-auth",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Offence::AuthFail => "authentication failed",
            Offence::Junk => "not SSH",
            Offence::GraceExceeded => "login grace time exceeded",
            Offence::NoAuth => "no authentication attempted",
        }
    }
}

/// How long a source that authenticated stays known (see the module's doc).
pub const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// The settings, from `[limits]`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub startups: Startups,
    /// Unauthenticated connections beyond `startups.full` that only known sources may use.
    pub known_reserve: usize,
    pub per_source: usize,
    pub v6_block: u8,
    pub authfail: Duration,
    pub junk: Duration,
    pub grace: Duration,
    pub noauth: Duration,
    pub max: Duration,
    /// Penalties on a known source are enforced once they add up to this (zero: at once).
    pub known_min: Duration,
    pub exempt: Vec<IpNet>,
}

impl Policy {
    pub fn from_limits(l: &Limits) -> Policy {
        Policy {
            startups: l.max_startups,
            known_reserve: l.known_source_startups,
            per_source: l.per_source_max_startups,
            v6_block: l.per_source_ipv6_prefix,
            authfail: Duration::from_secs(l.penalty_authfail_secs),
            junk: Duration::from_secs(l.penalty_junk_secs),
            grace: Duration::from_secs(l.penalty_grace_secs),
            noauth: Duration::from_secs(l.penalty_noauth_secs),
            max: Duration::from_secs(l.penalty_max_secs),
            known_min: Duration::from_secs(l.known_source_penalty_min_secs),
            exempt: l.penalty_exempt.clone(),
        }
    }

    fn penalty(&self, o: Offence) -> Duration {
        match o {
            Offence::AuthFail => self.authfail,
            Offence::Junk => self.junk,
            Offence::GraceExceeded => self.grace,
            Offence::NoAuth => self.noauth,
        }
    }

    /// The source a peer counts as: its IPv4 address, or its IPv6 address's /`v6_block`.
    fn source(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => ipnet::Ipv6Net::new(v6, self.v6_block)
                    .map(|n| IpAddr::V6(n.network()))
                    .unwrap_or(IpAddr::V6(v6)),
            },
            v4 => v4,
        }
    }
}

#[derive(Default)]
struct State {
    unauthenticated: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Source -> (penalized until, penalty accumulated).
    penalized: HashMap<IpAddr, (Instant, Duration)>,
    /// Source -> until when its `NoAuth` penalties, not enforced yet, last (they run down in
    /// real time, as an enforced penalty does).
    noauth: HashMap<IpAddr, Instant>,
    /// The same for a known source's other penalties (see `Policy::known_min`).
    known_owed: HashMap<IpAddr, Instant>,
    /// Source -> until when it is known (a connection from it authenticated).
    known: HashMap<IpAddr, Instant>,
}

/// Sources that lose their entry at once when a full map needs room (and nothing expired).
const EVICT_BATCH: usize = MAX_PENALIZED / 16;

/// Makes room for `source` in `map` (at most `MAX_PENALIZED` sources): expired entries go
/// first, then, if that is not enough, the `EVICT_BATCH` that expire soonest. A full map is
/// walked once per `EVICT_BATCH` new sources, not once per source: a stranger with more sources
/// than the map holds (an IPv6 /48 is 65,536 /64s) made every new penalty walk it twice under
/// the admission lock, about 0.9 ms each instead of 0.3 µs.
fn make_room<V>(map: &mut HashMap<IpAddr, V>, source: IpAddr, now: Instant, until: impl Fn(&V) -> Instant) {
    if map.len() < MAX_PENALIZED || map.contains_key(&source) {
        return;
    }
    map.retain(|_, v| until(v) > now);
    let excess = (map.len() + EVICT_BATCH).saturating_sub(MAX_PENALIZED);
    if excess == 0 {
        return;
    }
    let mut by_expiry: Vec<(Instant, IpAddr)> = map.iter().map(|(k, v)| (until(v), *k)).collect();
    by_expiry.select_nth_unstable(excess - 1);
    for (_, k) in &by_expiry[..excess] {
        map.remove(k);
    }
}

/// The gateway's admission state: shared by the accept loop and every pre-auth connection.
pub struct Admission {
    policy: Policy,
    state: Mutex<State>,
    /// Penalties enforced since start, by offence (`Offence::ALL` order), for the metrics.
    penalties: [AtomicU64; 4],
}

/// Why a connection was not admitted (the text is the client's and the audit log's reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl Admission {
    pub fn new(policy: Policy) -> Arc<Admission> {
        Arc::new(Admission {
            policy,
            state: Mutex::new(State::default()),
            penalties: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer` at `now`; `roll` is uniform in [0, 1) (the random early
    /// drop's die). The returned slot is held until the connection authenticates or ends.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant, roll: f64) -> Result<Startup, Refused> {
        let p = &self.policy;
        let source = p.source(peer);
        let mut st = self.lock();
        if let Some((until, _)) = st.penalized.get(&source)
            && *until > now
        {
            let left = until.duration_since(now).as_secs().max(1);
            return Err(Refused(format!(
                "source {source} is penalized for {left} s more (earlier connections failed to authenticate, sent junk, timed out or never tried to authenticate)"
            )));
        }
        let Startups { start, rate, full } = p.startups;
        let known = st.known.get(&source).is_some_and(|until| *until > now);
        if known {
            let reserve = p.known_reserve;
            if st.unauthenticated >= full + reserve {
                return Err(Refused(format!(
                    "too many unauthenticated connections ({} of max_startups {start}:{rate}:{full} plus known_source_startups {reserve}); try again later",
                    st.unauthenticated
                )));
            }
        } else if st.unauthenticated >= full {
            return Err(Refused(format!(
                "too many unauthenticated connections ({} of max_startups {start}:{rate}:{full}); try again later",
                st.unauthenticated
            )));
        } else if st.unauthenticated >= start {
            // Linear from `rate` % at `start` to 100 % at `full`, as OpenSSH does.
            let span = (full - start).max(1) as f64;
            let drop = f64::from(rate) / 100.0
                + (1.0 - f64::from(rate) / 100.0) * (st.unauthenticated - start) as f64 / span;
            if roll < drop {
                return Err(Refused(format!(
                    "too many unauthenticated connections ({}, random early drop past {start} of max_startups {start}:{rate}:{full}); try again later",
                    st.unauthenticated
                )));
            }
        }
        let from_source = st.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= p.per_source {
            return Err(Refused(format!(
                "too many unauthenticated connections from {source} ({from_source}, per_source_max_startups = {})",
                p.per_source
            )));
        }
        st.unauthenticated += 1;
        *st.per_source.entry(source).or_insert(0) += 1;
        Ok(Startup {
            admission: self.clone(),
            source,
            released: false,
        })
    }

    /// The source `peer` counts as: its IPv4 address, or its IPv6 address's
    /// `limits.per_source_ipv6_prefix`.
    pub fn source_of(&self, peer: IpAddr) -> IpAddr {
        self.policy.source(peer)
    }

    /// Sources in the penalty box now.
    pub fn penalized(&self, now: Instant) -> usize {
        self.lock()
            .penalized
            .values()
            .filter(|(until, _)| *until > now)
            .count()
    }

    /// Connections admitted and not yet authenticated or ended.
    pub fn unauthenticated(&self) -> usize {
        self.lock().unauthenticated
    }

    /// Sources known now (a connection from them authenticated within `KNOWN_FOR`).
    pub fn known(&self, now: Instant) -> usize {
        self.lock().known.values().filter(|until| **until > now).count()
    }

    /// Penalties enforced since start for `offence`.
    pub fn penalties(&self, offence: Offence) -> u64 {
        self.penalties[offence as usize].load(Ordering::Relaxed)
    }

    fn release(&self, source: IpAddr) {
        let mut st = self.lock();
        Self::release_locked(&mut st, source);
    }

    fn release_locked(st: &mut State, source: IpAddr) {
        st.unauthenticated = st.unauthenticated.saturating_sub(1);
        if let Some(n) = st.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                st.per_source.remove(&source);
            }
        }
    }

    /// Whether a connection from `source` authenticated within `KNOWN_FOR` before `now`.
    fn is_known(&self, source: IpAddr, now: Instant) -> bool {
        self.lock().known.get(&source).is_some_and(|until| *until > now)
    }

    /// Penalizes `source` for `offence` at `now`; returns how long it is refused.
    fn penalize(&self, source: IpAddr, offence: Offence, now: Instant) -> Option<Duration> {
        let p = &self.policy;
        if p.exempt.iter().any(|net| net.contains(&source)) {
            return None;
        }
        let mut add = p.penalty(offence);
        if add.is_zero() {
            return None;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        // Penalties that are owed first and enforced only once they add up: hang-ups (a key
        // exchange now and then is no attack), and anything from a known source (a NAT shared
        // by devices and strangers: one guess from behind it must not lock the devices out).
        let deferred = if offence == Offence::NoAuth {
            Some((&mut st.noauth, NOAUTH_ENFORCED_FROM))
        } else if !p.known_min.is_zero() && st.known.get(&source).is_some_and(|until| *until > now) {
            Some((&mut st.known_owed, p.known_min))
        } else {
            None
        };
        if let Some((ledger, enforced_from)) = deferred {
            make_room(ledger, source, now, |until| *until);
            let owed = ledger.entry(source).or_insert(now);
            *owed = (*owed).max(now) + add;
            let owed_now = owed.duration_since(now);
            if owed_now < enforced_from {
                return None;
            }
            ledger.remove(&source);
            add = owed_now;
        }
        make_room(&mut st.penalized, source, now, |(until, _)| *until);
        let entry = st.penalized.entry(source).or_insert((now, Duration::ZERO));
        // An expired penalty is forgotten; a live one grows.
        let carried = if entry.0 > now { entry.1 } else { Duration::ZERO };
        let total = (carried + add).min(p.max);
        *entry = (now + total, total);
        self.penalties[offence as usize].fetch_add(1, Ordering::Relaxed);
        Some(total)
    }
}

/// A source put in the penalty box.
#[derive(Debug, PartialEq, Eq)]
pub struct Penalty {
    pub source: IpAddr,
    /// How long it is refused from now.
    pub refused_for: Duration,
    /// Whether agents logged in from it within `KNOWN_FOR`: they are refused too, so a NAT or
    /// proxy shared with a misbehaving client locks them out (the operator's remedy is
    /// `limits.penalty_exempt`).
    pub shared_with_agents: bool,
}

/// An admitted, not yet authenticated connection: counted until it authenticates or ends.
pub struct Startup {
    admission: Arc<Admission>,
    source: IpAddr,
    released: bool,
}

impl Startup {
    /// The connection authenticated at `now`: it no longer counts, its source is not penalized,
    /// and the source is known for `KNOWN_FOR`.
    pub fn authenticated(mut self, now: Instant) {
        let mut st = self.admission.lock();
        Admission::release_locked(&mut st, self.source);
        make_room(&mut st.known, self.source, now, |until| *until);
        st.known.insert(self.source, now + KNOWN_FOR);
        self.released = true;
    }

    /// The connection ended for `offence`: its source is penalized (unless exempt). Returns the
    /// penalty, for the log.
    pub fn offended(mut self, offence: Offence, now: Instant) -> Option<Penalty> {
        self.admission.release(self.source);
        self.released = true;
        let refused_for = self.admission.penalize(self.source, offence, now)?;
        Some(Penalty {
            source: self.source,
            refused_for,
            shared_with_agents: self.admission.is_known(self.source, now),
        })
    }
}

impl Drop for Startup {
    fn drop(&mut self) {
        if !self.released {
            self.admission.release(self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            startups: Startups {
                start: 4,
                rate: 50,
                full: 8,
            },
            known_reserve: 2,
            per_source: 3,
            v6_block: 64,
            authfail: Duration::from_secs(5),
            junk: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            noauth: Duration::from_secs(1),
            max: Duration::from_secs(25),
            known_min: Duration::from_secs(20),
            exempt: vec!["10.9.0.0/16".parse().unwrap()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_penalty_box_makes_room_in_batches_from_the_soonest_to_expire() {
        let a = Admission::new(policy());
        let t0 = Instant::now();
        let source = |i: usize| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
        // Each source a microsecond after the one before: each expires a microsecond later.
        let at = |i: usize| t0 + Duration::from_micros(i as u64);
        for i in 0..MAX_PENALIZED {
            a.penalize(source(i), Offence::Junk, at(i));
        }
        let full = at(MAX_PENALIZED);
        assert_eq!(a.penalized(full), MAX_PENALIZED);
        // One more: the batch that expires soonest goes, every other penalty stays.
        a.penalize(source(MAX_PENALIZED), Offence::Junk, full);
        assert_eq!(a.penalized(full), MAX_PENALIZED - EVICT_BATCH + 1);
        let still = |i: usize| a.admit(source(i), full, 1.0).is_err();
        assert!(
            !still(0) && !still(EVICT_BATCH - 1),
            "the soonest to expire made room"
        );
        assert!(still(EVICT_BATCH) && still(MAX_PENALIZED - 1) && still(MAX_PENALIZED));
        // The next batch of new sources fits without evicting anyone.
        for i in 1..EVICT_BATCH {
            a.penalize(source(MAX_PENALIZED + i), Offence::Junk, full);
        }
        assert_eq!(a.penalized(full), MAX_PENALIZED);
        assert!(still(EVICT_BATCH));
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let a = Admission::new(policy());
        let now = Instant::now();
        let held: Vec<Startup> = (0..3)
            .map(|_| a.admit(ip("10.1.0.2"), now, 0.99).unwrap())
            .collect();
        let r = a.admit(ip("10.1.0.2"), now, 0.99).err().unwrap();
        assert!(
            r.0.contains("from 10.1.0.2 (3, per_source_max_startups = 3)"),
            "{r:?}"
        );
        // Another source still gets in.
        assert!(a.admit(ip("10.2.0.2"), now, 0.99).is_ok());
        drop(held);
        assert!(
            a.admit(ip("10.1.0.2"), now, 0.99).is_ok(),
            "slots come back when connections end"
        );
    }

    #[test]
    fn ipv6_sources_are_counted_by_prefix_and_mapped_ipv4_as_ipv4() {
        let a = Admission::new(policy());
        let now = Instant::now();
        let _held: Vec<Startup> = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
            .iter()
            .map(|s| a.admit(ip(s), now, 0.99).unwrap())
            .collect();
        assert!(a.admit(ip("2001:db8::ffff"), now, 0.99).is_err(), "same /64");
        assert!(a.admit(ip("2001:db8:0:1::1"), now, 0.99).is_ok(), "another /64");
        let _v4: Vec<Startup> = (0..3)
            .map(|_| a.admit(ip("10.5.0.1"), now, 0.99).unwrap())
            .collect();
        assert!(a.admit(ip("::ffff:10.5.0.1"), now, 0.99).is_err());
    }

    #[test]
    fn random_early_drop_rises_from_rate_to_full() {
        let a = Admission::new(policy());
        let now = Instant::now();
        let sources = [
            "10.3.0.1", "10.3.0.2", "10.3.0.3", "10.3.0.4", "10.3.0.5", "10.3.0.6", "10.3.0.7", "10.3.0.8",
        ];
        let mut held = Vec::new();
        // Below start: always admitted, whatever the die says.
        for s in &sources[..4] {
            held.push(a.admit(ip(s), now, 0.0).unwrap());
        }
        // At start the drop probability is rate (50 %): a roll under it is dropped, over it not.
        assert!(a.admit(ip(sources[4]), now, 0.49).is_err());
        held.push(a.admit(ip(sources[4]), now, 0.51).unwrap());
        // Past start it rises: 5 of 8 -> 62.5 %.
        assert!(a.admit(ip(sources[5]), now, 0.6).is_err());
        held.push(a.admit(ip(sources[5]), now, 0.63).unwrap());
        held.push(a.admit(ip(sources[6]), now, 0.99).unwrap());
        held.push(a.admit(ip(sources[7]), now, 0.99).unwrap());
        // At full, nothing gets in.
        let r = a.admit(ip("10.3.0.9"), now, 0.9999).err().unwrap();
        assert!(r.0.contains("8 of max_startups 4:50:8"), "{r:?}");
    }

    #[test]
    fn known_sources_get_in_when_strangers_fill_every_slot() {
        let a = Admission::new(policy());
        let t0 = Instant::now();
        a.admit(ip("10.1.0.2"), t0, 0.99).unwrap().authenticated(t0);
        let t1 = t0 + Duration::from_secs(3600);
        // Strangers from three addresses fill every slot max_startups has.
        let mut held: Vec<Startup> = ["10.4.0.1", "10.4.0.2", "10.4.0.3"]
            .iter()
            .flat_map(|s| (0..3).map(|_| a.admit(ip(s), t1, 0.99)))
            .filter_map(Result::ok)
            .collect();
        assert_eq!(held.len(), 8);
        assert!(
            a.admit(ip("10.4.0.4"), t1, 0.99).is_err(),
            "a stranger is refused at full"
        );
        // The known source is not: it has the reserve, and no random drop (the die says drop).
        held.push(a.admit(ip("10.1.0.2"), t1, 0.0).unwrap());
        held.push(a.admit(ip("10.1.0.2"), t1, 0.0).unwrap());
        let r = a.admit(ip("10.1.0.2"), t1, 0.99).err().unwrap();
        assert!(
            r.0.contains("10 of max_startups 4:50:8 plus known_source_startups 2"),
            "{r:?}"
        );
        assert_eq!(a.known(t1), 1);
        // A day later it is a stranger again.
        let later = t0 + KNOWN_FOR + Duration::from_secs(1);
        held.truncate(8);
        assert!(a.admit(ip("10.1.0.2"), later, 0.99).is_err());
        assert_eq!(a.known(later), 0);
    }

    #[test]
    fn offenders_wait_penalties_add_up_to_a_maximum_and_expire() {
        let a = Admission::new(policy());
        let t0 = Instant::now();
        let s = a.admit(ip("10.1.0.2"), t0, 0.99).unwrap();
        assert_eq!(
            s.offended(Offence::Junk, t0),
            Some(Penalty {
                source: ip("10.1.0.2"),
                refused_for: Duration::from_secs(10),
                shared_with_agents: false,
            })
        );
        let r = a
            .admit(ip("10.1.0.2"), t0 + Duration::from_secs(3), 0.99)
            .err()
            .unwrap();
        assert!(r.0.contains("penalized for 7 s more"), "{r:?}");
        assert_eq!(a.penalized(t0), 1);
        // After it expires the source is admitted; offending again while penalized adds up.
        let t1 = t0 + Duration::from_secs(11);
        let s = a.admit(ip("10.1.0.2"), t1, 0.99).unwrap();
        assert_eq!(
            s.offended(Offence::GraceExceeded, t1).unwrap().refused_for,
            Duration::from_secs(10)
        );
        let s2_source = a.admit(ip("10.1.0.9"), t1, 0.99).unwrap();
        drop(s2_source);
        let t2 = t1 + Duration::from_secs(1);
        // A connection admitted before the penalty ends in an offence too: 10 + 10 + 5, capped at 25.
        a.penalize(ip("10.1.0.2"), Offence::GraceExceeded, t2);
        let total = a.penalize(ip("10.1.0.2"), Offence::AuthFail, t2).unwrap();
        assert_eq!(total, Duration::from_secs(25));
        let counted: Vec<u64> = Offence::ALL.iter().map(|o| a.penalties(*o)).collect();
        assert_eq!(
            counted,
            [1, 1, 2, 0],
            "auth-failed, junk, grace-exceeded, no-auth"
        );
        assert_eq!(a.unauthenticated(), 0, "every slot given back");
        // Authenticated connections and exempt networks are never penalized.
        let ok = a.admit(ip("10.7.0.1"), t2, 0.99).unwrap();
        ok.authenticated(t2);
        assert!(a.admit(ip("10.7.0.1"), t2, 0.99).is_ok());
        let exempt = a.admit(ip("10.9.1.1"), t2, 0.99).unwrap();
        assert_eq!(exempt.offended(Offence::Junk, t2), None);
        assert!(a.admit(ip("10.9.1.1"), t2, 0.99).is_ok());
    }

    /// A source agents logged in from (a NAT in front of a fleet, shared with strangers) owes
    /// its penalties first: a guess now and then from behind it is never enforced, so the agents
    /// are not locked out; guesses that add up to `known_min` are, and the penalty says that it
    /// locks the agents out too. A source no agent logged in from is penalized at once.
    #[test]
    fn a_known_source_owes_its_penalties_until_they_add_up() {
        let a = Admission::new(policy());
        let t0 = Instant::now();
        let nat = ip("10.1.0.2");
        a.admit(nat, t0, 0.99).unwrap().authenticated(t0);
        let guess = |t: Instant| a.admit(nat, t, 0.99).unwrap().offended(Offence::AuthFail, t);
        // One guess every 5 s (5 s owed each) runs down as fast as it adds up: never enforced.
        for i in 0..10 {
            assert_eq!(guess(t0 + Duration::from_secs(5 * i)), None, "guess {i}");
        }
        // Four in a row owe 20 s: enforced, for what is owed.
        let t1 = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(guess(t1), None);
        }
        let penalty = guess(t1).unwrap();
        assert_eq!(penalty.refused_for, Duration::from_secs(20));
        assert!(penalty.shared_with_agents, "{penalty:?}");
        assert!(a.admit(nat, t1, 0.99).is_err(), "refused like any source");
        // A stranger's source: at once, and nothing about agents.
        let elsewhere = a.admit(ip("10.1.0.3"), t1, 0.99).unwrap();
        let penalty = elsewhere.offended(Offence::AuthFail, t1).unwrap();
        assert_eq!(penalty.refused_for, Duration::from_secs(5));
        assert!(!penalty.shared_with_agents);
        // Known no longer, a day later: at once again.
        let later = t1 + KNOWN_FOR + Duration::from_secs(1);
        let again = a
            .admit(nat, later, 0.99)
            .unwrap()
            .offended(Offence::AuthFail, later);
        assert_eq!(again.map(|p| p.shared_with_agents), Some(false));
        // With known_min = 0 a known source is penalized at once.
        let strict = Admission::new(Policy {
            known_min: Duration::ZERO,
            ..policy()
        });
        strict.admit(nat, t0, 0.99).unwrap().authenticated(t0);
        let at_once = strict.admit(nat, t0, 0.99).unwrap().offended(Offence::Junk, t0);
        assert_eq!(at_once.map(|p| p.refused_for), Some(Duration::from_secs(10)));
    }

    #[test]
    fn hang_ups_without_authenticating_are_refused_only_once_they_add_up() {
        let a = Admission::new(policy());
        let t0 = Instant::now();
        let src = ip("10.1.0.2");
        // Fourteen in the same second: each owes 1 s, nothing is enforced yet.
        for _ in 0..14 {
            assert_eq!(a.penalize(src, Offence::NoAuth, t0), None);
            assert!(a.admit(src, t0, 0.99).is_ok(), "below the threshold");
        }
        assert_eq!(a.penalties(Offence::NoAuth), 0, "owed, not enforced");
        // The fifteenth reaches NOAUTH_ENFORCED_FROM: the source is refused for all of it.
        assert_eq!(a.penalize(src, Offence::NoAuth, t0), Some(NOAUTH_ENFORCED_FROM));
        assert_eq!(a.penalties(Offence::NoAuth), 1);
        let r = a.admit(src, t0, 0.99).err().unwrap();
        assert!(r.0.contains("penalized for 15 s more"), "{r:?}");
        // Once served, the debt starts afresh.
        let t1 = t0 + Duration::from_secs(16);
        assert!(a.admit(src, t1, 0.99).is_ok());
        assert_eq!(a.penalize(src, Offence::NoAuth, t1), None);

        // What is owed runs down in real time: one hang-up a second never adds up.
        let slow = ip("10.1.0.3");
        for i in 0..100 {
            let t = t0 + Duration::from_secs(i);
            assert_eq!(a.penalize(slow, Offence::NoAuth, t), None, "hang-up {i}");
        }
        // Exempt networks owe nothing; 0 s turns it off.
        for _ in 0..20 {
            assert_eq!(a.penalize(ip("10.9.0.1"), Offence::NoAuth, t0), None);
        }
        let off = Admission::new(Policy {
            noauth: Duration::ZERO,
            ..policy()
        });
        for _ in 0..20 {
            assert_eq!(off.penalize(src, Offence::NoAuth, t0), None);
        }
    }

    #[test]
    fn offences_are_listed_in_discriminant_order() {
        for (i, o) in Offence::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i, "{o:?}");
        }
    }
}
