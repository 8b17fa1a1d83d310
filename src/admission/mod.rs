//! Admission control: may this request go upstream now, later, or never?
//!
//! * [`bucket`]: an exact token bucket with reservations (GCRA arithmetic);
//! * [`tokens`]: the token estimate of a request and the real usage read
//!   from its response;
//! * [`limiter`]: the order SPEC prescribes — global requests and tokens,
//!   the model's requests and tokens, then the model's concurrency permit —
//!   within `queue_timeout`, first come first served.
//!
//! Nothing here does I/O; waiting is the only `.await`.

pub mod bucket;
pub mod limiter;
pub mod tokens;
