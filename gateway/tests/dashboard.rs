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
    browser
        .click_css("#sessions tr[data-identity='dev1'] button[data-disconnect]", T)
        .await;
    gw.log
        .wait_event("dev1's session ends", session_closed("dev1"))
        .await;
    gw.log
        .wait_audit("the page's action is audited", |r| {
            r.is(AuditEvent::Admin, Verdict::Allow) && r.identity() == "dev1"
        })
        .await;
    browser.wait_gone("#sessions tr[data-identity='dev1']", T).await;
    browser.wait_for("#sessions tr[data-identity='srv1']", T).await;
}
