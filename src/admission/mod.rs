//! Admission control: may this request go upstream now, later, or never?
//!
//! * [`bucket`]: an exact token bucket with reservations (GCRA arithmetic);
//! * [`limit`]: a limit as admission uses it, a local bucket or one shared
//!   with other replicas through Redis (`crate::cluster`);
//! * [`tokens`]: the token estimate of a request and the real usage read
//!   from its response;
//! * [`limiter`]: the order SPEC prescribes — global requests and tokens,
//!   the model's requests and tokens, then the model's concurrency permit —
//!   within `queue_timeout`, first come first served.
//!
//! Nothing here does I/O itself; waiting, and a shared limit's occasional
//! round trip to Redis (`cluster::lease`), are the only `.await`s.

pub mod bucket;
pub mod limit;
pub mod limiter;
pub mod tokens;
