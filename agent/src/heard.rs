//! What the gateway says before its SSH version line. RFC 4253 4.2 lets a server send lines of
//! text first; cmx-gateway uses them to say why it refuses a connection at its front door
//! (`cmx-gateway: too many unauthenticated connections ...`, `... is penalized for 12 s more`)
//! and then closes it. russh skips those lines, so a refused agent could only report "handshake
//! failed: Disconnected". `Heard` keeps the first bytes the gateway sends, and `refusal` finds
//! the line that says why.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Bytes kept at most: RFC 4253 bounds a version line to 255 bytes; a few lines before it fit.
const KEPT: usize = 1024;

/// How much of a refusal line goes into the agent's error (the gateway's words, bounded).
const MAX_LINE: usize = cmx_net::text::LOG_STRING_MAX;

/// A read half that keeps a copy of the first `KEPT` bytes read from it, until the version
/// line (joined with its write half again by `tokio::io::join`).
pub struct Heard<S> {
    inner: S,
    heard: Arc<Mutex<Vec<u8>>>,
    listening: bool,
}

impl<S> Heard<S> {
    /// Wraps `inner`; the returned handle reads what was heard, after the stream has moved on.
    pub fn new(inner: S) -> (Heard<S>, Arc<Mutex<Vec<u8>>>) {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let stream = Heard {
            inner,
            heard: heard.clone(),
            listening: true,
        };
        (stream, heard)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.listening && matches!(polled, Poll::Ready(Ok(()))) {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            let new = &buf.filled()[before..];
            let room = KEPT.saturating_sub(heard.len());
            heard.extend_from_slice(&new[..new.len().min(room)]);
            // Once the version line has started (or enough was kept), nothing more is copied.
            let done =
                heard.len() >= KEPT || heard.starts_with(b"SSH-") || heard.windows(5).any(|w| w == b"\nSSH-");
            drop(heard);
            self.listening = !done;
        }
        polled
    }
}

/// The first non-empty line the gateway sent before its version line, if any: its reason for
/// refusing the connection. Bounded, control characters escaped.
pub fn refusal(heard: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(heard);
    text.split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .take_while(|l| !l.starts_with("SSH-"))
        .find(|l| !l.trim().is_empty())
        .map(|l| cmx_net::text::bounded(l, MAX_LINE).into_owned())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_line_before_the_version_is_the_refusal() {
        let said = b"cmx-gateway: source 10.1.0.2 is penalized for 12 s more\r\n";
        assert_eq!(
            refusal(said).as_deref(),
            Some("cmx-gateway: source 10.1.0.2 is penalized for 12 s more")
        );
        // A version line first: nothing was said before it.
        assert_eq!(refusal(b"SSH-2.0-cmx-gateway\r\n\x00\x00\x01\x0c"), None);
        assert_eq!(refusal(b""), None);
        // Blank lines are skipped; control characters and length are bounded.
        let long = format!("\r\nwhy\x1b[31m{}\r\n", "x".repeat(5000));
        let line = refusal(long.as_bytes()).unwrap();
        assert!(line.starts_with("why") && !line.contains('\x1b'), "{line:?}");
        // The cut, the escaped ESC and the note of the full length.
        assert!(line.len() < MAX_LINE + 32, "{} bytes", line.len());
        assert!(line.ends_with("bytes)"), "{line:?}");
    }

    #[tokio::test]
    async fn what_was_heard_is_kept_up_to_the_version_line_only() {
        let (mut gateway, agent) = tokio::io::duplex(64 * 1024);
        let (read, write) = tokio::io::split(agent);
        let (read, heard) = Heard::new(read);
        let mut stream = tokio::io::join(read, write);
        gateway
            .write_all(b"busy\r\nSSH-2.0-cmx-gateway\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 6];
        stream.read_exact(&mut first).await.unwrap();
        let mut rest = vec![0u8; 21];
        stream.read_exact(&mut rest).await.unwrap();
        // Everything after the version line passes through without being copied.
        gateway.write_all(&[7u8; 4096]).await.unwrap();
        let mut data = vec![0u8; 4096];
        stream.read_exact(&mut data).await.unwrap();
        assert_eq!(data, vec![7u8; 4096]);
        let kept = heard.lock().unwrap().clone();
        assert!(kept.len() <= 27, "{} bytes kept", kept.len());
        assert_eq!(refusal(&kept).as_deref(), Some("busy"));
        // Writes go to the gateway untouched.
        stream.write_all(b"SSH-2.0-agent\r\n").await.unwrap();
        let mut got = [0u8; 15];
        gateway.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"SSH-2.0-agent\r\n");
    }
}
