//! The dashboard in a real browser (headless chromium through chromedriver) against a gateway
//! carrying stock OpenSSH agents' traffic: it lists the identities, the sessions and the pair
//! with its bytes, shows a hostile user name as text, and its Disconnect button ends a session.
//! The test stores a screenshot under the target directory (target/screenshots/dashboard.png).

use std::path::PathBuf;
use std::time::Duration;

use cmx_testbed::*;

const T: Duration = Duration::from_secs(30);

/// target/screenshots, beside the test binary's profile directory.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/screenshots
    let target = exe.ancestors().nth(3).expect("a target directory").to_path_buf();
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_who_is_connected_and_disconnects_a_session() {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    // The hostile login below puts the device host's address in the penalty box, for long
    // enough that the page shows it.
    let gw = GatewayProc::start(
        &hosts,
        &registry,
        &format!("[limits]\npenalty_authfail_secs = 600\npenalty_max_secs = 600\n{ADMIN_ON_LOOPBACK}"),
    )
    .await;
    let admin = gw.admin().await;
    let (_echo, _server) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let _device = SshAgent::local_forwards(&hosts, "dev1", &dev1, &["127.0.0.1:11883:srv1:1883"]);
    let mut held = hosts.dev.connect_retry("127.0.0.1:11883").await;
    assert_eq!(round_trip(&mut held, &[1u8; 4096]).await, [1u8; 4096]);
    // A stranger's user name that is markup: the page must show it, not run it.
    let hostile = "<img src=x onerror=\"document.title='pwned'\">";
    let mut s = raw_session(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"))
        .await
        .unwrap();
    let _ = try_login(&mut s, hostile, &dev1).await;
    gw.log
        .wait_audit("the hostile login", |r| {
            r.is(AuditEvent::Auth, Verdict::Deny) && r.identity() == hostile
        })
        .await;

    let browser = Browser::start(&hosts.gw).await;
    browser.goto(&format!("http://{admin}/ui/")).await;
    browser.wait_for("#sessions tr[data-identity='dev1']", T).await;
    browser.wait_for("#sessions tr[data-identity='srv1']", T).await;
    let pair_text = browser.wait_text("#pairs tr[data-device='dev1']", T).await;
    assert!(pair_text.contains("srv1"), "{pair_text}");
    assert!(pair_text.contains("4096"), "the pair's bytes: {pair_text}");
    let spliced = if test_dataplane() == "sockmap" {
        "yes"
    } else {
        "no"
    };
    assert!(pair_text.contains(spliced), "spliced {spliced}: {pair_text}");
    // The front door: the hostile login's source is in the penalty box.
    browser.wait_for("#front-door[data-penalized='1']", T).await;
    let door = browser.wait_text("#front-door", T).await;
    assert!(door.contains("1 source penalized"), "{door}");
    // ...and the addresses the agents logged in from are known (device and server hosts).
    assert!(door.contains("2 sources known from a login"), "{door}");
    let identities = browser.wait_text("#identities", T).await;
    assert!(
        identities.contains("[srv1:1883]"),
        "dev1's security context: {identities}"
    );
    // The audit stream brought the hostile line, as text.
    let denied = browser.wait_text("#audit tr.deny", T).await;
    assert!(
        denied.contains("<img src=x"),
        "the user name is shown as text: {denied}"
    );
    assert_eq!(
        browser.execute("return document.title;").await,
        "cmx-gateway",
        "no markup ran"
    );
    assert!(
        browser.find("#audit img").await.is_none(),
        "no element was made from a peer's string"
    );

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(screenshot_dir().join("dashboard.png"), &png).unwrap();

    // The operator disconnects dev1 from the page.
    disconnect_dev1_from_the_page(&browser, &gw).await;
    gw.log
        .wait_audit("the page's action is audited", |r| {
            r.is(AuditEvent::Admin, Verdict::Allow) && r.identity() == "dev1"
        })
        .await;
    browser.wait_gone("#sessions tr[data-identity='dev1']", T).await;
    browser.wait_for("#sessions tr[data-identity='srv1']", T).await;
}

/// dev1's session as the admin API lists it (the JSON object), once it is there.
async fn dev1_session(ns: &Netns, admin: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, body) = http_get(ns, admin, "/api/v1/sessions").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let found = v["sessions"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["identity"] == "dev1").cloned());
        if let Some(s) = found {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "dev1 never listed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator reaches the admin endpoint from loopback (`kubectl port-forward`, the shipped
/// config: no token, loopback peers only), and the same browser shows another site's page. That
/// page posts to the API: a cross-site POST needs no CORS preflight, and the browser connects
/// from loopback, so the gateway used to carry it out: here a real chromium on a page served
/// from another port ends dev1's session. Now a request whose `Origin` is not the endpoint
/// itself is refused (403, audited with the page's origin), the dashboard's own requests are
/// not, and without a token a `Host` that names another site (a page whose name was rebound to
/// 127.0.0.1, which could also read the answers) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_sites_page_in_the_operators_browser_cannot_use_the_admin_api() {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, ADMIN_ON_LOOPBACK).await;
    let admin = gw.admin().await;
    let (_echo, _server) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let _device = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &[]);
    let id = dev1_session(&hosts.gw, &admin).await["id"]
        .as_str()
        .expect("a session id")
        .to_string();

    let page = format!(
        "<html><head><title>cat pictures</title></head><body><script>\
         fetch('http://{admin}/api/v1/sessions/{id}/disconnect', {{method: 'POST', mode: 'no-cors'}})\
         .finally(() => fetch('http://{admin}/api/v1/registry/reload', {{method: 'POST', mode: 'no-cors'}}))\
         .finally(() => {{ document.title = 'sent'; }});\
         </script></body></html>"
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
        page.len()
    );
    let _site = banner(
        hosts.gw.listen("127.0.0.1:18888"),
        Box::leak(response.into_bytes().into_boxed_slice()),
    );
    let browser = Browser::start(&hosts.gw).await;
    browser.goto("http://127.0.0.1:18888/").await;
    let deadline = std::time::Instant::now() + T;
    while browser.execute("return document.title;").await != "sent" {
        assert!(
            std::time::Instant::now() < deadline,
            "the page never sent its requests"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for request in [
        format!("POST /api/v1/sessions/{id}/disconnect"),
        "POST /api/v1/registry/reload".to_string(),
    ] {
        gw.log
            .wait_audit(&request, |r| {
                r.is(AuditEvent::Admin, Verdict::Deny)
                    && r.request() == request
                    && r.reason()
                        .contains("another site's page (Origin http://127.0.0.1:18888)")
            })
            .await;
    }
    assert_eq!(
        dev1_session(&hosts.gw, &admin).await["id"].as_str(),
        Some(id.as_str()),
        "dev1's session is still there"
    );
    assert_eq!(
        gw.log.count_audits(|r| r.is(AuditEvent::Admin, Verdict::Allow)),
        0,
        "no admin action was carried out"
    );

    // A page whose own name was rebound to 127.0.0.1: its requests name it in Host.
    let mut rebound = hosts.gw.connect(&admin).unwrap();
    let request = "GET /api/v1/identities HTTP/1.1\r\nHost: cats.example:9180\r\nConnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut rebound, request.as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut rebound, &mut reply)
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("DNS rebinding"), "{reply}");
    assert!(!reply.contains("fd63:6d78"), "nothing of the registry: {reply}");

    // The dashboard's own requests carry its origin and go through.
    browser.goto(&format!("http://{admin}/ui/")).await;
    disconnect_dev1_from_the_page(&browser, &gw).await;
}

/// Clicks dev1's Disconnect button on the dashboard and waits for its session to end.
async fn disconnect_dev1_from_the_page(browser: &Browser<'_>, gw: &GatewayProc) {
    browser
        .click_css("#sessions tr[data-identity='dev1'] button[data-disconnect]", T)
        .await;
    gw.log
        .wait_event("dev1's session ends", session_closed("dev1"))
        .await;
}
