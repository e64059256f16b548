//! A real browser for the dashboard tests: Debian's `chromium`, headless, driven by
//! `chromedriver` over the W3C WebDriver protocol (plain HTTP and JSON), both inside a test
//! namespace so that the page reaches what that namespace reaches (the admin endpoint on its
//! loopback).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hosts::Netns;

const DRIVER_PORT: u16 = 9515;
/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser<'a> {
    ns: &'a Netns,
    driver: Child,
    session: String,
    _profile: tempfile::TempDir,
}

/// Whether this machine has the browser and its driver (`cargo xtask deps` installs both).
pub fn browser_installed() -> bool {
    ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .iter()
        .all(|p| std::path::Path::new(p).exists())
}

impl<'a> Browser<'a> {
    /// Starts chromedriver in `ns` and a headless chromium session through it.
    pub async fn start(ns: &'a Netns) -> Browser<'a> {
        assert!(
            browser_installed(),
            "chromium and chromedriver are missing: apt-get install chromium chromium-driver (cargo xtask deps does)"
        );
        let profile = tempfile::tempdir().unwrap();
        let driver = ns
            .net_command("/usr/bin/chromedriver")
            .arg(format!("--port={DRIVER_PORT}"))
            .env("HOME", profile.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut browser = Browser {
            ns,
            driver,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = browser.try_call("GET", "/status", None).await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile_dir = browser._profile.path().join("chromium");
        let created = browser
            .call(
                "POST",
                "/session",
                Some(json!({ "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                 "--window-size=1400,1000", format!("--user-data-dir={}", profile_dir.display())],
                    },
                }}})),
            )
            .await;
        browser.session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_string();
        browser
    }

    async fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let addr = format!("127.0.0.1:{DRIVER_PORT}");
        let mut s = self
            .ns
            .connect(&addr)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        // chromedriver keeps the connection open whatever we ask: read by Content-Length.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk))
                .await
                .map_err(|_| "no answer within 60 s".to_string())?
                .map_err(|e| e.to_string())?;
            raw.extend_from_slice(&chunk[..n]);
            if let Some(body) = complete_body(&raw) {
                return serde_json::from_slice(body)
                    .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(body)));
            }
            if n == 0 {
                return Err(format!(
                    "connection closed mid-answer: {}",
                    String::from_utf8_lossy(&raw)
                ));
            }
        }
    }

    /// A WebDriver command; panics on a transport error, returns WebDriver errors as values.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        let r = self
            .call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await;
        assert!(r["value"].is_null(), "navigating to {url}: {r}");
    }

    /// The first element matching `css`, if any now.
    pub async fn find(&self, css: &str) -> Option<String> {
        let r = self
            .call(
                "POST",
                &self.at("/element"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        r["value"][ELEMENT].as_str().map(String::from)
    }

    /// Waits for an element matching `css`; panics with the page's text after `timeout`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> String {
        self.poll(css, timeout, || self.find(css)).await
    }

    /// Calls `f` until it returns something; panics with the page's text after `timeout`.
    async fn poll<T, Fut>(&self, css: &str, timeout: Duration, mut f: impl FnMut() -> Fut) -> T
    where
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = f().await {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no {css} on the page after {timeout:?}; the page says:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no element matches `css`.
    pub async fn wait_gone(&self, css: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.find(css).await.is_some() {
            if Instant::now() >= deadline {
                panic!(
                    "{css} is still on the page after {timeout:?}:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the first element matching `css`, once there is one. The page re-renders
    /// its tables as it refreshes, so an element found earlier may be gone: this reads the text
    /// in the page, in one step.
    pub async fn wait_text(&self, css: &str, timeout: Duration) -> String {
        let script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;";
        self.poll(css, timeout, || async {
            let r = self.execute_with(script, json!([css])).await;
            r.as_str().map(String::from)
        })
        .await
    }

    /// Clicks the first element matching `css`, finding it again if the page re-rendered it
    /// between finding and clicking.
    pub async fn click_css(&self, css: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let element = self.wait_for(css, timeout).await;
            let r = self
                .call(
                    "POST",
                    &self.at(&format!("/element/{element}/click")),
                    Some(json!({})),
                )
                .await;
            if r["value"].is_null() {
                return;
            }
            assert!(Instant::now() < deadline, "click {css}: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `script` (a function body) in the page; its return value.
    pub async fn execute(&self, script: &str) -> Value {
        self.execute_with(script, json!([])).await
    }

    /// Runs `script` with `args` (a JSON array, `arguments` in the script).
    pub async fn execute_with(&self, script: &str, args: Value) -> Value {
        let r = self
            .call(
                "POST",
                &self.at("/execute/sync"),
                Some(json!({ "script": script, "args": args })),
            )
            .await;
        r["value"].clone()
    }

    /// The page's visible text.
    pub async fn page_text(&self) -> String {
        self.execute("return document.body ? document.body.innerText : '';")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        let r = self.call("GET", &self.at("/screenshot"), None).await;
        let data = r["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no screenshot: {r}"));
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("the screenshot is base64")
    }
}

/// The body of a complete HTTP response in `raw` (by its Content-Length), if it is all there.
fn complete_body(raw: &[u8]) -> Option<&[u8]> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    raw.get(end + 4..end + 4 + length)
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        // Ending the session closes chromium; chromedriver goes with the process kill.
        if !self.session.is_empty() {
            let addr = format!("127.0.0.1:{DRIVER_PORT}");
            let path = format!("/session/{}", self.session);
            let _ = self.ns.enter(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(addr)?;
                write!(
                    s,
                    "DELETE {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                )?;
                // chromedriver answers once chromium is gone, and keeps the connection open.
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.read(&mut [0u8; 4096])
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium does not always go with its session: CI machines were found holding two
        // headless browsers (24 processes, 2 GiB) from earlier dashboard runs. Every process
        // started for this test names its profile directory on its command line.
        kill_processes_naming(&self._profile.path().to_string_lossy());
    }
}

/// SIGKILLs every process whose command line contains `needle`.
fn kill_processes_naming(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
