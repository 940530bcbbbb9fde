//! `forge-coordinator serve --http ADDR`: the live dashboard (one page, its script and styles
//! built into the binary, no CDN), its JSON (`/api/status`) and Prometheus metrics (`/metrics`)
//! on one HTTP listener, served with axum.
//!
//! On a loopback address anyone on the machine may read it, as they may read the state
//! directory. Bound anywhere else, every request must show the cluster token (or its secret
//! half): `Authorization: Bearer TOKEN`, or `?token=TOKEN` in the address, which the page
//! passes on to the requests it makes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use forge_protocol::session::{MemberStatus, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::AtomicU64;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::dashboard::{Dashboard, MemberTotals};
use crate::error::{Error, Result};
use crate::server::ToLoop;
use crate::tls;

const PAGE: &str = include_str!("../assets/dashboard.html");

/// The HTTP side of a coordinator, bound before it runs.
#[derive(Debug)]
pub(crate) struct HttpListener {
    listener: std::net::TcpListener,
    /// Required of every request when the address is not a loopback one.
    secret: Option<Arc<str>>,
}

impl HttpListener {
    /// Binds `addr`; the token is required unless it is a loopback address.
    pub(crate) fn bind(addr: SocketAddr, token_secret: &str) -> Result<HttpListener> {
        let listener = std::net::TcpListener::bind(addr).map_err(|cause| {
            Error::Http(format!(
                "cannot listen for the dashboard on {addr}: {cause}; pick another --http \
                 address or port"
            ))
        })?;
        listener.set_nonblocking(true).map_err(|cause| {
            Error::Http(format!("cannot set up the dashboard listener: {cause}"))
        })?;
        let secret = (!addr.ip().is_loopback()).then(|| Arc::from(token_secret));
        Ok(HttpListener { listener, secret })
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|cause| Error::Http(format!("cannot read the dashboard's address: {cause}")))
    }

    pub(crate) fn needs_token(&self) -> bool {
        self.secret.is_some()
    }

    /// Serves until the task is aborted.
    pub(crate) async fn serve(
        self,
        to_loop: mpsc::Sender<ToLoop>,
        dashboard: Arc<Mutex<Dashboard>>,
        run: Value,
    ) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(err) => {
                warn!("the dashboard cannot listen: {err}");
                return;
            }
        };
        let state = Shared {
            to_loop,
            dashboard,
            run: Arc::new(run),
            secret: self.secret,
        };
        let app = Router::new()
            .route("/", get(page))
            .route("/api/status", get(api_status))
            .route("/metrics", get(metrics))
            .layer(middleware::from_fn_with_state(state.clone(), authorize))
            .with_state(state);
        if let Err(err) = axum::serve(listener, app).await {
            warn!("the dashboard stopped: {err}");
        }
    }
}

#[derive(Clone)]
struct Shared {
    to_loop: mpsc::Sender<ToLoop>,
    dashboard: Arc<Mutex<Dashboard>>,
    run: Arc<Value>,
    secret: Option<Arc<str>>,
}

impl Shared {
    async fn status(&self) -> std::result::Result<Status, StatusCode> {
        let (reply, status) = oneshot::channel();
        self.to_loop
            .send(ToLoop::Status { reply })
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        status.await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
    }

    fn dashboard(&self) -> std::sync::MutexGuard<'_, Dashboard> {
        self.dashboard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The token given as `SECRET.FINGERPRINT` or as the secret alone: its secret half.
fn secret_of(given: &str) -> &str {
    given.trim().split('.').next().unwrap_or_default()
}

async fn authorize(
    State(state): State<Shared>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(secret) = &state.secret else {
        return next.run(request).await;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or(query.token.as_deref());
    match given {
        Some(given) if tls::secret_matches(secret, secret_of(given)) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            "this dashboard needs the cluster token that `forge-coordinator serve` printed: open \
             it as http://ADDR/?token=TOKEN, or send `Authorization: Bearer TOKEN`\n",
        )
            .into_response(),
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn api_status(State(state): State<Shared>) -> Response {
    let status = match state.status().await {
        Ok(status) => status,
        Err(code) => return code.into_response(),
    };
    let view = state.dashboard().view(&status, (*state.run).clone());
    let mut response = axum::Json(view).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn metrics(State(state): State<Shared>) -> Response {
    let status = match state.status().await {
        Ok(status) => status,
        Err(code) => return code.into_response(),
    };
    let text = encode_metrics(&status, &state.dashboard());
    match text {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabels {
    member: u64,
    peer_id: String,
}

type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;

/// Registers a per-member family under `name`, each member's metric given `value(member)` by
/// `apply` (members without a value are left out).
fn per_member<M>(
    registry: &mut Registry,
    status: &Status,
    (name, help): (&str, &str),
    apply: fn(&M, f64),
    value: impl Fn(&MemberStatus) -> Option<f64>,
) where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    let family = Family::<MemberLabels, M>::default();
    for m in &status.members {
        if let Some(v) = value(m) {
            let labels = MemberLabels {
                member: m.member.0,
                peer_id: m.peer_id.clone(),
            };
            apply(&family.get_or_create(&labels), v);
        }
    }
    registry.register(name, help, family);
}

fn set_gauge(g: &GaugeF, v: f64) {
    g.set(v);
}

fn add_counter(c: &CounterF, v: f64) {
    c.inc_by(v);
}

/// The Prometheus exposition of the run (OpenMetrics text).
pub(crate) fn encode_metrics(
    status: &Status,
    dashboard: &Dashboard,
) -> std::result::Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("forge");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let g = GaugeF::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let c = CounterF::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    gauge(
        &mut registry,
        "members",
        "Members of the run",
        status.members.len() as f64,
    );
    gauge(
        &mut registry,
        "members_connected",
        "Members with an open connection",
        status.members.iter().filter(|m| m.connected).count() as f64,
    );
    gauge(
        &mut registry,
        "replicas",
        "Replicas in the stage plan",
        status.replicas.len() as f64,
    );
    gauge(
        &mut registry,
        "global_version",
        "Version of the committed global parameters",
        status.global_version as f64,
    );
    counter(
        &mut registry,
        "rounds_committed",
        "Rounds whose outer step was committed",
        status.rounds_committed as f64,
    );
    counter(
        &mut registry,
        "rounds_abandoned",
        "Rounds abandoned without a quorum",
        status.rounds_abandoned as f64,
    );
    if let Some(round) = status.last_checkpoint {
        gauge(
            &mut registry,
            "last_checkpoint_round",
            "Round of the newest committed checkpoint",
            round.0 as f64,
        );
    }
    if let Some((_, loss)) = dashboard.last_loss() {
        gauge(
            &mut registry,
            "loss",
            "Mean training loss of the newest round the members summarised",
            loss,
        );
    }
    if let Some((_, loss)) = dashboard.last_eval() {
        gauge(
            &mut registry,
            "validation_loss",
            "Validation loss of the newest evaluated global model",
            loss,
        );
    }
    let totals = |m: &MemberStatus| dashboard.totals(m.member);
    per_member(
        &mut registry,
        status,
        (
            "member_tokens_per_second",
            "Tokens per second of wall clock over the member's last round (its measured speed before one)",
        ),
        set_gauge,
        |m| {
            let measured = m.tokens_per_s;
            Some(
                totals(m)
                    .and_then(|t| t.last_tokens_per_s)
                    .unwrap_or(measured),
            )
        },
    );
    per_member(
        &mut registry,
        status,
        (
            "member_last_heartbeat_seconds",
            "Seconds since the member was last heard",
        ),
        set_gauge,
        |m| Some(m.last_heartbeat_ms_ago as f64 / 1e3),
    );
    per_member(
        &mut registry,
        status,
        (
            "member_loss",
            "Mean training loss of the member's last round",
        ),
        set_gauge,
        |m| totals(m).and_then(|t| t.last_loss),
    );
    type Total = fn(&MemberTotals) -> f64;
    let counters: [(&str, &str, Total); 5] = [
        (
            "member_bytes_sent",
            "Bytes the member sent in all-reduces",
            |t| t.bytes_sent as f64,
        ),
        (
            "member_bytes_received",
            "Bytes the member received in all-reduces",
            |t| t.bytes_received as f64,
        ),
        (
            "member_sync_seconds",
            "Seconds the member spent in all-reduces",
            |t| t.sync_s,
        ),
        (
            "member_inner_seconds",
            "Seconds the member spent in inner steps",
            |t| t.inner_s,
        ),
        ("member_tokens", "Tokens the member trained on", |t| {
            t.tokens as f64
        }),
    ];
    for (name, help, value) in counters {
        per_member(&mut registry, status, (name, help), add_counter, |m| {
            Some(totals(m).map_or(0.0, value))
        });
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn empty_status() -> Status {
        Status {
            software_version: "test".to_string(),
            members: Vec::new(),
            replicas: Vec::new(),
            standby: Vec::new(),
            open_round: None,
            last_round: None,
            rounds_committed: 3,
            rounds_abandoned: 1,
            recent_rounds: Vec::new(),
            global_version: 3,
            last_checkpoint: None,
            data: None,
            plan: Default::default(),
            pending_control: Vec::new(),
            aborted: false,
        }
    }

    async fn get(port: u16, path: &str, header: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, response)
    }

    /// Bound to every address (not loopback), each request must show the cluster token, whole
    /// or its secret half, in the query or as a bearer token; the answers follow the status.
    #[tokio::test]
    async fn off_loopback_every_request_needs_the_token() {
        let http = HttpListener::bind("0.0.0.0:0".parse().unwrap(), "5ec2e7").unwrap();
        assert!(http.needs_token());
        let port = http.local_addr().unwrap().port();
        let (to_loop, mut inbox) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(ToLoop::Status { reply }) = inbox.recv().await {
                let _ = reply.send(empty_status());
            }
        });
        tokio::spawn(http.serve(to_loop, Arc::default(), Value::Null));
        for path in [
            "/",
            "/api/status",
            "/metrics",
            "/metrics?token=bad",
            "/?token=5ec2e8",
        ] {
            let (code, body) = get(port, path, "").await;
            assert_eq!(code, 401, "{path}: {body}");
            assert!(body.contains("?token=TOKEN"), "{body}");
        }
        let (code, body) = get(port, "/?token=5ec2e7.f1n6e4", "").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("<title>Forge run</title>"));
        let (code, body) = get(port, "/api/status?token=5ec2e7", "").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"rounds_committed\":3"), "{body}");
        let bearer = "Authorization: Bearer 5EC2E7.f1n6e4\r\n";
        let (code, body) = get(port, "/metrics", bearer).await;
        assert_eq!(code, 200, "{body}");
        for needle in [
            "forge_rounds_committed_total 3",
            "forge_rounds_abandoned_total 1",
            "forge_members 0",
            "# EOF",
        ] {
            assert!(body.contains(needle), "{needle}: {body}");
        }
        // A loopback address needs no token.
        let local = HttpListener::bind("127.0.0.1:0".parse().unwrap(), "5ec2e7").unwrap();
        assert!(!local.needs_token());
    }
}
