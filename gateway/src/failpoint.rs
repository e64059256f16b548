//! Pauses at the points where a concurrent change can race a decision, so that tests can put a
//! registry reload exactly there and prove the race is handled. Compiled in only with the
//! `failpoints` feature (the gateway's own tests turn it on); otherwise every pause is a no-op.
//!
//! With `CMX_FAILPOINTS=DIR` in the environment, the gateway stops at failpoint NAME while the
//! file `DIR/NAME` exists: it logs "failpoint reached" (field `failpoint`) and resumes once the
//! file is removed. Files, not timers: the test decides when to resume, whatever the load.

/// Where a login passed its credential check and is about to register the session.
pub const LOGIN_CHECKED: &str = "login-checked";
/// Where a `tcpip-forward` was permitted and is about to publish its Mir-sock.
pub const FORWARD_PERMITTED: &str = "forward-permitted";

#[cfg(feature = "failpoints")]
pub async fn pause(name: &'static str) {
    let Some(dir) = std::env::var_os("CMX_FAILPOINTS") else {
        return;
    };
    let armed = std::path::Path::new(&dir).join(name);
    if !armed.exists() {
        return;
    }
    tracing::warn!(
        failpoint = name,
        "failpoint reached; waiting until its file is removed"
    );
    while armed.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tracing::warn!(failpoint = name, "failpoint released");
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn pause(_name: &'static str) {}
