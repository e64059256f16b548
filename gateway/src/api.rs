//! The admin API (`/api/v1/` on the admin endpoint): what the gateway holds now, as JSON read
//! from the live tables, and the operator's actions. The shapes are documented in the README.
//!
//! Read:
//! - `GET /api/v1/identities`: the registry, with each identity's live session count.
//! - `GET /api/v1/sessions`: authenticated sessions: identity, peer, since, credential, open
//!   channels, bytes of finished forwarding channels.
//! - `GET /api/v1/forwards`: published forwards (Mir-socks): identity, address, port, session,
//!   since, takeovers.
//! - `GET /api/v1/pairs`: paths carried now: device, server, target, bytes each way so far,
//!   whether the kernel splices the loopback hop, since.
//! - `GET /api/v1/audit?after=&since=&identity=&decision=&event=&limit=`: the recent audit
//!   trail (see `audit_log`).
//! - `GET /api/v1/events?...` (same filters): the audit trail live, as Server-Sent Events
//!   (`event: audit`, `id` is the line's `seq`; a stream ends after `STREAM_SECS` and the client
//!   reconnects with `Last-Event-ID` or `after`, missing nothing the trail still holds), and the
//!   gateway's events as they happen (`event: change`: sessions, forwards and pairs opening and
//!   closing, reloads; not replayed, so a client reads the tables when it (re)connects).
//!
//! Act (each audited with the caller's address):
//! - `POST /api/v1/sessions/{id}/disconnect`: ends a session (its agent sees the reason).
//! - `POST /api/v1/registry/reload`: reads the registry file now, as SIGHUP does, and answers
//!   whether it was applied.
//!
//! Access: with `admin.api_token_file`, every `/api/` request needs `Authorization: Bearer
//! TOKEN` (compared in constant time); without one, only loopback peers are answered. A refused
//! request gets 401 or 403 and an audit line.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::audit;
use crate::audit_log::{self, Query};
use crate::events::{GatewayEvent, SessionId};
use crate::gateway::Gateway;
use crate::sessions::disconnect;

/// Audit lines one `/audit` answer carries at most (and by default).
const AUDIT_LIMIT: usize = 1000;
/// How long a reload action waits for the watcher's verdict.
const RELOAD_WAIT: Duration = Duration::from_secs(10);
/// How long one event stream lasts (under the admin endpoint's 30-s connection limit).
const STREAM_SECS: u64 = 25;
/// A token shorter than this is refused at start-up: it would be guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// One API request, as the admin endpoint parsed it.
pub struct ApiRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authorization: Option<&'a str>,
    /// `Last-Event-ID` of a reconnecting event stream.
    pub last_event_id: Option<&'a str>,
    /// `Host` and `Origin`: which name the client used for this endpoint, and which page (if a
    /// browser sent the request) asked for it.
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub peer: SocketAddr,
}

/// An API answer: status and JSON body.
pub struct ApiResponse {
    pub status: StatusCode,
    pub body: Value,
}

fn answer(status: StatusCode, body: Value) -> ApiResponse {
    ApiResponse { status, body }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiResponse {
    answer(status, json!({ "error": message.into() }))
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin.api_token_file {path}: cannot read it: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error(
        "admin.api_token_file {path}: the token is {len} characters; use at least {MIN_TOKEN_LEN} (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort { path: String, len: usize },
    #[error("admin.api_token_file {path}: the token must be one line of printable characters")]
    NotPrintable { path: String },
}

/// The token in `path`: its first line, trimmed, checked.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| TokenError::Read {
        path: shown.clone(),
        cause,
    })?;
    let token = text.trim();
    if token.contains(['\n', '\r']) || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable { path: shown });
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort {
            path: shown,
            len: token.len(),
        });
    }
    Ok(token.to_string())
}

/// Equal in time independent of where `a` and `b` differ (their lengths aside).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `origin` (`scheme://host[:port]`, or `null`) is the endpoint the request was sent
/// to (`host`, as the `Host` header names it).
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let without_scheme = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    without_scheme.is_some_and(|o| o.eq_ignore_ascii_case(host))
}

/// Whether a `Host` header names `localhost` (or a name under it) or an IP address: names a
/// DNS rebinding attack cannot have brought the browser to.
fn names_loopback_or_address(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Whether `req` may use the API; the refusal otherwise (already audited).
fn admitted(gw: &Gateway, req: &ApiRequest<'_>) -> Result<(), ApiResponse> {
    let file = &gw.config.admin.api_token_file;
    let refuse = |status: StatusCode, reason: &str| {
        audit::admin_denied(req.peer, &format!("{} {}", req.method, req.path), reason);
        Err(error(status, reason))
    };
    // The operator's browser is a client too (the dashboard, often through `kubectl
    // port-forward`, so from loopback), and any page it shows may send requests here: a
    // cross-site POST needs no CORS preflight, and a page whose name was rebound to 127.0.0.1
    // may even read the answers. A browser names the page in `Origin`; one that is not this
    // endpoint itself is refused whatever else the request carries.
    if let Some(origin) = req.origin
        && !same_origin(origin, req.host)
    {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "a request from another site's page (Origin {}) is refused",
                cmx_net::text::bounded(origin, 100)
            ),
        );
    }
    if file.as_os_str().is_empty() {
        // Without a token the address alone admits: it must be named by address or as
        // localhost, so that a page that rebound its own name to 127.0.0.1 is not admitted.
        if req.peer.ip().is_loopback() && !req.host.is_some_and(names_loopback_or_address) {
            return refuse(
                StatusCode::FORBIDDEN,
                "the admin API without a token answers requests for localhost or an address only (Host names another site: DNS rebinding?); set admin.api_token_file to use other names",
            );
        }
        if req.peer.ip().is_loopback() {
            return Ok(());
        }
        return refuse(
            StatusCode::FORBIDDEN,
            "the admin API answers loopback peers only unless admin.api_token_file is set",
        );
    }
    let expected = match read_token(file) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "admin API token unavailable; refusing API requests");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the API token file cannot be read",
            );
        }
    };
    match req.authorization.and_then(|a| a.strip_prefix("Bearer ")) {
        Some(given) if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => refuse(StatusCode::UNAUTHORIZED, "wrong bearer token"),
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "no bearer token (Authorization: Bearer ...)",
        ),
    }
}

/// Answers one `/api/` request.
pub async fn respond(gw: &Gateway, req: &ApiRequest<'_>) -> ApiResponse {
    if let Err(refused) = admitted(gw, req) {
        return refused;
    }
    let parts: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(3).collect();
    match (req.method, parts.as_slice()) {
        (&Method::GET | &Method::HEAD, ["identities"]) => answer(StatusCode::OK, identities(gw)),
        (&Method::GET | &Method::HEAD, ["sessions"]) => answer(StatusCode::OK, sessions(gw)),
        (&Method::GET | &Method::HEAD, ["forwards"]) => answer(StatusCode::OK, forwards(gw)),
        (&Method::GET | &Method::HEAD, ["pairs"]) => answer(StatusCode::OK, pairs(gw)),
        (&Method::GET | &Method::HEAD, ["audit"]) => match audit_query(req.query) {
            Ok((q, limit)) => answer(
                StatusCode::OK,
                json!({ "records": audit_log::trail().query(&q, limit) }),
            ),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (&Method::POST, ["sessions", id, "disconnect"]) => disconnect_session(gw, req, id).await,
        (&Method::POST, ["registry", "reload"]) => reload(gw, req).await,
        (_, ["identities" | "sessions" | "forwards" | "pairs" | "audit" | "events"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not supported here; use GET", req.method),
        ),
        (_, ["sessions", _, "disconnect"] | ["registry", "reload"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not supported here; use POST", req.method),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!(
                "no {} here; try /api/v1/identities, sessions, forwards, pairs or audit",
                cmx_net::text::bounded(req.path, 256)
            ),
        ),
    }
}

/// The audit trail as Server-Sent Events: the lines after `Last-Event-ID` (or `after`) that the
/// trail still holds, then new ones as they come, for `STREAM_SECS`. `Err`: the refusal.
pub fn event_stream(
    gw: &Gateway,
    req: &ApiRequest<'_>,
) -> Result<impl futures::Stream<Item = Bytes> + Send + 'static, ApiResponse> {
    admitted(gw, req)?;
    let (mut query, _) = audit_query(req.query).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    if let Some(id) = req.last_event_id.and_then(|id| id.trim().parse().ok()) {
        query.after = Some(id);
    }
    // Subscribed before the backlog is read: a line recorded in between is in one or the other.
    let live = audit_log::trail().subscribe();
    let changes = gw.events.subscribe();
    let backlog = audit_log::trail().query(&query, AUDIT_LIMIT);
    let mut head = String::from("retry: 1000\n\n");
    for line in &backlog {
        head.push_str(&sse_frame(line));
    }
    let last = backlog.last().map(audit_log::seq).or(query.after).unwrap_or(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(STREAM_SECS);
    let shutdown = gw.shutdown.clone();
    let state = (live, changes, last);
    let rest = futures::stream::unfold(state, move |(mut live, mut changes, mut last)| {
        let query = query.clone();
        let shutdown = shutdown.clone();
        async move {
            loop {
                let frame = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return None,
                    _ = shutdown.cancelled() => return None,
                    line = live.recv() => match line {
                        Ok(line) if audit_log::seq(&line) > last && query.matches(&line) => {
                            last = audit_log::seq(&line);
                            sse_frame(&line)
                        }
                        Ok(_) => continue,
                        // Lines this stream missed are still in the trail: end, and the client's
                        // reconnect (from `last`) reads them from there.
                        Err(_) => return None,
                    },
                    change = changes.recv() => match change {
                        Ok(event) if query.identity.as_deref().is_none_or(|i| event.identity() == Some(i)) => {
                            change_frame(&serde_json::to_string(&event).unwrap_or_default())
                        }
                        Ok(_) => continue,
                        // Changes are not kept: say so, and the client reads the tables again.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            change_frame(r#"{"kind":"resync"}"#)
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                };
                return Some((Bytes::from(frame), (live, changes, last)));
            }
        }
    });
    Ok(futures::StreamExt::chain(
        futures::stream::once(std::future::ready(Bytes::from(head))),
        rest,
    ))
}

/// A gateway event (a session, forward or pair came or went) as an SSE `change` frame. It has
/// no `id`: changes are not replayed, so a reconnecting client reads the tables again.
fn change_frame(event: &str) -> String {
    format!("event: change\ndata: {event}\n\n")
}

fn sse_frame(line: &serde_json::Map<String, Value>) -> String {
    format!(
        "id: {}\nevent: audit\ndata: {}\n\n",
        audit_log::seq(line),
        serde_json::to_string(line).unwrap_or_default()
    )
}

fn identities(gw: &Gateway) -> Value {
    let sessions = gw.sessions.snapshot();
    let registry = gw.registry();
    let list: Vec<Value> = registry
        .iter()
        .map(|i| {
            let live = sessions.iter().filter(|(_, s)| s.identity == i.name).count();
            json!({
                "name": i.name,
                "role": i.role.as_str(),
                "address": i.address.to_string(),
                "mac": i.mac.map(|m| m.to_string()),
                "principals": i.principals,
                "permit_listen": i.permit_listen.to_string(),
                "permit_open": i.permit_open.to_string(),
                "sessions": live,
                "connected": live > 0,
            })
        })
        .collect();
    json!({ "identities": list })
}

fn sessions(gw: &Gateway) -> Value {
    let mut list = gw.sessions.snapshot();
    list.sort_by_key(|(id, _)| id.0);
    let list: Vec<Value> = list
        .into_iter()
        .map(|(id, s)| {
            let (from_peer, to_peer) = s.traffic.get();
            json!({
                "id": id.to_string(),
                "identity": s.identity,
                "peer": s.peer.to_string(),
                "since": s.since,
                "credential": s.credential.to_string(),
                "channels": s.channels.open(),
                "bytes_from_peer": from_peer,
                "bytes_to_peer": to_peer,
                "closing": s.closing,
            })
        })
        .collect();
    // Who is knocking, beside who is in: connections not authenticated yet, sources the
    // penalty box refuses and sources known from a login in the last 24 h (the same figures
    // as the metrics of those names).
    let now = std::time::Instant::now();
    let front_door = json!({
        "unauthenticated": gw.admission.unauthenticated(),
        "penalized_sources": gw.admission.penalized(now),
        "known_sources": gw.admission.known(now),
    });
    json!({ "sessions": list, "front_door": front_door })
}

fn forwards(gw: &Gateway) -> Value {
    let list: Vec<Value> = gw
        .mirrors
        .views()
        .into_iter()
        .map(|f| {
            json!({
                "identity": f.identity,
                "address": f.addr.to_string(),
                "port": f.port,
                "session": f.session.to_string(),
                "requested_address": f.requested_address,
                "since": f.since,
                "takeovers": f.takeovers,
            })
        })
        .collect();
    json!({ "forwards": list })
}

fn pairs(gw: &Gateway) -> Value {
    let list: Vec<Value> = gw
        .carried
        .views()
        .into_iter()
        .map(|p| {
            json!({
                "conn_id": p.conn_id,
                "session": p.session.to_string(),
                "device": p.device,
                "server": p.server,
                "target": p.target,
                "bytes_to_target": p.bytes_to_target,
                "bytes_from_target": p.bytes_from_target,
                "spliced": p.spliced,
                "since": p.since,
            })
        })
        .collect();
    json!({ "pairs": list })
}

/// `after`, `since`, `identity`, `decision`, `event`, `limit` from a query string.
fn audit_query(query: Option<&str>) -> Result<(Query, usize), String> {
    let mut q = Query::default();
    let mut limit = AUDIT_LIMIT;
    let number = |k: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{k}={} is not a number", cmx_net::text::bounded(v, 64)))
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "after" => q.after = Some(number(&k, &v)?),
            "since" => q.since = Some(number(&k, &v)?),
            "limit" => limit = (number(&k, &v)? as usize).min(AUDIT_LIMIT),
            "identity" => q.identity = Some(v.into_owned()),
            "decision" => q.decision = Some(v.into_owned()),
            "event" => q.event = Some(v.into_owned()),
            other => {
                return Err(format!(
                    "unknown parameter '{}'; use after, since, identity, decision, event or limit",
                    cmx_net::text::bounded(other, 64)
                ));
            }
        }
    }
    Ok((q, limit))
}

async fn disconnect_session(gw: &Gateway, req: &ApiRequest<'_>, id: &str) -> ApiResponse {
    let request = format!("disconnect session {}", cmx_net::text::bounded(id, 64));
    let session = id
        .strip_prefix('s')
        .and_then(|n| n.parse::<u64>().ok())
        .map(SessionId)
        .and_then(|sid| Some((sid, gw.sessions.get(sid)?)));
    let Some((sid, entry)) = session else {
        audit::admin_action(req.peer, &request, "", "no such session");
        return error(
            StatusCode::NOT_FOUND,
            format!("no live session {}", cmx_net::text::bounded(id, 64)),
        );
    };
    let reason = format!("disconnected by an operator (admin API, from {})", req.peer);
    audit::admin_action(req.peer, &request, &entry.identity, "done");
    gw.sessions.closing(sid, &reason);
    disconnect(&entry.handle, &reason).await;
    answer(
        StatusCode::OK,
        json!({ "disconnected": sid.to_string(), "identity": entry.identity }),
    )
}

async fn reload(gw: &Gateway, req: &ApiRequest<'_>) -> ApiResponse {
    let mut events = gw.events.subscribe();
    gw.reload_requested.notify_one();
    let outcome = tokio::time::timeout(RELOAD_WAIT, async {
        loop {
            match events.recv().await {
                Ok(GatewayEvent::RegistryReloaded {
                    trigger,
                    identities,
                    previous,
                }) if trigger == crate::reload::API_TRIGGER => {
                    return Ok(json!({ "applied": true, "identities": identities, "previous": previous }));
                }
                Ok(GatewayEvent::RegistryRejected { trigger, error })
                    if trigger == crate::reload::API_TRIGGER =>
                {
                    return Err(error);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err("the gateway is shutting down".to_string());
                }
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(body)) => {
            audit::admin_action(req.peer, "reload the identity registry", "", "applied");
            answer(StatusCode::OK, body)
        }
        Ok(Err(e)) => {
            audit::admin_action(req.peer, "reload the identity registry", "", "refused");
            answer(StatusCode::CONFLICT, json!({ "applied": false, "error": e }))
        }
        Err(_) => {
            audit::admin_action(req.peer, "reload the identity registry", "", "no answer");
            error(
                StatusCode::GATEWAY_TIMEOUT,
                "the registry watcher did not answer in 10 s",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_exact() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn a_page_is_this_endpoints_own_only_with_the_same_scheme_less_host() {
        let host = Some("127.0.0.1:9180");
        assert!(same_origin("http://127.0.0.1:9180", host));
        assert!(same_origin("https://LOCALHOST:9180", Some("localhost:9180")));
        assert!(!same_origin("http://127.0.0.1:18888", host), "another port");
        assert!(!same_origin("http://evil.example", host));
        assert!(!same_origin("null", host), "a sandboxed or opaque page");
        assert!(
            !same_origin("http://127.0.0.1:9180", None),
            "no Host to compare with"
        );
    }

    #[test]
    fn only_localhost_and_addresses_are_names_rebinding_cannot_bring() {
        for host in [
            "127.0.0.1:9180",
            "localhost:9180",
            "localhost",
            "a.localhost:1",
            "[::1]:9180",
            "10.0.0.7:9180",
            "LOCALHOST.",
        ] {
            assert!(names_loopback_or_address(host), "{host}");
        }
        for host in [
            "evil.example:9180",
            "x",
            "127.0.0.1.nip.io:9180",
            "[evil]:9180",
            "localhost.evil.example",
        ] {
            assert!(!names_loopback_or_address(host), "{host}");
        }
    }

    #[test]
    fn token_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cr3t-t0ken-0123456789\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "s3cr3t-t0ken-0123456789");
        std::fs::write(&path, "short\n").unwrap();
        let e = read_token(&path).unwrap_err().to_string();
        assert!(e.contains("the token is 5 characters; use at least 16"), "{e}");
        std::fs::write(&path, "two lines of a token\nsecond line here\n").unwrap();
        assert!(matches!(read_token(&path), Err(TokenError::NotPrintable { .. })));
        let missing = dir.path().join("missing");
        let e = read_token(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "admin.api_token_file {}: cannot read it",
                missing.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn audit_queries_are_parsed_and_unknown_parameters_named() {
        let (q, limit) = audit_query(Some("identity=dev1&decision=deny&after=3&limit=5000")).unwrap();
        assert_eq!(q.identity.as_deref(), Some("dev1"));
        assert_eq!(q.decision.as_deref(), Some("deny"));
        assert_eq!(q.after, Some(3));
        assert_eq!(limit, AUDIT_LIMIT, "the limit is capped");
        assert_eq!(
            audit_query(Some("since=x")).unwrap_err(),
            "since=x is not a number"
        );
        assert!(
            audit_query(Some("who=me"))
                .unwrap_err()
                .starts_with("unknown parameter 'who'")
        );
    }
}
