//! `weir demo`: the gateway on 127.0.0.1:8080 in front of two embedded mock
//! backends, with no file and no network, so a first-time user sees weir
//! balance, stream and answer in one command.

use std::{net::SocketAddr, time::Duration};

use crate::{
    config::Config,
    gateway::{Gateway, Handle, StartError},
    mock::{self, MockConfig, MockHandle},
};

/// The model both demo backends serve.
pub const DEMO_MODEL: &str = "demo-model";

/// A running demo: the gateway and its two mock backends.
pub struct Demo {
    /// The gateway the user talks to.
    pub gateway: Handle,
    /// The two mock backends, `demo-fast` (weight 3) and `demo-slow` (weight 1).
    pub mocks: Vec<MockHandle>,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A mock backend could not bind a port.
    #[error("starting a mock backend")]
    Mock(#[from] std::io::Error),
    /// The generated config did not validate (a bug).
    #[error("demo config: {0}")]
    Config(String),
    /// The gateway could not start (e.g. the port is taken).
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Starts two mocks with realistic latency and streaming, and the gateway
/// on `listen`.
pub async fn start(listen: SocketAddr) -> Result<Demo, DemoError> {
    let fast = mock::start(
        MockConfig::default()
            .name("demo-fast")
            .models(vec![DEMO_MODEL.to_owned()])
            .latency(Duration::from_millis(40))
            .pace_answers(true)
            .tokens_per_sec(60.0)
            .chunks(24),
    )
    .await?;
    let slow = mock::start(
        MockConfig::default()
            .name("demo-slow")
            .models(vec![DEMO_MODEL.to_owned()])
            .latency(Duration::from_millis(120))
            .pace_answers(true)
            .tokens_per_sec(25.0)
            .chunks(24),
    )
    .await?;
    let config = Config::parse(&demo_toml(listen, &fast, &slow), "<demo>", &|_| None)
        .map_err(|e| DemoError::Config(e.to_string()))?;
    let gateway = Gateway::new(config).start().await?;
    Ok(Demo {
        gateway,
        mocks: vec![fast, slow],
    })
}

impl Demo {
    /// What to type to try it, printed by `weir demo`.
    pub fn instructions(&self) -> String {
        let addr = self.gateway.addr();
        format!(
            r#"weir demo: gateway on http://{addr}/v1 in front of two mock backends
  demo-fast (weight 3) at {fast}
  demo-slow (weight 1) at {slow}

Try it:

  curl -s http://{addr}/v1/chat/completions \
    -H 'content-type: application/json' \
    -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  curl -N http://{addr}/v1/chat/completions \
    -H 'content-type: application/json' \
    -d '{{"model": "{DEMO_MODEL}", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://{addr}/v1", api_key="not-needed")
reply = client.chat.completions.create(model="{DEMO_MODEL}", messages=[{{"role": "user", "content": "Hello"}}])
print(reply.choices[0].message.content)
for chunk in client.chat.completions.create(model="{DEMO_MODEL}", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

Responses carry x-weir-backend (which backend answered). Admin: http://{addr}/admin/backends, http://{addr}/metrics
Ctrl-C stops the demo."#,
            fast = self
                .mocks
                .first()
                .map(MockHandle::base_url)
                .unwrap_or_default(),
            slow = self
                .mocks
                .get(1)
                .map(MockHandle::base_url)
                .unwrap_or_default(),
        )
    }
}

fn demo_toml(listen: SocketAddr, fast: &MockHandle, slow: &MockHandle) -> String {
    format!(
        r#"
[server]
listen = "{listen}"

[[models]]
name = "{DEMO_MODEL}"
requests_per_minute = 600
tokens_per_minute = 200000
max_concurrent = 32

[[backends]]
name = "demo-fast"
url = "{fast}"
models = ["{DEMO_MODEL}"]
weight = 3

[[backends]]
name = "demo-slow"
url = "{slow}"
models = ["{DEMO_MODEL}"]
weight = 1

[health]
enabled = false
"#,
        fast = fast.base_url(),
        slow = slow.base_url(),
    )
}
