//! The routes of the control port and their request checks (docs/PROTOCOL.md §9).
//!
//! Each handler validates its whole request before it asks anything of the
//! node, answers every refusal as `{"error": "<reason>"}` with a status that
//! says whose fault it is, and reaches the node only through [`NodeApi`]. It
//! must not block: the node's calls are non-blocking hand-offs, and the one
//! wait (the web-service transport's replies) is bounded by
//! [`WEB_REPLY_TIMEOUT`]. Which routes a listener serves is decided here
//! ([`Routes`]): the public web listener answers nothing but the web
//! transport. Nothing here logs request bodies, tokens or credentials.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::{require_admin, AdminToken};
use super::http::{track_request, BodyBytes, ListenerStats, Peer};
use super::metrics::{Exposition, CONTENT_TYPE as METRICS_CONTENT_TYPE};
use super::{
    NodeApi, Routes, DEFAULT_CREDENTIAL_TTL_SECS, MAX_CREDENTIAL_TTL_SECS, MAX_NOTIFY_BATCH,
    MAX_REQUEST_BODY, MIN_CREDENTIAL_TTL_SECS, WEB_REPLY_TIMEOUT,
};
use crate::packet::{CredentialError, MAX_ACCOUNT_LEN, MAX_PACKET};
use crate::proto::MAX_BITMASK;

/// A refusal: its status and the reason sent as `{"error": reason}`.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    reason: String,
}

impl ApiError {
    /// A refusal with `status` and `reason`.
    pub(super) fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            reason: reason.into(),
        }
    }

    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.reason }))).into_response()
    }
}

/// The handlers' shared state.
#[derive(Clone)]
struct App {
    node: Arc<dyn NodeApi>,
    /// Every listener's connection counters, for `/metrics`.
    listeners: Arc<[Arc<ListenerStats>]>,
}

/// The routes `routes` names, without the listener: `/v1/notify` and
/// `/v1/credentials` (admin token required), `/metrics` and `/healthz`
/// ([`Routes::Admin`]), `/.well-known/mmmpresence/` ([`Routes::Web`]), or
/// all of them ([`Routes::All`]). Anything else is 404.
///
/// The handlers read the peer from `ConnectInfo<Peer>`, so serve it as
/// [`serve_listeners`](super::serve_listeners) does. An empty `admin_token`
/// refuses every write.
pub(super) fn router_for(
    node: Arc<dyn NodeApi>,
    admin_token: &str,
    routes: Routes,
    listeners: Arc<[Arc<ListenerStats>]>,
) -> Router {
    let token = Arc::new(AdminToken::new(admin_token));
    let admin = || middleware::from_fn_with_state(Arc::clone(&token), require_admin);
    let mut router = Router::new();
    if routes != Routes::Web {
        router = router
            // The admin check is a route layer on the POST handler only, so a
            // wrong method is still 405 and an unauthorized body is never read.
            .route("/v1/notify", post(notify).route_layer(admin()))
            .route("/v1/credentials", post(credentials).route_layer(admin()))
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz));
    }
    if routes != Routes::Admin {
        router = router.route(
            "/.well-known/mmmpresence/",
            post(web_transport).layer(DefaultBodyLimit::max(MAX_PACKET)),
        );
    }
    router
        .fallback(not_found)
        // After every route: it is installed on the routes present.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(middleware::from_fn(log_request))
        // Outermost: the request's head is complete when it runs.
        .layer(middleware::from_fn(track_request))
        .with_state(App { node, listeners })
}

/// Logs method, path and status at debug level; never headers or bodies.
async fn log_request(request: Request, next: Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "control request");
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// `GET /healthz`: 200 `ok`, or 503 with the reason when part of the node is
/// down (docs/PROTOCOL.md §9).
async fn healthz(State(app): State<App>) -> Response {
    match app.node.health() {
        Ok(()) => "ok".into_response(),
        Err(reason) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let mut out = Exposition::new();
    app.node.metrics(&mut out);
    super::http::render(&app.listeners, &mut out);
    let text = out.into_string();
    ([(CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response()
}

/// A body that could not be read: 413 over the limit, else axum's reason.
fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        let reason = format!("request body larger than {MAX_REQUEST_BODY} bytes");
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, reason)
    } else {
        ApiError::new(rejection.status(), rejection.body_text())
    }
}

/// Parses a JSON body, telling bad syntax from a wrong shape.
fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    let value = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("invalid request: {e}"),
        _ => format!("malformed JSON: {e}"),
    })?;
    // serde's derived structs also take a JSON array of their fields in
    // order (`["alice","phone"]`); the API's bodies are objects only (found
    // by the http_bodies fuzz target, docs/TESTING.md).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("invalid request: the body must be a JSON object".into());
    }
    Ok(value)
}

/// `POST /v1/notify`: one notification or a batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyBody {
    account: Option<String>,
    bitmask: Option<String>,
    notifications: Option<Vec<NotificationBody>>,
}

/// One entry of a batch: an object only (a derived `Deserialize` would
/// also take `["account", "bitmask"]`).
struct NotificationBody {
    account: String,
    bitmask: String,
}

impl<'de> Deserialize<'de> for NotificationBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, Visitor};
        const FIELDS: &[&str] = &["account", "bitmask"];
        struct Entry;
        impl<'de> Visitor<'de> for Entry {
            type Value = NotificationBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with account and bitmask")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NotificationBody, A::Error> {
                let (mut account, mut bitmask) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "account" => &mut account,
                        "bitmask" => &mut bitmask,
                        other => return Err(A::Error::unknown_field(other, FIELDS)),
                    };
                    if slot.is_some() {
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    *slot = Some(map.next_value::<String>()?);
                }
                Ok(NotificationBody {
                    account: account.ok_or_else(|| A::Error::missing_field("account"))?,
                    bitmask: bitmask.ok_or_else(|| A::Error::missing_field("bitmask"))?,
                })
            }
        }
        d.deserialize_map(Entry)
    }
}

/// A checked notification, ready to publish.
#[derive(Debug, PartialEq, Eq)]
struct Notification {
    account: String,
    bitmask: Vec<u8>,
}

/// Checks a whole notify request; on any bad entry nothing is returned.
fn parse_notify(body: &[u8]) -> Result<Vec<Notification>, String> {
    let request: NotifyBody = parse_json(body)?;
    match (request.account, request.bitmask, request.notifications) {
        (Some(account), Some(bitmask), None) => Ok(vec![notification(account, &bitmask)?]),
        (None, None, Some(list)) => {
            if list.is_empty() {
                return Err("notifications is empty".into());
            }
            if list.len() > MAX_NOTIFY_BATCH {
                return Err(format!(
                    "notifications has {} entries, at most {MAX_NOTIFY_BATCH} allowed",
                    list.len()
                ));
            }
            list.into_iter()
                .enumerate()
                .map(|(i, n)| {
                    notification(n.account, &n.bitmask)
                        .map_err(|e| format!("notifications[{i}]: {e}"))
                })
                .collect()
        }
        (None, None, None) => Err("expected either account and bitmask, or notifications".into()),
        (_, _, Some(_)) => {
            Err("give either account and bitmask, or notifications, not both".into())
        }
        (None, Some(_), None) => Err("missing field `account`".into()),
        (Some(_), None, None) => Err("missing field `bitmask`".into()),
    }
}

/// Checks one notification (docs/PROTOCOL.md §2: a bitmask of 1 to 32 bytes).
fn notification(account: String, bitmask: &str) -> Result<Notification, String> {
    if account.is_empty() {
        return Err("account is empty".into());
    }
    if account.len() > MAX_ACCOUNT_LEN {
        return Err(format!("account is longer than {MAX_ACCOUNT_LEN} bytes"));
    }
    if bitmask.is_empty() {
        return Err("bitmask is empty".into());
    }
    let bitmask = hex::decode(bitmask).map_err(|_| "bitmask is not hex".to_owned())?;
    if bitmask.len() > MAX_BITMASK {
        return Err(format!("bitmask is longer than {MAX_BITMASK} bytes"));
    }
    if bitmask.iter().all(|&b| b == 0) {
        return Err("bitmask names no store (every bit is zero)".into());
    }
    Ok(Notification { account, bitmask })
}

/// CPU time the control thread may run without a break before a publish
/// request gives its core away.
const CONTROL_RUN_NS: u64 = 500_000;

/// Gives the core away (`sched_yield`) when this thread has used more than
/// [`CONTROL_RUN_NS`] of CPU since it last did. The control thread shares
/// its core with the shards when the node was given CPUs (`--cpus`): a
/// backlog of pipelined publish requests held a shard, and the publishes
/// it had been handed, off the core for 3 ms. Yielding after every
/// request instead cost a context switch per request: at half the maximum
/// rate the node then needed a whole core. Where no other thread waits for
/// the core, the yield returns at once.
fn yield_after_a_long_run() {
    use std::cell::Cell;
    thread_local!(static LAST: Cell<u64> = const { Cell::new(0) });
    let now = thread_cpu_ns();
    LAST.with(|last| {
        if now.saturating_sub(last.get()) >= CONTROL_RUN_NS {
            std::thread::yield_now();
            last.set(thread_cpu_ns());
        }
    });
}

/// CPU time of the calling thread, in nanoseconds (0 if unknown).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn notify(State(app): State<App>, body: Result<BodyBytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(BodyBytes(body)) => body,
        Err(rejection) => return body_error(rejection).into_response(),
    };
    let batch = match parse_notify(&body) {
        Ok(batch) => batch,
        Err(reason) => return ApiError::bad_request(reason).into_response(),
    };
    // Publish in order and stop at the first full inbox, so the caller knows
    // that exactly the first `accepted` entries went out.
    let mut refused = None;
    for (accepted, n) in batch.iter().enumerate() {
        if let Err(overloaded) = app.node.publish(&n.account, &n.bitmask) {
            refused = Some((accepted, overloaded));
            break;
        }
    }
    let accepted = refused.map_or(batch.len(), |(k, _)| k);
    if accepted > 0 {
        yield_after_a_long_run();
    }
    // docs/PROTOCOL.md §10.3: in a cluster the accepted entries also go to
    // the other nodes; the answer says how many the bus took and how many
    // it could not (`remote_failed`: devices elsewhere miss them).
    let taken: Vec<(String, Vec<u8>)> = batch
        .into_iter()
        .take(accepted)
        .map(|n| (n.account, n.bitmask))
        .collect();
    let remote = match app.node.publish_remote(taken) {
        Some(future) => Some(future.await),
        None => None,
    };
    let mut body = json!({ "accepted": accepted });
    if let Some(r) = remote {
        body["remote"] = json!(r.remote);
        body["remote_failed"] = json!(r.failed);
    }
    match refused {
        Some((k, overloaded)) => {
            body["error"] = json!(format!(
                "{overloaded}; entries from index {k} on were not published"
            ));
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(RETRY_AFTER, "1")],
                Json(body),
            )
                .into_response()
        }
        None => (StatusCode::ACCEPTED, Json(body)).into_response(),
    }
}

/// `POST /v1/credentials`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    account: String,
    device: String,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// A checked credential request.
#[derive(Debug, PartialEq, Eq)]
struct CredentialRequest {
    account: String,
    device: String,
    ttl_secs: u64,
}

/// Checks a credential request's shape and lifetime; names are checked by
/// the issuer.
fn parse_credential_request(body: &[u8]) -> Result<CredentialRequest, String> {
    let request: CredentialBody = parse_json(body)?;
    let ttl_secs = request.ttl_secs.unwrap_or(DEFAULT_CREDENTIAL_TTL_SECS);
    if ttl_secs < MIN_CREDENTIAL_TTL_SECS {
        return Err(format!(
            "ttl_secs must be at least {MIN_CREDENTIAL_TTL_SECS}"
        ));
    }
    if ttl_secs > MAX_CREDENTIAL_TTL_SECS {
        return Err(format!(
            "ttl_secs must be at most {MAX_CREDENTIAL_TTL_SECS} (366 days)"
        ));
    }
    Ok(CredentialRequest {
        account: request.account,
        device: request.device,
        ttl_secs,
    })
}

async fn credentials(State(app): State<App>, body: Result<BodyBytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(BodyBytes(body)) => body,
        Err(rejection) => return body_error(rejection).into_response(),
    };
    let request = match parse_credential_request(&body) {
        Ok(request) => request,
        Err(reason) => return ApiError::bad_request(reason).into_response(),
    };
    match app
        .node
        .issue_credential(&request.account, &request.device, request.ttl_secs)
    {
        Ok(credential) => {
            let headers = [
                (CONTENT_TYPE, "application/json"),
                (CACHE_CONTROL, "no-store"),
            ];
            (StatusCode::OK, headers, credential.to_json()).into_response()
        }
        Err(e @ (CredentialError::InvalidName { .. } | CredentialError::Binding(_))) => {
            ApiError::bad_request(e.to_string()).into_response()
        }
        // The node's own endpoints are wrong: not the caller's fault.
        Err(e) => {
            tracing::error!(error = %e, "cannot issue credentials");
            let reason = format!("node cannot issue credentials: {e}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason).into_response()
        }
    }
}

/// The replies as one body: each prefixed by its u16be length
/// (docs/PROTOCOL.md §9). `None` if one is too long to frame.
fn frame_replies(replies: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(replies.iter().map(|r| r.len() + 2).sum());
    for reply in replies {
        let len = u16::try_from(reply.len()).ok()?;
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(reply);
    }
    Some(body)
}

/// `POST /.well-known/mmmpresence/`: no admin token, the packet
/// authenticates itself.
async fn web_transport(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<BodyBytes, BytesRejection>,
) -> Response {
    let too_long = || ApiError::bad_request(format!("packet longer than {MAX_PACKET} bytes"));
    let packet = match body {
        Ok(BodyBytes(packet)) if packet.is_empty() => {
            return ApiError::bad_request("empty packet").into_response()
        }
        Ok(BodyBytes(packet)) if packet.len() > MAX_PACKET => return too_long().into_response(),
        Ok(BodyBytes(packet)) => packet,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return too_long().into_response(),
        Err(r) => return body_error(r).into_response(),
    };
    let replies = match app.node.web_request(peer.addr, packet.to_vec()) {
        Ok(replies) => replies,
        Err(overloaded) => {
            let error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, overloaded.to_string());
            return ([(RETRY_AFTER, "1")], error).into_response();
        }
    };
    let replies = match tokio::time::timeout(WEB_REPLY_TIMEOUT, replies).await {
        Ok(Ok(replies)) => replies,
        Ok(Err(_dropped)) => {
            let reason = "the shard dropped the request";
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason).into_response();
        }
        Err(_elapsed) => {
            let reason = format!("no reply from the shard within {WEB_REPLY_TIMEOUT:?}");
            return ApiError::new(StatusCode::GATEWAY_TIMEOUT, reason).into_response();
        }
    };
    match frame_replies(&replies) {
        Some(body) => {
            let headers = [(CONTENT_TYPE, "application/octet-stream")];
            (StatusCode::OK, headers, body).into_response()
        }
        None => {
            let reason = "a reply packet is too long to frame";
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason).into_response()
        }
    }
}

/// Not API: the parsers behind `POST /v1/notify` and `POST /v1/credentials`,
/// for tests and fuzzing (`fuzz/`, `tests/fuzz_regressions.rs`,
/// `tests/fuzz_properties.rs`). Associated functions of `dyn NodeApi` only
/// because this module is private and these bodies are what become its
/// calls; call them as `<dyn NodeApi>::parse_notify_body(body)`.
impl dyn NodeApi {
    /// Not API: a `POST /v1/notify` body checked exactly as the handler
    /// checks it: the (account, bitmask) pairs it would publish, in order,
    /// or the reason its 400 gives.
    #[doc(hidden)]
    pub fn parse_notify_body(body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
        parse_notify(body).map(|batch| batch.into_iter().map(|n| (n.account, n.bitmask)).collect())
    }

    /// Not API: a `POST /v1/credentials` body checked exactly as the
    /// handler checks it: (account, device, ttl_secs), or the reason its 400
    /// gives.
    #[doc(hidden)]
    pub fn parse_credentials_body(body: &[u8]) -> Result<(String, String, u64), String> {
        parse_credential_request(body).map(|r| (r.account, r.device, r.ttl_secs))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_cpu_time_counts_this_threads_work_only() {
        std::thread::spawn(|| {
            let before = super::thread_cpu_ns();
            assert!(before > 0, "CLOCK_THREAD_CPUTIME_ID answers");
            // Sleeping uses no CPU.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let slept = super::thread_cpu_ns();
            assert!(
                slept - before < 5_000_000,
                "20 ms asleep counted {} ns",
                slept - before
            );
            // Work does: spin until 1 ms of CPU shows (however long the
            // scheduler takes to give it), within a generous bound.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while super::thread_cpu_ns() - slept < 1_000_000 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "spinning never counted 1 ms of CPU"
                );
            }
        })
        .join()
        .expect("the measuring thread");
    }
    use super::*;

    fn notify_err(body: &str) -> String {
        parse_notify(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn bodies_must_be_objects_not_arrays_of_their_fields() {
        // The http_bodies fuzz target's two findings, and the batch entry.
        let array = parse_credential_request(br#"["c^ ","c^"]"#).expect_err("an array");
        assert_eq!(array, "invalid request: the body must be a JSON object");
        assert!(parse_credential_request(b" [\"\",\"][\"]\r").is_err());
        assert!(parse_notify(br#"["a","01"]"#).is_err());
        let entry = parse_notify(br#"{"notifications":[["a","01"]]}"#).expect_err("an array entry");
        assert!(
            entry.contains("an object with account and bitmask"),
            "{entry}"
        );
        let dup =
            parse_notify(br#"{"notifications":[{"account":"a","account":"b","bitmask":"01"}]}"#)
                .expect_err("a duplicate field");
        assert!(dup.contains("duplicate field `account`"), "{dup}");
        let unknown = parse_notify(br#"{"notifications":[{"account":"a","bitmask":"01","x":1}]}"#)
            .expect_err("an unknown field");
        assert!(unknown.contains("unknown field `x`"), "{unknown}");
        // Objects still parse, whitespace before them included.
        assert!(parse_credential_request(b" \n{\"account\":\"a@b\",\"device\":\"d\"}").is_ok());
    }

    #[test]
    fn notify_single_and_batch() {
        let one = parse_notify(br#"{"account":"a@b","bitmask":"0102"}"#).expect("valid");
        assert_eq!(
            one,
            [Notification {
                account: "a@b".into(),
                bitmask: vec![1, 2]
            }]
        );
        let batch = parse_notify(
            br#"{"notifications":[{"account":"a","bitmask":"FF"},{"account":"b","bitmask":"0100"}]}"#,
        )
        .expect("valid");
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].bitmask, [0xff]);
        let max = format!(
            r#"{{"account":"{}","bitmask":"{}"}}"#,
            "a".repeat(255),
            "ab".repeat(32)
        );
        assert!(parse_notify(max.as_bytes()).is_ok());
    }

    #[test]
    fn notify_reasons_name_the_problem() {
        let long_account = format!(r#"{{"account":"{}","bitmask":"01"}}"#, "a".repeat(256));
        let long_mask = format!(r#"{{"account":"a","bitmask":"{}"}}"#, "01".repeat(33));
        let entries = vec![r#"{"account":"a","bitmask":"01"}"#; MAX_NOTIFY_BATCH + 1].join(",");
        let big_batch = format!(r#"{{"notifications":[{entries}]}}"#);
        let cases: [(&str, &str); 15] = [
            ("{", "malformed JSON"),
            ("", "malformed JSON"),
            ("[]", "invalid request"),
            (
                r#"{"account":"a","bitmask":"01","x":1}"#,
                "unknown field `x`",
            ),
            (
                r#"{"notifications":[{"account":"a","bitmask":"01","y":2}]}"#,
                "unknown field `y`",
            ),
            ("{}", "expected either"),
            (
                r#"{"account":"a","bitmask":"01","notifications":[]}"#,
                "not both",
            ),
            (r#"{"account":"a"}"#, "missing field `bitmask`"),
            (r#"{"account":"","bitmask":"01"}"#, "account is empty"),
            (&long_account, "account is longer than 255 bytes"),
            (r#"{"account":"a","bitmask":"0g"}"#, "bitmask is not hex"),
            (r#"{"account":"a","bitmask":""}"#, "bitmask is empty"),
            (&long_mask, "bitmask is longer than 32 bytes"),
            (
                r#"{"account":"a","bitmask":"0000"}"#,
                "bitmask names no store",
            ),
            (r#"{"notifications":[]}"#, "notifications is empty"),
        ];
        for (body, reason) in cases {
            let err = notify_err(body);
            assert!(err.contains(reason), "{body}: {err}");
        }
        assert!(notify_err(&big_batch).contains("10001 entries, at most 10000"));
        assert!(notify_err(r#"{"account":"a","bitmask":"abc"}"#).contains("not hex"));
        let err = notify_err(
            r#"{"notifications":[{"account":"a","bitmask":"01"},{"account":"b","bitmask":"zz"}]}"#,
        );
        assert_eq!(err, "notifications[1]: bitmask is not hex");
    }

    #[test]
    fn credential_request_defaults_and_bounds() {
        let r = parse_credential_request(br#"{"account":"a","device":"d"}"#).expect("valid");
        assert_eq!(r.ttl_secs, DEFAULT_CREDENTIAL_TTL_SECS);
        let r = parse_credential_request(br#"{"account":"a","device":"d","ttl_secs":60}"#)
            .expect("valid");
        assert_eq!(r.ttl_secs, 60);
        let max = format!(r#"{{"account":"a","device":"d","ttl_secs":{MAX_CREDENTIAL_TTL_SECS}}}"#);
        assert!(parse_credential_request(max.as_bytes()).is_ok());
        let over = format!(
            r#"{{"account":"a","device":"d","ttl_secs":{}}}"#,
            MAX_CREDENTIAL_TTL_SECS + 1
        );
        let err = parse_credential_request(over.as_bytes()).expect_err("too long");
        assert!(err.contains("at most"), "{err}");
        for (body, reason) in [
            (
                r#"{"account":"a","device":"d","ttl_secs":59}"#,
                "at least 60",
            ),
            (
                r#"{"account":"a","device":"d","ttl_secs":-1}"#,
                "invalid request",
            ),
            (r#"{"account":"a"}"#, "missing field `device`"),
            (
                r#"{"account":"a","device":"d","secret":"x"}"#,
                "unknown field `secret`",
            ),
            ("{", "malformed JSON"),
        ] {
            let err = parse_credential_request(body.as_bytes()).expect_err(body);
            assert!(err.contains(reason), "{body}: {err}");
        }
    }

    #[test]
    fn replies_are_length_prefixed() {
        assert_eq!(frame_replies(&[]), Some(vec![]));
        assert_eq!(
            frame_replies(&[vec![0xaa; 3], vec![], vec![0xbb]]),
            Some(vec![0, 3, 0xaa, 0xaa, 0xaa, 0, 0, 0, 1, 0xbb])
        );
        let long = vec![0; 300];
        let framed = frame_replies(std::slice::from_ref(&long)).expect("fits");
        assert_eq!(&framed[..2], &[1, 44]);
        assert_eq!(frame_replies(&[vec![0; 65_536]]), None);
    }
}
