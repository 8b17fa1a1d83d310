//! A long-running fuzzer on stable Rust (issue #9): drives the properties
//! of the unit-test proptests with random inputs for as long as asked, and
//! counts inputs, panics and property failures.
//!
//! ```sh
//! cargo run --release --example fuzz -- --minutes 10
//! cargo run --release --example fuzz -- --inputs 1000000 --seed 42
//! ```
//!
//! Properties (SPEC "Hostile input and faults": nothing a client, a backend
//! or a config file sends may make weir panic):
//!
//! * **request facts**: `facts::parse` and `facts::rewrite` answer `Ok` or
//!   an error for any bytes; a body `rewrite` accepts also parses, and its
//!   rewritten form names the new model;
//! * **config**: `Config::parse` answers `Ok` or errors for any text, and
//!   both render;
//! * **SSE usage filter**: whatever the frame boundaries, a filter that does
//!   not strip passes every byte through; one that strips removes exactly
//!   the usage chunk of a generated stream and nothing else; arbitrary
//!   bytes never panic it.
//!
//! Inputs come from a seeded xorshift generator (the seed is printed, so a
//! failure can be replayed) and are a mix of raw random bytes, JSON- or
//! TOML-shaped token soup, and valid inputs with random byte edits. This is
//! not coverage-guided (that needs nightly `cargo fuzz`); it is the same
//! properties at a volume the normal test run cannot afford.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use weir::{
    admission::tokens::UsageFilter,
    api::facts::{parse, rewrite},
    Config,
};

/// xorshift64*: small, fast, good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
    /// Random inserts, deletes and overwrites.
    fn mutate(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        for _ in 0..=self.below(8) {
            let at = self.below(bytes.len() + 1);
            match self.below(3) {
                0 if at < bytes.len() => bytes[at] = self.next() as u8,
                1 => bytes.insert(at, *self.pick(b"{}[]\",:\\ 0e-.\n\r\xff")),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        bytes
    }
    /// `n` random pieces of `vocabulary`, concatenated.
    fn soup(&mut self, vocabulary: &[&str], n: usize) -> String {
        (0..self.below(n + 1))
            .map(|_| *self.pick(vocabulary))
            .collect()
    }
}

const CHATS: &[&str] = &[
    r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}"#,
    r#"{"model":"m","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"user","content":[{"type":"text","text":"hi \u00e9 \ud83d\ude00"}]}],"n":2}"#,
    r#"{"model":"e","input":["a","b",[1,2,3]],"max_completion_tokens":null}"#,
    r#" { "prompt" : "say \"hi\"" , "model" : "x\ty" , "temperature" : 0.5e0 } "#,
];

const JSON_VOCABULARY: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\"model\"",
    "\"stream\"",
    "\"max_tokens\"",
    "\"messages\"",
    "\"content\"",
    "\"stream_options\"",
    "\"include_usage\"",
    "\"n\"",
    "\"prompt\"",
    "\"input\"",
    "true",
    "false",
    "null",
    "0",
    "-1",
    "1e999",
    "4294967296",
    "1.5",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\"é\"",
    " ",
    "\n",
    "\\",
];

const TOML_VOCABULARY: &[&str] = &[
    "[server]\n",
    "[[models]]\n",
    "[[backends]]\n",
    "[health]\n",
    "[retry]\n",
    "[limits]\n",
    "[outlier]\n",
    "[cluster]\n",
    "name = ",
    "url = ",
    "models = ",
    "weight = ",
    "listen = ",
    "request_timeout = ",
    "max_body_bytes = ",
    "requests_per_minute = ",
    "burst = ",
    "liveness = ",
    "rename = ",
    "api_key_env = ",
    "\"m\"",
    "\"b\"",
    "\"http://127.0.0.1:1/v1\"",
    "\"5s\"",
    "\"0s\"",
    "\"-1s\"",
    "\"99999999999999h\"",
    "0",
    "-1",
    "18446744073709551616",
    "1e999",
    "[\"m\"]",
    "{ interval = \"1s\" }",
    "{ \"m\" = \"n\" }",
    "\"UP\"",
    "\n",
    " ",
    "=",
    "\"",
    "#",
    "true",
];

const EXAMPLE_CONFIG: &str = include_str!("../config/weir.toml");

/// Outcome counts of one property family.
#[derive(Default)]
struct Tally {
    inputs: u64,
    panics: u64,
    failures: u64,
}

fn facts_input(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => rng.bytes(512),
        1 => rng.soup(JSON_VOCABULARY, 64).into_bytes(),
        2 => {
            let depth = 100 + rng.below(100);
            let open = *rng.pick(&["[", "{\"a\":"]);
            format!("{{\"model\":\"m\",\"x\":{}1", open.repeat(depth)).into_bytes()
        }
        _ => {
            let chat = *rng.pick(CHATS);
            rng.mutate(chat.as_bytes().to_vec())
        }
    }
}

/// Returns whether the facts properties held.
fn facts_property(body: &[u8], rename: bool) -> bool {
    let parsed = parse(body);
    match rewrite(body, rename.then_some("renamed"), true) {
        Ok(Some(out)) => {
            let want = if rename {
                Some("renamed".to_owned())
            } else {
                parsed.as_ref().ok().map(|f| f.model.clone())
            };
            parsed.is_ok() && parse(&out).ok().map(|f| f.model) == want
        }
        Ok(None) => parsed.is_ok(),
        Err(_) => true,
    }
}

fn config_input(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => String::from_utf8_lossy(&rng.bytes(300)).into_owned(),
        1 => rng.soup(TOML_VOCABULARY, 40),
        _ => String::from_utf8_lossy(&rng.mutate(EXAMPLE_CONFIG.as_bytes().to_vec())).into_owned(),
    }
}

fn config_property(text: &str) -> bool {
    let env = |name: &str| (name == "UP").then(|| "sk-secret".to_owned());
    match Config::parse(text, "fuzz.toml", &env) {
        Ok(config) => !config.render().contains("sk-secret"),
        Err(errors) => {
            let shown = errors.to_string();
            !shown.is_empty() && !shown.contains("sk-secret")
        }
    }
}

/// A generated SSE stream, the same stream without its usage chunk, and
/// frame cut points.
fn sse_input(rng: &mut Rng) -> (Vec<u8>, Vec<u8>, Vec<usize>) {
    let endings = ["\n\n", "\r\n\r\n", "\r\r", "\n\r\n", "\r\n\n"];
    let mut events: Vec<String> = (0..rng.below(8))
        .map(|i| {
            let text = rng.soup(&["a", " ", "\\\"", "usage", ":", "{", "}", "é", "中", "😀"], 12);
            let chunk = serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"content": text}}], "x": i});
            format!("data: {chunk}{}", rng.pick(&endings))
        })
        .collect();
    events.push(format!("data: [DONE]{}", rng.pick(&endings)));
    let usage = format!(
        "data: {{\"id\":\"c\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{}}}}}{}",
        rng.next() % 100_000,
        rng.next() % 100_000,
        rng.pick(&endings)
    );
    let at = rng.below(events.len());
    let stripped = events.concat().into_bytes();
    events.insert(at, usage);
    let input = events.concat().into_bytes();
    let cuts = cut_points(rng, input.len());
    (input, stripped, cuts)
}

fn cut_points(rng: &mut Rng, len: usize) -> Vec<usize> {
    if rng.below(8) == 0 {
        return (0..=len).collect();
    }
    let mut cuts: Vec<usize> = (0..rng.below(12)).map(|_| rng.below(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

/// Runs `input` through a filter in frames cut at `cuts`.
fn filter(strip: bool, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut f = UsageFilter::new(strip);
    let mut out = Vec::with_capacity(input.len());
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(from, input.len());
        out.extend_from_slice(&f.push(Bytes::copy_from_slice(&input[from..cut])));
        from = cut;
    }
    out.extend_from_slice(&f.finish());
    out
}

fn sse_property(input: &[u8], stripped: Option<&[u8]>, cuts: &[usize]) -> bool {
    let passes_through = filter(false, input, cuts) == input;
    let strips = filter(true, input, cuts);
    match stripped {
        Some(want) => passes_through && strips == want,
        None => passes_through,
    }
}

struct Args {
    deadline: Option<Duration>,
    max_inputs: Option<u64>,
    seed: u64,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        deadline: None,
        max_inputs: None,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number: f64 = value
            .parse()
            .map_err(|_| format!("{flag}: {value} is not a number"))?;
        match flag.as_str() {
            "--minutes" => out.deadline = Some(Duration::from_secs_f64(number * 60.0)),
            "--inputs" => out.max_inputs = Some(number as u64),
            "--seed" => out.seed = (number as u64).max(1),
            _ => {
                return Err(format!(
                    "unknown flag {flag}; use --minutes N, --inputs N, --seed S"
                ))
            }
        }
    }
    if out.deadline.is_none() && out.max_inputs.is_none() {
        out.deadline = Some(Duration::from_secs(60));
    }
    Ok(out)
}

/// Runs one input, counting a panic or a failed property.
fn run(tally: &mut Tally, what: &str, input: &dyn std::fmt::Debug, f: impl FnOnce() -> bool) {
    tally.inputs += 1;
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(true) => {}
        Ok(false) => {
            tally.failures += 1;
            if tally.failures <= 5 {
                eprintln!("{what}: property failed for {input:?}");
            }
        }
        Err(_) => {
            tally.panics += 1;
            eprintln!("{what}: PANIC for {input:?}");
        }
    }
}

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuzz: {e}");
            std::process::exit(2);
        }
    };
    println!("fuzz: seed {}", args.seed);
    let mut rng = Rng(args.seed);
    let start = std::time::SystemTime::now();
    let elapsed = || start.elapsed().unwrap_or_default();
    let (mut facts, mut config, mut sse) = (Tally::default(), Tally::default(), Tally::default());
    let mut next_report = Duration::from_secs(10);
    loop {
        let total = facts.inputs + config.inputs + sse.inputs;
        if args.max_inputs.is_some_and(|n| total >= n)
            || args.deadline.is_some_and(|d| elapsed() >= d)
        {
            break;
        }
        if elapsed() >= next_report {
            println!(
                "{:>5.0}s  inputs {total:>10}  panics {}  failures {}",
                elapsed().as_secs_f64(),
                facts.panics + config.panics + sse.panics,
                facts.failures + config.failures + sse.failures
            );
            next_report += Duration::from_secs(10);
        }
        // Config parsing is the slowest property: one input in ten.
        match rng.below(10) {
            0 => {
                let text = config_input(&mut rng);
                run(&mut config, "config", &text, || config_property(&text));
            }
            1..=5 => {
                let body = facts_input(&mut rng);
                let rename = rng.below(2) == 0;
                run(&mut facts, "facts", &String::from_utf8_lossy(&body), || {
                    facts_property(&body, rename)
                });
            }
            _ => {
                let (input, stripped, cuts) = if rng.below(3) == 0 {
                    let input = rng.bytes(400);
                    let cuts = cut_points(&mut rng, input.len());
                    (input, None, cuts)
                } else {
                    let (input, stripped, cuts) = sse_input(&mut rng);
                    (input, Some(stripped), cuts)
                };
                run(&mut sse, "sse", &String::from_utf8_lossy(&input), || {
                    sse_property(&input, stripped.as_deref(), &cuts)
                });
            }
        }
    }
    let total = facts.inputs + config.inputs + sse.inputs;
    let panics = facts.panics + config.panics + sse.panics;
    let failures = facts.failures + config.failures + sse.failures;
    println!(
        "fuzz: {total} inputs in {:.0}s (facts {}, config {}, sse {}); panics {panics}; property failures {failures}; seed {}",
        elapsed().as_secs_f64(),
        facts.inputs,
        config.inputs,
        sse.inputs,
        args.seed
    );
    if panics + failures > 0 {
        std::process::exit(1);
    }
}
