//! The admin endpoint: plain HTTP for the node's kubelet and the cluster's Prometheus, off by
//! default (`[admin]` in the configuration).
//!
//! - `GET /healthz`: 200 while the process serves requests (liveness).
//! - `GET /readyz`: 200 while the gateway accepts SSH connections, 503 once it is shutting down,
//!   so a load balancer stops sending agents here before their sessions are closed.
//! - `GET /metrics`: Prometheus text format (see `metrics`).
//! - `/api/v1/...`: the JSON API of identities, sessions, forwards, pairs and the audit trail,
//!   and the operator's actions (see `api`): behind a bearer token, or loopback only.
//! - `/ui/`: the dashboard, a page of this binary's own that reads the API (with the token the
//!   operator types in, kept in the tab's session storage).
//!
//! Bind it to a cluster-internal address and let the NetworkPolicy keep it off the public side
//! (deploy/ does both).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::gateway::Gateway;
use crate::quota::{Limit, Quota};

/// A client must send its request head within this time (probes and scrapers send theirs at
/// once; an idle connection must not hold a slot for long).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// And be done with its connection within this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The response to `method path`.
pub fn respond(gw: &Gateway, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        r
    };
    let text = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            format!("{method} is not supported here; use GET\n"),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/healthz" => reply(StatusCode::OK, text, "ok\n".into()),
        "/readyz" if gw.shutdown.is_cancelled() => {
            reply(StatusCode::SERVICE_UNAVAILABLE, text, "shutting down\n".into())
        }
        "/readyz" => reply(StatusCode::OK, text, "ready\n".into()),
        "/metrics" => reply(StatusCode::OK, PROMETHEUS_TEXT, crate::metrics::render(gw)),
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            format!(
                "no {} here; try /healthz, /readyz, /metrics or /api/v1/\n",
                cmx_net::text::bounded(path, 256)
            ),
        ),
    }
}

/// The body of an admin response: a whole answer, or the audit event stream.
pub type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

/// The dashboard's files, embedded: it works offline and needs nothing but this binary.
const UI_FILES: &[(&str, &str, &str)] = &[
    ("/ui/", "text/html; charset=utf-8", include_str!("ui/index.html")),
    (
        "/ui/app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "/ui/style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
];

/// The response to one request: the JSON API under `/api/`, the dashboard under `/ui/`, the
/// plain endpoints elsewhere.
pub async fn route<B>(
    gw: &Gateway,
    req: &http::Request<B>,
    peer: std::net::SocketAddr,
) -> Response<AdminBody> {
    let path = req.uri().path();
    if path == "/ui" || path == "/" {
        let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *r.status_mut() = StatusCode::SEE_OTHER;
        r.headers_mut()
            .insert(header::LOCATION, header::HeaderValue::from_static("/ui/"));
        return r;
    }
    if let Some((_, content_type, text)) = UI_FILES.iter().find(|(p, _, _)| *p == path) {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed_unsync());
        // Only this page's own files run; no framing by another site.
        set_headers(
            &mut r,
            &[
                (header::CONTENT_TYPE, content_type),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; frame-ancestors 'none'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
        );
        return r;
    }
    if !path.starts_with("/api/") {
        return respond(gw, req.method(), path).map(|b| b.boxed_unsync());
    }
    let header_text = |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let api = crate::api::ApiRequest {
        method: req.method(),
        path,
        query: req.uri().query(),
        authorization: header_text(header::AUTHORIZATION),
        last_event_id: header_text(header::HeaderName::from_static("last-event-id")),
        host: header_text(header::HOST),
        origin: header_text(header::ORIGIN),
        peer,
    };
    if path == "/api/v1/events" && req.method() == Method::GET {
        match crate::api::event_stream(gw, &api) {
            Ok(stream) => {
                let frames =
                    futures::StreamExt::map(stream, |b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
                let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
                set_headers(
                    &mut r,
                    &[
                        (header::CONTENT_TYPE, "text/event-stream"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                );
                return r;
            }
            Err(refused) => return json_response(refused),
        }
    }
    json_response(crate::api::respond(gw, &api).await)
}

fn set_headers(r: &mut Response<AdminBody>, headers: &[(header::HeaderName, &'static str)]) {
    for (name, value) in headers {
        r.headers_mut()
            .insert(name.clone(), header::HeaderValue::from_static(value));
    }
}

fn json_response(answer: crate::api::ApiResponse) -> Response<AdminBody> {
    let mut body = serde_json::to_string_pretty(&answer.body).unwrap_or_default();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = answer.status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if answer.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"cmx-gateway\""),
        );
    }
    r
}

/// Serves the admin endpoint on `listener` until the task is aborted. Connections are counted
/// per peer address and in total (`admin.max_connections_per_peer`, `admin.max_connections`):
/// one pod holding idle connections cannot take the slots the kubelet's probes need.
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener) {
    let settings = &gw.config.admin;
    let slots = Quota::new(
        "admin connections",
        Limit {
            max: settings.max_connections_per_peer,
            setting: "admin.max_connections_per_peer",
        },
        Some(Limit {
            max: settings.max_connections,
            setting: "admin.max_connections",
        }),
    )
    .per("peer");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the admin endpoint");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.take(&peer.ip().to_string()) {
            Ok(slot) => slot,
            Err(reason) => {
                tracing::debug!(%peer, reason, "admin connection refused");
                continue;
            }
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(&gw, &req, peer).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin connection failed"),
                Err(_) => tracing::debug!(%peer, "admin connection timed out"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::Config;
    use crate::dataplane::UserspaceDataPlane;
    use crate::events::{EventBus, GatewayEvent};
    use crate::identity::Registry;

    fn gateway() -> Arc<Gateway> {
        let config = Config::default();
        let registry = Registry::parse(
            "",
            Path::new("identities.toml"),
            crate::reload::registry_context(&config),
        )
        .unwrap();
        Gateway::new(
            config,
            registry,
            Arc::new(UserspaceDataPlane::new("test")),
            EventBus::default(),
            CancellationToken::new(),
        )
    }

    async fn get(gw: &Gateway, method: Method, path: &str) -> (StatusCode, String, String) {
        let r = respond(gw, &method, path);
        let content_type = r
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let status = r.status();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_and_readiness_follow_shutdown() {
        let gw = gateway();
        assert_eq!(get(&gw, Method::GET, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&gw, Method::GET, "/readyz").await.0, StatusCode::OK);
        gw.shutdown.cancel();
        let (status, _, body) = get(&gw, Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "shutting down\n");
        assert_eq!(
            get(&gw, Method::GET, "/healthz").await.0,
            StatusCode::OK,
            "a draining gateway is still alive: the kubelet must not restart it"
        );
        assert!(
            get(&gw, Method::GET, "/metrics")
                .await
                .2
                .contains("\ncmxsafe_ready 0\n")
        );
    }

    #[tokio::test]
    async fn metrics_count_pairs_and_bytes_from_events() {
        let gw = gateway();
        let (status, content_type, body) = get(&gw, Method::GET, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, PROMETHEUS_TEXT);
        for line in [
            "cmxsafe_dataplane_info{mode=\"userspace\"} 1",
            "cmxsafe_ready 1",
            "cmxsafe_identities 0",
            "cmxsafe_sessions 0",
            "cmxsafe_pairs 0",
            "cmxsafe_audit_decisions_total{event=\"forward\",decision=\"deny\"}",
        ] {
            assert!(body.contains(line), "{line:?} missing from:\n{body}");
        }
        for conn_id in [1, 2] {
            gw.events.emit(GatewayEvent::PairOpened {
                conn_id,
                device: "dev1".into(),
                target: "srv1:1883".into(),
            });
        }
        gw.events.emit(GatewayEvent::PairClosed {
            conn_id: 1,
            device: "dev1".into(),
            bytes_to_target: 100,
            bytes_from_target: 7,
        });
        let body = get(&gw, Method::GET, "/metrics").await.2;
        for line in [
            "\ncmxsafe_pairs 1\n",
            "\ncmxsafe_pairs_opened_total 2\n",
            "\ncmxsafe_pair_bytes_total{direction=\"to_target\"} 100\n",
            "\ncmxsafe_pair_bytes_total{direction=\"from_target\"} 7\n",
        ] {
            assert!(body.contains(line), "{line:?} missing from:\n{body}");
        }
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_are_refused_with_a_hint() {
        let gw = gateway();
        let (status, _, body) = get(&gw, Method::GET, "/debug").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/healthz, /readyz, /metrics or /api/v1/"), "{body}");
        let r = respond(&gw, &Method::POST, "/metrics");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }
}
