//! The Kubernetes controller against kube-rs's mocked API (tower-test): every request it makes is
//! asserted exactly (method, path, query with field manager, content type, body), and so are the
//! 404 / 409 / 500 branches. The same controller against a real API server: controller_envtest.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmx_gateway::controller::{self, Controller, Feed, Settings};
use cmx_gateway::events::{EventBus, GatewayEvent, SessionId};
use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_test::mock::{Handle, SendResponse};

const NS: &str = "cmxsafe";
const SVC_PATH: &str = "/api/v1/namespaces/cmxsafe/services";
const SLICE_PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/cmxsafe/endpointslices";
const POD_UID: &str = "0b1c2d3e-0000-4000-8000-00000000000a";
const OTHER_POD_UID: &str = "0b1c2d3e-0000-4000-8000-00000000000b";

fn settings() -> Settings {
    Settings {
        namespace: NS.into(),
        pod_name: "cmxsafe-gw-a".into(),
        pod_uid: POD_UID.into(),
        pod_ip: "10.244.1.7".parse().unwrap(),
        service_prefix: "dynamic-service-".into(),
        domain: Some("iot.example.com".into()),
        service_type: "LoadBalancer".into(),
        service_port: 22,
        target_port: 2222,
    }
}

/// The API server side of the mock: each `expect` takes the next request and checks it.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

struct Call {
    body: Value,
    send: SendResponse<Response<Body>>,
}

impl Call {
    fn reply(self, status: u16, body: Value) {
        let response = Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.send.send_response(response);
    }
}

fn query_of(uri: &http::Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

impl ApiServer {
    /// Takes the next request and asserts its method, path and exact query parameters.
    async fn expect(&mut self, method: &str, path: &str, query: &[(&str, &str)]) -> Call {
        let (request, send) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .unwrap_or_else(|| panic!("client gone; expected {method} {path}"));
        assert_eq!(
            (request.method().as_str(), request.uri().path()),
            (method, path),
            "request {} {}",
            request.method(),
            request.uri()
        );
        let expected: BTreeMap<String, String> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(query_of(request.uri()), expected, "query of {}", request.uri());
        let content_type = request
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        if method == "PATCH" {
            assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
        }
        Call { body, send }
    }

    /// Takes the next request (no query expected) and answers it without looking at its body.
    async fn respond(&mut self, method: &str, path: &str, status: u16, body: Value) {
        self.expect(method, path, &[]).await.reply(status, body);
    }

    /// A server-side apply by the `cmxsafe` field manager, forced.
    async fn expect_apply(&mut self, path: &str) -> Call {
        self.expect("PATCH", path, &[("fieldManager", "cmxsafe"), ("force", "true")])
            .await
    }

    async fn expect_list_services(&mut self) -> Call {
        self.expect(
            "GET",
            SVC_PATH,
            &[("labelSelector", "app.kubernetes.io/managed-by=cmxsafe")],
        )
        .await
    }

    /// Asserts the client makes no more requests (it must have been dropped first).
    async fn expect_nothing_more(mut self) {
        let next = tokio::time::timeout(Duration::from_secs(5), self.0.next_request()).await;
        match next {
            Ok(None) => {}
            Ok(Some((r, _))) => panic!("unexpected request {} {}", r.method(), r.uri()),
            Err(_) => panic!("client still alive: drop it before expect_nothing_more"),
        }
    }
}

fn mock() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, NS), ApiServer(handle))
}

fn controller(client: Client) -> Controller {
    Controller::new(client, settings(), "v1")
}

/// Runs `act` on a controller with `settings` while `serve` plays the API server, then checks
/// that the controller made no request `serve` did not expect.
async fn scenario<S, SF, A, AF>(settings: Settings, serve: S, act: A)
where
    S: FnOnce(ApiServer) -> SF,
    SF: std::future::Future<Output = ApiServer> + Send + 'static,
    A: FnOnce(Controller) -> AF,
    AF: std::future::Future<Output = ()>,
{
    let (client, api) = mock();
    let server = tokio::spawn(serve(api));
    act(Controller::new(client, settings, "v1")).await;
    server.await.unwrap().expect_nothing_more().await;
}

/// A Service as the API server returns it.
fn stored_service(server: &str, owner_uid: &str, rv: &str) -> Value {
    let mut s = settings().service(server);
    s["metadata"]["ownerReferences"][0]["uid"] = json!(owner_uid);
    s["metadata"]["uid"] = json!(format!("svc-uid-{server}"));
    s["metadata"]["resourceVersion"] = json!(rv);
    s
}

fn status(code: u16, reason: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("mock {reason}"), "reason": reason, "code": code })
}

fn service_list(items: Vec<Value>) -> Value {
    json!({ "kind": "ServiceList", "apiVersion": "v1", "metadata": { "resourceVersion": "100" }, "items": items })
}

/// Answers the two applies of a claim of `server` and checks their bodies exactly.
async fn serve_claim(api: &mut ApiServer, server: &str, service_rv: Option<&str>) {
    let name = format!("dynamic-service-{server}");
    let call = api.expect_apply(&format!("{SVC_PATH}/{name}")).await;
    let mut expected = settings().service(server);
    if let Some(rv) = service_rv {
        expected["metadata"]["resourceVersion"] = json!(rv);
    }
    assert_eq!(call.body, expected);
    call.reply(200, stored_service(server, POD_UID, "7"));
    let call = api.expect_apply(&format!("{SLICE_PATH}/{name}")).await;
    assert_eq!(
        call.body,
        settings().endpoint_slice(server, "discovery.k8s.io/v1", &format!("svc-uid-{server}"))
    );
    let mut stored = call.body.clone();
    stored["metadata"]["uid"] = json!("slice-uid");
    call.reply(200, stored);
}

#[tokio::test]
async fn claim_applies_the_service_then_its_endpoint_slice() {
    scenario(
        settings(),
        |mut api| async move {
            serve_claim(&mut api, "srv1", None).await;
            api
        },
        |c| async move {
            c.claim("srv1").await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn a_claim_replaces_another_pods_ownership_in_one_forced_apply() {
    // Takeover: the Service is owned by another pod. The claim does not read it first: the
    // forced apply by the shared field manager replaces the owner and the endpoint.
    let mut b = settings();
    b.pod_name = "cmxsafe-gw-b".into();
    b.pod_uid = OTHER_POD_UID.into();
    b.pod_ip = "10.244.2.9".parse().unwrap();
    let expected = b.clone();
    scenario(
        b,
        |mut api| async move {
            let call = api
                .expect_apply(&format!("{SVC_PATH}/dynamic-service-srv1"))
                .await;
            assert_eq!(call.body, expected.service("srv1"));
            assert_eq!(call.body["metadata"]["ownerReferences"][0]["uid"], OTHER_POD_UID);
            call.reply(200, stored_service("srv1", OTHER_POD_UID, "8"));
            let call = api
                .expect_apply(&format!("{SLICE_PATH}/dynamic-service-srv1"))
                .await;
            assert_eq!(call.body["endpoints"][0]["addresses"], json!(["10.244.2.9"]));
            assert_eq!(call.body["endpoints"][0]["targetRef"]["uid"], OTHER_POD_UID);
            assert_eq!(
                call.body,
                expected.endpoint_slice("srv1", "discovery.k8s.io/v1", "svc-uid-srv1")
            );
            call.reply(200, json!({}));
            api
        },
        |c| async move { c.claim("srv1").await.unwrap() },
    )
    .await;
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_and_the_claim_completes() {
    scenario(
        settings(),
        |mut api| async move {
            let call = api
                .expect_apply(&format!("{SVC_PATH}/dynamic-service-srv1"))
                .await;
            call.reply(500, status(500, "InternalError"));
            serve_claim(&mut api, "srv1", None).await;
            api
        },
        |c| async move {
            controller::retry("claim", 3, || c.claim("srv1")).await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn retries_give_up_with_the_api_error_after_the_last_attempt() {
    scenario(
        settings(),
        |mut api| async move {
            for _ in 0..2 {
                let call = api
                    .expect_apply(&format!("{SVC_PATH}/dynamic-service-srv1"))
                    .await;
                call.reply(503, status(503, "ServiceUnavailable"));
            }
            api
        },
        |c| async move {
            let e = controller::retry("claim", 2, || c.claim("srv1"))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), "server");
            assert!(
                e.to_string().contains("apply Service dynamic-service-srv1"),
                "{e}"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn release_deletes_our_service_guarded_by_its_resource_version() {
    scenario(
        settings(),
        |mut api| async move {
            let name = format!("{SVC_PATH}/dynamic-service-srv1");
            api.respond("GET", &name, 200, stored_service("srv1", POD_UID, "42"))
                .await;
            let call = api.expect("DELETE", &name, &[]).await;
            assert_eq!(
                call.body,
                json!({ "propagationPolicy": "Background", "preconditions": { "resourceVersion": "42" } })
            );
            call.reply(200, stored_service("srv1", POD_UID, "42"));
            api
        },
        |c| async move {
            c.release("srv1").await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn release_leaves_a_service_another_pod_took_over_or_nobody_has() {
    scenario(
        settings(),
        |mut api| async move {
            let name = format!("{SVC_PATH}/dynamic-service-srv1");
            api.respond("GET", &name, 200, stored_service("srv1", OTHER_POD_UID, "5"))
                .await;
            api.respond("GET", &name, 404, status(404, "NotFound")).await;
            api
        },
        |c| async move {
            c.release("srv1").await.unwrap();
            c.release("srv1").await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn a_takeover_between_read_and_delete_is_a_409_and_the_retry_yields() {
    scenario(
        settings(),
        |mut api| async move {
            let name = format!("{SVC_PATH}/dynamic-service-srv1");
            api.respond("GET", &name, 200, stored_service("srv1", POD_UID, "42"))
                .await;
            api.respond("DELETE", &name, 409, status(409, "Conflict")).await;
            // The retry reads again and sees the new owner: no second delete.
            api.respond("GET", &name, 200, stored_service("srv1", OTHER_POD_UID, "43"))
                .await;
            api
        },
        |c| async move {
            controller::retry("release", 3, || c.release("srv1"))
                .await
                .unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn deleting_a_service_that_is_already_gone_is_not_an_error() {
    scenario(
        settings(),
        |mut api| async move {
            let call = api
                .expect("DELETE", &format!("{SVC_PATH}/dynamic-service-srv9"), &[])
                .await;
            call.reply(404, status(404, "NotFound"));
            api
        },
        |c| async move {
            c.delete("srv9", Some("3")).await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn resync_creates_repairs_yields_and_cleans_orphans() {
    scenario(
        settings(),
        |mut api| async move {
            api.expect_list_services().await.reply(
                200,
                service_list(vec![
                    stored_service("ours", POD_UID, "10"),
                    stored_service("theirs", OTHER_POD_UID, "11"),
                    stored_service("orphan", POD_UID, "12"),
                    stored_service("foreign-orphan", OTHER_POD_UID, "13"),
                ]),
            );
            // Held and missing: created, no version guard.
            serve_claim(&mut api, "missing", None).await;
            // Held and ours: re-applied only if still at version 10. A takeover in between makes
            // it a 409, which is logged and does not stop the rest of the resync.
            let call = api
                .expect_apply(&format!("{SVC_PATH}/dynamic-service-ours"))
                .await;
            let mut expected = settings().service("ours");
            expected["metadata"]["resourceVersion"] = json!("10");
            assert_eq!(call.body, expected);
            call.reply(409, status(409, "Conflict"));
            // "theirs" is held here too but another pod has it: no request at all.
            // Our orphan: deleted, guarded by its version.
            let call = api
                .expect("DELETE", &format!("{SVC_PATH}/dynamic-service-orphan"), &[])
                .await;
            assert_eq!(call.body["preconditions"], json!({ "resourceVersion": "12" }));
            call.reply(200, stored_service("orphan", POD_UID, "12"));
            api
        },
        |c| async move {
            let held: BTreeSet<String> = ["missing", "ours", "theirs"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            controller::run::resync_once(&c, &held).await;
        },
    )
    .await;
}

#[tokio::test]
async fn resync_survives_a_failed_list() {
    scenario(
        settings(),
        |mut api| async move {
            api.expect_list_services()
                .await
                .reply(500, status(500, "InternalError"));
            api
        },
        |c| async move {
            controller::run::resync_once(&c, &BTreeSet::from(["srv1".to_string()])).await;
        },
    )
    .await;
}

fn forward(identity: &str, added: bool) -> GatewayEvent {
    let (session, addr, port) = (SessionId(1), "fd63:6d78::1".parse().unwrap(), 1883);
    let identity = identity.to_string();
    if added {
        GatewayEvent::ForwardAdded {
            session,
            identity,
            addr,
            port,
        }
    } else {
        GatewayEvent::ForwardRemoved {
            session,
            identity,
            addr,
            port,
        }
    }
}

#[tokio::test]
async fn the_loop_follows_forward_events_and_hands_services_back_on_shutdown() {
    let (client, mut api) = mock();
    let bus = EventBus::default();
    let held = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let shutdown = CancellationToken::new();
    let feed = Feed {
        events: bus.subscribe(),
        held: Box::new({
            let held = held.clone();
            move || held.lock().unwrap().clone()
        }),
        shutdown: shutdown.clone(),
    };
    let task = tokio::spawn(controller::run(
        controller(client),
        feed,
        Duration::from_secs(3600),
    ));
    // Initial sync: nothing held, nothing there.
    api.expect_list_services().await.reply(200, service_list(vec![]));

    // srv1 publishes a forward here: claimed.
    held.lock().unwrap().insert("srv1".into());
    bus.emit(forward("srv1", true));
    serve_claim(&mut api, "srv1", None).await;
    // A second forward of srv1 ends while another remains: no request. Then a takeover event
    // claims again (the server's newest session is here).
    bus.emit(forward("srv1", false));
    bus.emit(GatewayEvent::ForwardTakenOver {
        identity: "srv1".into(),
        addr: "fd63:6d78::1".parse().unwrap(),
        port: 1883,
        from: SessionId(1),
        to: SessionId(2),
    });
    serve_claim(&mut api, "srv1", None).await;
    // Its last forward ends: read, then delete while still ours.
    held.lock().unwrap().clear();
    bus.emit(forward("srv1", false));
    let name = format!("{SVC_PATH}/dynamic-service-srv1");
    api.respond("GET", &name, 200, stored_service("srv1", POD_UID, "20"))
        .await;
    api.respond("DELETE", &name, 200, stored_service("srv1", POD_UID, "20"))
        .await;

    // Shutdown: this pod's remaining Services are handed back.
    held.lock().unwrap().insert("srv2".into());
    shutdown.cancel();
    api.expect_list_services().await.reply(
        200,
        service_list(vec![
            stored_service("srv2", POD_UID, "30"),
            stored_service("srv3", OTHER_POD_UID, "31"),
        ]),
    );
    let call = api
        .expect("DELETE", &format!("{SVC_PATH}/dynamic-service-srv2"), &[])
        .await;
    assert_eq!(call.body["preconditions"], json!({ "resourceVersion": "30" }));
    call.reply(200, stored_service("srv2", POD_UID, "30"));
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    api.expect_nothing_more().await;
}
