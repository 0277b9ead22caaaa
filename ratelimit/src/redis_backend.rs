//! The Redis (or Valkey) [`Backend`]: GCRA in a server-side Lua script, one round trip per
//! check, on Redis's own clock (`TIME`), so replicas with skewed clocks agree.
//!
//! - URL: `redis://[user:password@]host:port/db` or `rediss://...` (TLS); AUTH comes from the
//!   URL. The URL is never logged (it may hold a password).
//! - Keys: `caregate:rl:{<key>}`: the whole bucket key is the hash tag, so under Redis Cluster
//!   each bucket lives on one slot and the script touches one key.
//! - The script is sent by `EVALSHA`, and loaded (`SCRIPT LOAD` through `EVAL` fallback of
//!   `redis::Script`) when the server does not know it.
//! - Each key expires when its bucket is full again, so Redis holds only active keys.

use crate::cluster::{Backend, BackendError};
use crate::gcra::{Outcome, Quota};
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use std::sync::Mutex;
use std::time::Duration;

/// GCRA in Lua. KEYS[1]: the bucket. ARGV: interval (us), tolerance (us), cost (units).
/// Returns {allowed (0|1), remaining, retry_after_us, reset_after_us}.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allow_at = new_tat - tolerance
if now < allow_at then
  local remaining = math.floor((tolerance - (tat - now)) / interval)
  if remaining < 0 then remaining = 0 end
  return {0, remaining, allow_at - now, tat - now}
end
local used = new_tat - now
local remaining = math.floor((tolerance - used) / interval)
if remaining < 0 then remaining = 0 end
local ttl = math.floor(used / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl)
return {1, remaining, 0, used}
"#;

/// The Redis key of a bucket key.
pub fn redis_key(key: &str) -> String {
    // `{` and `}` inside would end the hash tag early: the keys are hex or composed parts, but
    // keep the tag whole whatever they hold.
    let safe: String = key
        .chars()
        .map(|c| if c == '{' || c == '}' { '_' } else { c })
        .collect();
    format!("caregate:rl:{{{safe}}}")
}

/// A Redis store.
pub struct RedisBackend {
    client: redis::Client,
    script: redis::Script,
    connection: Mutex<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The TLS files of a Redis store (PEM contents).
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// The CA of the server's certificate; `None`: the system's roots.
    pub root_ca: Option<Vec<u8>>,
    /// A client certificate and its key, for Redis's `tls-auth-clients`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisBackend {
    /// A backend for `url` (checked now; nothing is connected until the first check). `timeout`
    /// bounds connecting and each answer.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Self::with_tls(url, timeout, None)
    }

    /// As [`RedisBackend::new`], for a `rediss://` URL with its own trust: the CA that signed
    /// the server's certificate (instead of the system's roots) and a client certificate and
    /// key for mutual TLS, all PEM.
    pub fn with_tls(url: &str, timeout: Duration, tls: Option<TlsFiles>) -> Result<Self, String> {
        // The error may quote the URL: name only its kind.
        let bad_url = |e: redis::RedisError| {
            format!("not a valid redis:// or rediss:// URL ({:?})", e.kind())
        };
        let client = match tls {
            None => redis::Client::open(url).map_err(bad_url)?,
            Some(files) => {
                if !url.starts_with("rediss://") {
                    return Err("TLS settings need a rediss:// URL".to_string());
                }
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: files.client.map(|(client_cert, client_key)| {
                            redis::ClientTlsConfig {
                                client_cert,
                                client_key,
                            }
                        }),
                        root_cert: files.root_ca,
                    },
                )
                .map_err(|e| match e.kind() {
                    redis::ErrorKind::InvalidClientConfig => bad_url(e),
                    kind => format!("the TLS files were refused ({kind:?})"),
                })?
            }
        };
        Ok(RedisBackend {
            client,
            script: redis::Script::new(GCRA_LUA),
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            timeout,
        })
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        match self.connection.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn store(&self, c: Option<MultiplexedConnection>) {
        match self.connection.lock() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    /// Whether a connection is open (it may still turn out dead).
    pub fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    /// Open the connection if there is none, allowing `connect_timeout` for it (TCP, TLS and
    /// AUTH). Run from the background, so a request never waits on a slow handshake; a request
    /// that finds no connection tries once within the request timeout.
    pub async fn connect(&self, connect_timeout: Duration) -> Result<(), BackendError> {
        self.connection_within(connect_timeout).await.map(|_| ())
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BackendError> {
        self.connection_within(self.timeout).await
    }

    async fn connection_within(
        &self,
        connect_timeout: Duration,
    ) -> Result<MultiplexedConnection, BackendError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(self.timeout));
        let c = tokio::time::timeout(
            connect_timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| BackendError::Timeout)?
        .map_err(|e| failed(&e))?;
        self.store(Some(c.clone()));
        Ok(c)
    }
}

fn failed(e: &redis::RedisError) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout
    } else {
        // Redis errors name the command and the server's message, never our keys' values.
        BackendError::Failed(format!("redis: {:?}", e.kind()))
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn check(&self, key: &str, quota: &Quota, cost: u64) -> Result<Outcome, BackendError> {
        let mut conn = self.connection().await?;
        let interval = (quota.interval_ns() / 1000).max(1);
        let tolerance = interval.saturating_mul(quota.burst());
        let answer: Vec<i64> = self
            .script
            .key(redis_key(key))
            .arg(interval)
            .arg(tolerance)
            .arg(quota.charge(cost))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| failed(&e))?;
        let [allowed, remaining, retry_us, reset_us] = answer[..] else {
            return Err(BackendError::Failed(
                "redis: unexpected script answer".to_string(),
            ));
        };
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(Outcome {
            allowed: allowed == 1,
            remaining: u64::try_from(remaining).unwrap_or(0),
            retry_after: us(retry_us),
            reset_after: us(reset_us),
        })
    }

    fn reset(&self) {
        self.store(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_one_whole_hash_tag() {
        assert_eq!(
            redis_key("per-client:ab12"),
            "caregate:rl:{per-client:ab12}"
        );
        assert_eq!(redis_key("a}b{c"), "caregate:rl:{a_b_c}");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        let e = RedisBackend::new("http://user:hunter2@host", Duration::from_millis(20))
            .err()
            .unwrap_or_default();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(RedisBackend::new("redis://127.0.0.1:6379/0", Duration::from_millis(20)).is_ok());
        assert!(
            RedisBackend::new("rediss://u:p@127.0.0.1:6380/1", Duration::from_millis(20)).is_ok()
        );
    }
}
