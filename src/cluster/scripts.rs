//! The bucket arithmetic of a shared limit, run inside Redis as Lua scripts
//! (`EVALSHA` through `redis::Script`, which falls back to `EVAL` once after
//! a Redis restart forgot the script), and the replica registry.
//!
//! Each script reads the state, decides and writes it back in one atomic
//! step, with Redis' own `TIME` as the clock, so replicas whose clocks
//! disagree still agree on the bucket. The arithmetic is
//! [`crate::admission::bucket`]'s GCRA with debt, written for Lua.
//!
//! # Units, and why everything stays exact
//!
//! Lua numbers are doubles: integers are exact up to 2^53. `bucket.rs` keeps
//! `tat` in nanoseconds × rate, which overflows that at once, so the state
//! here is kept differently, per key, as a hash:
//!
//! * `t`: the last update, in microseconds since the Unix epoch (about
//!   1.8 × 10^15 today, exact);
//! * `d`: the *deficit* at `t`, `max(0, tat - t)`, in units chosen per
//!   limit so that a token costs a whole number of units and a clock tick
//!   refills a whole number of units.
//!
//! With `r` tokens per minute and a tick of `q` µs (normally 1), a minute has
//! `M = 60e6 / q` ticks; with `g = gcd(r, M)`, one token costs `T = M / g`
//! units and a tick refills `k = r / g` units (`k / T = r / M` tokens per
//! tick, exactly). [`Params::new`] picks the smallest tick (1 µs, else 1 ms,
//! else 1 s) for which the whole bucket, `c × T`, stays under 2^50 units, so
//! sums stay below 2^53 and every operation is exact integer arithmetic;
//! the deficit saturates at 2^52 units, far beyond any wait a request would
//! accept. For the usual limits the tick is 1 µs (600 RPM: `T = 10^5`,
//! `k = 1`); only a bucket of more than about 18 million tokens whose rate
//! shares no factor with 60 × 10^6 needs the 1 ms tick. Waits are rounded up
//! to the tick: never shorter than the exact wait.
//!
//! Then, as in `bucket.rs` with `D` the deficit:
//!
//! * refill: `D = max(0, D - ticks × k)` for the ticks between `t` and now;
//! * level = `c - D / T` tokens (negative = debt);
//! * reserve `n`: `D' = D + n × T`, wait `ceil(max(0, D' - c × T) / k)`
//!   ticks, refused (nothing taken) if longer than the caller's `max_wait`;
//! * take up to `n` (a lease): grant `min(n, floor((c × T - D) / T))`;
//! * refund `n`: `D = max(0, D - n × T)`; charge `n`: `D = D + n × T`.
//!
//! A key whose limits differ from the caller's (a reload, or replicas
//! mid-rollout) is converted keeping its level, as `Bucket::set_limits`
//! does, the deficit rounded up. Every write sets a TTL of the time until
//! the bucket is full again plus a minute: abandoned state expires, and an
//! expired key is a full bucket, which is what it would be by then anyway.
//!
//! This module does only the Redis calls; it keeps no state and decides
//! nothing about leases or fallback (see [`super::lease`]).

use std::time::Duration;

use redis::{aio::ConnectionManager, RedisResult, Script};

/// The prologue every bucket script shares: exact integer helpers, the
/// clock, and the state brought up to now at the caller's limits.
///
/// `KEYS[1]`: the bucket's hash. `ARGV[1..5]`: `c`, `T`, `k`, `q` (see the
/// module doc) and a clock override in µs (`-1` = Redis `TIME`; the tests
/// pass explicit times so they can check every result exactly).
const PROLOGUE: &str = r#"
local MAX = 4503599627370496 -- 2^52: the deficit saturates here
local function idiv(a, b) -- floor(a / b), exact for integers below 2^53
  local x = math.floor(a / b)
  if x * b > a then x = x - 1 elseif (x + 1) * b <= a then x = x + 1 end
  return x
end
local function cdiv(a, b) -- ceil(a / b)
  local x = idiv(a, b)
  if x * b < a then x = x + 1 end
  return x
end
local function int(x) return string.format('%.0f', x) end
local c, T, k, q = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = tonumber(ARGV[5])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local full = c * T
local d, t = 0, now
local s = redis.call('HMGET', KEYS[1], 'd', 't', 'c', 'T', 'k', 'q')
if s[1] then
  d, t = tonumber(s[1]), tonumber(s[2])
  local oc, oT, ok, oq = tonumber(s[3]), tonumber(s[4]), tonumber(s[5]), tonumber(s[6])
  if now > t then
    -- Exact while d < 2^53: a product too large to be exact exceeds d.
    d = math.max(0, d - (idiv(now, oq) - idiv(t, oq)) * ok)
    t = now
  end
  if oc ~= c or oT ~= T or ok ~= k or oq ~= q then
    local whole = idiv(d, oT)
    d = math.min(MAX, whole * T + cdiv((d - whole * oT) * T, oT))
    if c >= oc then d = math.min(MAX, d + (c - oc) * T) else d = math.max(0, d - (oc - c) * T) end
  end
end
local function save()
  redis.call('HSET', KEYS[1], 'd', int(d), 't', int(t), 'c', ARGV[1], 'T', ARGV[2], 'k', ARGV[3], 'q', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], int(math.min(1e12, cdiv(cdiv(d, k) * q, 1000) + 60000)))
end
local function remaining() if d >= full then return 0 end return c - cdiv(d, T) end
local function reset() return math.min(MAX, cdiv(d, k) * q) end
"#;

/// `ARGV[6]` = `n`, `ARGV[7]` = `max_wait` in µs. Returns `{status, wait µs,
/// remaining, reset µs}`: status 1 = reserved (wait may be > 0), 0 = refused
/// (would wait `wait`; nothing taken), -1 = more than the capacity.
const RESERVE: &str = r#"
local n, max_wait = tonumber(ARGV[6]), tonumber(ARGV[7])
if n > c then return {-1, 0, remaining(), reset()} end
local nd = math.min(MAX, d + n * T)
local wait = 0
if nd > full then wait = math.min(MAX, cdiv(nd - full, k) * q) end
if wait > max_wait then
  save()
  return {0, wait, remaining(), reset()}
end
d = nd
save()
return {1, wait, remaining(), reset()}
"#;

/// `ARGV[6]` = tokens to refund, `ARGV[7]` = tokens to charge, `ARGV[8]` =
/// tokens wanted. Refunds, then charges, then grants up to the wanted tokens
/// the bucket holds right now (never into debt). Returns `{granted,
/// remaining, reset µs, µs until the next whole token}`.
const LEASE: &str = r#"
local back, owe, want = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
d = math.max(0, d - back * T)
d = math.min(MAX, d + owe * T)
local granted = 0
if d < full then granted = math.min(want, idiv(full - d, T)) end
d = d + granted * T
save()
local next = 0
if d + T > full then next = math.min(MAX, cdiv(d + T - full, k) * q) end
return {granted, remaining(), reset(), next}
"#;

/// The replica registry: a sorted set of replica ids scored by the Redis
/// time (ms) they were last seen. `ARGV[1]` = replica id, `ARGV[2]` = how
/// long (ms) a replica counts as alive after its last heartbeat, `ARGV[3]` =
/// `1` to leave. Drops the expired, returns how many remain.
const HEARTBEAT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local window = tonumber(ARGV[2])
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - window))
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', window * 2))
return redis.call('ZCARD', KEYS[1])
"#;

/// Above this many units a bucket's figures could stop being exact in Lua
/// (see the module doc): `c × T` and `k` stay at or below it.
const MAX_UNITS: u64 = 1 << 50;

/// The three compiled scripts; built once per [`super::Cluster`].
pub(crate) struct Scripts {
    reserve: Script,
    lease: Script,
    heartbeat: Script,
}

/// A limit's figures in the script's units (module doc: `c`, `T`, `k`, `q`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// `c`: tokens the bucket holds when full.
    pub capacity: u64,
    /// `T`: units one token costs.
    pub token_cost: u64,
    /// `k`: units refilled per tick.
    pub refill_per_tick: u64,
    /// `q`: microseconds per tick (1, 1000 or 1 000 000).
    pub tick_us: u64,
}

/// What a reservation in Redis came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserved {
    /// Taken; the caller proceeds after `wait`.
    Taken {
        /// How long until the tokens are covered (zero: at once).
        wait: Duration,
        /// The bucket as the reservation left it.
        report: Report,
    },
    /// Refused: it would have waited `wait`, longer than allowed. Nothing
    /// was taken.
    WouldWait {
        /// The exact wait (rounded up to the tick).
        wait: Duration,
        /// The bucket, untouched by this request.
        report: Report,
    },
    /// More tokens than the bucket holds when full.
    TooLarge,
}

/// A lease top-up's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leased {
    /// Tokens granted (at most the wanted ones, never into debt).
    pub granted: u64,
    /// The bucket after the grant.
    pub report: Report,
    /// How long until the bucket holds one more whole token.
    pub next_token: Duration,
}

/// A bucket's level as Redis reported it: the `x-ratelimit-*` figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Report {
    /// Whole tokens available (0 in debt).
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

impl Params {
    /// The units for `rate_per_minute` and `capacity`, or `None` when even
    /// a 1 s tick cannot keep them exact (a bucket beyond about 10^13
    /// tokens, or a rate beyond 2^50 per minute): such a limit is not
    /// shared, and the caller keeps it per process.
    pub(crate) fn new(rate_per_minute: u64, capacity: u64) -> Option<Params> {
        if rate_per_minute == 0 || capacity == 0 {
            return None;
        }
        [1u64, 1_000, 1_000_000].into_iter().find_map(|tick_us| {
            let ticks_per_minute = 60_000_000 / tick_us;
            let g = gcd(rate_per_minute, ticks_per_minute);
            let params = Params {
                capacity,
                token_cost: ticks_per_minute / g,
                refill_per_tick: rate_per_minute / g,
                tick_us,
            };
            let full = capacity.checked_mul(params.token_cost)?;
            (full <= MAX_UNITS && params.refill_per_tick <= MAX_UNITS).then_some(params)
        })
    }
}

impl Scripts {
    /// Compiles the scripts (only hashes them; Redis sees them on first use).
    pub(crate) fn new() -> Self {
        Self {
            reserve: Script::new(&format!("{PROLOGUE}{RESERVE}")),
            lease: Script::new(&format!("{PROLOGUE}{LEASE}")),
            heartbeat: Script::new(HEARTBEAT),
        }
    }

    /// Loads the bucket scripts into Redis' script cache, so a request's
    /// first slow-path call after a join (a fresh or restarted Redis has
    /// none) is one round trip, as its wait assumes, not `EVALSHA`,
    /// `NOSCRIPT` and another round.
    pub(crate) async fn load(&self, conn: &mut ConnectionManager) -> RedisResult<()> {
        self.reserve.load_async(conn).await?;
        self.lease.load_async(conn).await?;
        Ok(())
    }

    /// Reserves `n` tokens if they are covered within `max_wait`
    /// (`Bucket::reserve` in Redis). `now_us` overrides Redis' clock (tests).
    pub(crate) async fn reserve(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
        params: Params,
        n: u64,
        max_wait: Duration,
        now_us: Option<u64>,
    ) -> RedisResult<Reserved> {
        // Beyond 2^52 µs (142 years) the script saturates anyway.
        let max_wait_us = u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX);
        let (status, wait, remaining, reset): (i64, u64, u64, u64) = self
            .reserve
            .key(key)
            .arg(&bucket_args(params, now_us)[..])
            .arg(n)
            .arg(max_wait_us.min(1 << 52))
            .invoke_async(conn)
            .await?;
        let report = Report {
            remaining,
            reset: Duration::from_micros(reset),
        };
        let wait = Duration::from_micros(wait);
        Ok(match status {
            1 => Reserved::Taken { wait, report },
            0 => Reserved::WouldWait { wait, report },
            _ => Reserved::TooLarge,
        })
    }

    /// Refunds `refund`, charges `charge`, then takes up to `want` tokens
    /// the bucket holds now, in one step. With `want = 0` it is a plain
    /// refund and/or charge; with nothing to give, a look at the level.
    pub(crate) async fn lease(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
        params: Params,
        (refund, charge, want): (u64, u64, u64),
        now_us: Option<u64>,
    ) -> RedisResult<Leased> {
        let (granted, remaining, reset, next): (u64, u64, u64, u64) = self
            .lease
            .key(key)
            .arg(&bucket_args(params, now_us)[..])
            .arg(refund)
            .arg(charge)
            .arg(want)
            .invoke_async(conn)
            .await?;
        Ok(Leased {
            granted,
            report: Report {
                remaining,
                reset: Duration::from_micros(reset),
            },
            next_token: Duration::from_micros(next),
        })
    }

    /// Marks `replica` alive (or gone, with `leave`) in the registry at
    /// `key` and returns how many replicas were seen within `window`.
    pub(crate) async fn heartbeat(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
        replica: &str,
        window: Duration,
        leave: bool,
    ) -> RedisResult<u64> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.heartbeat
            .key(key)
            .arg(replica)
            .arg(window_ms)
            .arg(if leave { "1" } else { "0" })
            .invoke_async(conn)
            .await
    }
}

/// `ARGV[1..5]` of a bucket script: `c`, `T`, `k`, `q`, clock override.
fn bucket_args(params: Params, now_us: Option<u64>) -> [String; 5] {
    [
        params.capacity.to_string(),
        params.token_cost.to_string(),
        params.refill_per_tick.to_string(),
        params.tick_us.to_string(),
        now_us.map_or_else(|| "-1".to_owned(), |t| t.to_string()),
    ]
}

/// Greatest common divisor (Euclid); `gcd(a, 0) = a`.
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use tokio::time::Instant;

    use super::*;
    use crate::admission::bucket::{Bucket, ReserveError};
    use crate::cluster::test_redis::TestRedis;

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    /// Microseconds as the bucket's nanosecond waits round them: up.
    fn ceil_us(d: Duration) -> Duration {
        Duration::from_micros(u64::try_from(d.as_nanos().div_ceil(1000)).unwrap())
    }

    /// A small deterministic generator (xorshift64*), so a failure replays.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
        }
    }

    #[test]
    fn units_are_whole_and_small_enough_to_stay_exact() {
        let p = Params::new(600, 600).unwrap();
        assert_eq!(
            (p.token_cost, p.refill_per_tick, p.tick_us),
            (100_000, 1, 1)
        );
        let p = Params::new(7, 1).unwrap();
        assert_eq!(
            (p.token_cost, p.refill_per_tick, p.tick_us),
            (60_000_000, 7, 1)
        );
        // A large bucket whose (prime) rate shares nothing with 60e6 needs
        // the millisecond tick to stay under 2^50 units.
        let p = Params::new(1_000_000_007, 1_000_000_007).unwrap();
        assert_eq!((p.token_cost, p.tick_us), (60_000, 1_000));
        // The bench's 10^12 tokens/min shares 2 × 10^7 with 60e6: 3 units a token.
        let p = Params::new(1_000_000_000_000, 1_000_000_000_000).unwrap();
        assert_eq!((p.token_cost, p.refill_per_tick, p.tick_us), (3, 50_000, 1));
        assert_eq!(Params::new(u64::MAX, u64::MAX), None);
        assert_eq!(Params::new(0, 1), None);
        for (rate, capacity) in [
            (1, 1),
            (600, 10),
            (7, 3),
            (1_000_000, 1_000_000),
            (u64::from(u32::MAX), u64::from(u32::MAX)),
        ] {
            let p = Params::new(rate, capacity).unwrap();
            assert!(p.capacity * p.token_cost <= MAX_UNITS, "{rate} {capacity}");
            // k / T tokens per tick is exactly rate / ticks-per-minute.
            let ticks_per_minute = 60_000_000 / p.tick_us;
            assert_eq!(
                u128::from(p.refill_per_tick) * u128::from(ticks_per_minute),
                u128::from(rate) * u128::from(p.token_cost)
            );
        }
    }

    /// Every script operation, at explicit Redis times, against the local
    /// bucket at the same instants: same admissions, waits (the bucket's
    /// nanoseconds rounded up to Redis' microseconds) and levels.
    #[tokio::test]
    async fn scripts_match_the_local_bucket_exactly() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let mut conn = redis.connect().await;
        let scripts = Scripts::new();
        let base_us: u64 = 1_800_000_000_000_000; // ~2027, like Redis TIME
        for (case, (rate, capacity)) in [(600, 10), (7, 3), (150_000, 150_000), (60, 1)]
            .into_iter()
            .enumerate()
        {
            let key = format!("t:exact:{case}");
            let params = Params::new(rate, capacity).unwrap();
            assert_eq!(params.tick_us, 1);
            let t0 = Instant::now();
            let bucket = Bucket::new(nz(rate), nz(capacity), t0);
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ rate);
            let mut at_us = 0u64;
            for step in 0..400 {
                at_us += rng.below(3) * rng.below(60_000_000 / rate * 2);
                let now = t0 + Duration::from_micros(at_us);
                let redis_now = Some(base_us + at_us);
                let n = rng.below(capacity + 2);
                let what = rng.below(10);
                match what {
                    0..=4 => {
                        let max_wait = Duration::from_micros(rng.below(3) * rng.below(2_000_000));
                        let got = scripts
                            .reserve(&mut conn, &key, params, n, max_wait, redis_now)
                            .await
                            .unwrap();
                        let want = bucket.reserve(n, now, max_wait);
                        match (got, want) {
                            (Reserved::Taken { wait, .. }, Ok(w)) => {
                                assert_eq!(wait, ceil_us(w), "case {case} step {step}");
                            }
                            (
                                Reserved::WouldWait { wait, .. },
                                Err(ReserveError::WouldWait { wait: w }),
                            ) => {
                                assert_eq!(wait, ceil_us(w), "case {case} step {step}");
                            }
                            (Reserved::TooLarge, Err(ReserveError::TooLarge { .. })) => {}
                            // The bucket compares nanoseconds with max_wait,
                            // Redis microseconds rounded up: they may differ
                            // only when max_wait falls inside that rounding.
                            (Reserved::WouldWait { wait, .. }, Ok(w)) => {
                                assert!(
                                    w <= max_wait && wait > max_wait && wait == ceil_us(w),
                                    "case {case} step {step}"
                                );
                                let _ = bucket.refund(n, now);
                            }
                            other => panic!("case {case} step {step}: {other:?}"),
                        }
                    }
                    5..=6 => {
                        // take_up_to: a lease top-up without refund or charge.
                        let got = scripts
                            .lease(&mut conn, &key, params, (0, 0, n), redis_now)
                            .await
                            .unwrap();
                        let expected = bucket.remaining(now).min(n);
                        assert_eq!(got.granted, expected, "case {case} step {step}");
                        bucket.charge(expected, now);
                        let next = bucket.wait_for(1, now).map(ceil_us);
                        assert_eq!(Ok(got.next_token), next, "case {case} step {step}");
                    }
                    7..=8 => {
                        scripts
                            .lease(&mut conn, &key, params, (n, 0, 0), redis_now)
                            .await
                            .unwrap();
                        let _ = bucket.refund(n, now);
                    }
                    _ => {
                        scripts
                            .lease(&mut conn, &key, params, (0, n, 0), redis_now)
                            .await
                            .unwrap();
                        bucket.charge(n, now);
                    }
                }
                let look = scripts
                    .lease(&mut conn, &key, params, (0, 0, 0), redis_now)
                    .await
                    .unwrap();
                assert_eq!(
                    (look.report.remaining, look.report.reset),
                    (bucket.remaining(now), ceil_us(bucket.reset_after(now))),
                    "case {case} step {step} (op {what}, n {n})"
                );
            }
        }
    }

    #[tokio::test]
    async fn reserve_refund_charge_and_take_by_hand() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let mut conn = redis.connect().await;
        let s = Scripts::new();
        let p = Params::new(600, 10).unwrap(); // a token every 100 ms
        let t = |ms: u64| Some(1_800_000_000_000_000 + ms * 1000);
        let ms = Duration::from_millis;
        // A new key is a full bucket.
        let r = s
            .reserve(&mut conn, "h", p, 8, Duration::ZERO, t(0))
            .await
            .unwrap();
        assert_eq!(
            r,
            Reserved::Taken {
                wait: Duration::ZERO,
                report: Report {
                    remaining: 2,
                    reset: ms(800)
                }
            }
        );
        // 3 more: 1 token of debt, covered in 100 ms; refused without waiting.
        let r = s.reserve(&mut conn, "h", p, 3, ms(99), t(0)).await.unwrap();
        assert!(matches!(r, Reserved::WouldWait { wait, .. } if wait == ms(100)));
        let r = s
            .reserve(&mut conn, "h", p, 3, ms(100), t(0))
            .await
            .unwrap();
        assert!(matches!(r, Reserved::Taken { wait, .. } if wait == ms(100)));
        assert_eq!(
            s.reserve(&mut conn, "h", p, 11, ms(1), t(0)).await.unwrap(),
            Reserved::TooLarge
        );
        // Refund 5: level 4; take up to 10 grants the 4 whole tokens.
        let l = s.lease(&mut conn, "h", p, (5, 0, 10), t(0)).await.unwrap();
        assert_eq!(
            (l.granted, l.report.remaining, l.next_token),
            (4, 0, ms(100))
        );
        // 150 ms later 1.5 tokens refilled: one whole granted, the next in 50 ms.
        let l = s
            .lease(&mut conn, "h", p, (0, 0, 10), t(150))
            .await
            .unwrap();
        assert_eq!((l.granted, l.next_token), (1, ms(50)));
        // Charge 3: debt of 2.5 tokens; a token needs 350 ms.
        let l = s
            .lease(&mut conn, "h", p, (0, 3, 10), t(150))
            .await
            .unwrap();
        assert_eq!(
            (l.granted, l.report.remaining, l.next_token),
            (0, 0, ms(350))
        );
        assert_eq!(l.report.reset, ms(1250));
        // Refunds never overfill: after a long time the bucket is full.
        let l = s
            .lease(&mut conn, "h", p, (100, 0, 0), t(60_000))
            .await
            .unwrap();
        assert_eq!((l.report.remaining, l.report.reset), (10, Duration::ZERO));
        // Redis' own clock works too (no override).
        let l = s.lease(&mut conn, "h2", p, (0, 0, 3), None).await.unwrap();
        assert_eq!(l.granted, 3);
        // State expires once full again plus a minute.
        let mut raw = redis.connect().await;
        let ttl: i64 = redis::cmd("PTTL")
            .arg("h2")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!((60_000..=60_300).contains(&ttl), "{ttl}");
    }

    #[tokio::test]
    async fn changed_limits_keep_the_level() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let mut conn = redis.connect().await;
        let s = Scripts::new();
        let t = Some(1_800_000_000_000_000);
        let old = Params::new(600, 10).unwrap();
        s.reserve(&mut conn, "c", old, 7, Duration::ZERO, t)
            .await
            .unwrap();
        // Same as Bucket::set_limits: raising the capacity keeps the 3 tokens.
        let new = Params::new(60, 20).unwrap();
        let l = s.lease(&mut conn, "c", new, (0, 0, 0), t).await.unwrap();
        assert_eq!(
            (l.report.remaining, l.report.reset),
            (3, Duration::from_secs(17))
        );
        // Lowering it clamps.
        let small = Params::new(60, 2).unwrap();
        let l = s.lease(&mut conn, "c", small, (0, 0, 0), t).await.unwrap();
        assert_eq!((l.report.remaining, l.report.reset), (2, Duration::ZERO));
        // A rate of 7 has another token cost: a fractional level survives
        // with the deficit rounded up (one unit at most).
        let seven = Params::new(7, 1).unwrap();
        s.reserve(&mut conn, "f", seven, 1, Duration::ZERO, t)
            .await
            .unwrap();
        let t3 = Some(1_800_000_003_000_000);
        let l = s
            .lease(&mut conn, "f", Params::new(600, 1).unwrap(), (0, 0, 0), t3)
            .await
            .unwrap();
        assert_eq!(l.report.reset, Duration::from_millis(65));
    }

    #[tokio::test]
    async fn heartbeats_count_the_live_replicas() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let mut conn = redis.connect().await;
        let s = Scripts::new();
        let w = Duration::from_secs(5);
        assert_eq!(s.heartbeat(&mut conn, "r", "a", w, false).await.unwrap(), 1);
        assert_eq!(s.heartbeat(&mut conn, "r", "b", w, false).await.unwrap(), 2);
        assert_eq!(s.heartbeat(&mut conn, "r", "a", w, false).await.unwrap(), 2);
        assert_eq!(s.heartbeat(&mut conn, "r", "b", w, true).await.unwrap(), 1);
        // A replica silent for longer than the window drops out.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let short = Duration::from_millis(50);
        assert_eq!(
            s.heartbeat(&mut conn, "r", "c", short, false)
                .await
                .unwrap(),
            1
        );
    }
}
