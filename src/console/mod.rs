//! `kubectl jit console`: a small web UI on 127.0.0.1 acting as the user's own kubeconfig
//! identity. No credentials of its own and nothing on the cluster side: every call it
//! makes is the user's, so RBAC and admission decide exactly as for `kubectl`.
//!
//! A local HTTP server holding someone's cluster credentials is worth attacking from any web
//! page they visit, so it answers only:
//! - requests whose `Host` is the address it printed (a DNS-rebinding page names its own
//!   host);
//! - requests carrying the secret it printed: once in the URL (`?token=`), which sets a
//!   `SameSite=Strict`, `HttpOnly` cookie; a cross-site page can neither read the token nor
//!   send the cookie;
//! - writes with `Content-Type: application/json` (a cross-site form cannot send that
//!   without a CORS preflight, which is never granted).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::plugin::{Error, Outcome, Session};

mod data;

/// The page: one accessible HTML document that renders the JSON endpoints.
const PAGE: &str = include_str!("page.html");
/// The cookie that carries the secret after the first visit.
const COOKIE: &str = "portcullis_console";

struct Console {
    session: Session,
    token: String,
    host: String,
}

/// Serves the console on 127.0.0.1:`port` (0: any free port) until interrupted; prints the
/// address to open, with its secret.
pub async fn serve(session: Session, port: u16) -> Result<Outcome, Error> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|e| Error::Usage(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Usage(e.to_string()))?;
    let token = secret().map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
    let console = Arc::new(Console {
        session,
        token: token.clone(),
        host: address.to_string(),
    });
    // Written, not printed: a reader that went away (`| head -1`) must not end the console.
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "kubectl jit console: http://{address}/?token={token}"
    );
    let _ = writeln!(stdout, "(as your kubeconfig identity; Ctrl-C stops it)");
    let _ = stdout.flush();
    axum::serve(listener, router(console))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Usage(e.to_string()))?;
    Ok(Outcome::Done)
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/overview", get(overview))
        .route("/api/requests", post(create_request))
        .route("/api/requests/{name}/revoke", post(revoke))
        .route("/api/requests/{name}/decide", post(decide))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// 32 random bytes from the kernel, as hex.
fn secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The checks every request passes before a handler runs (see the module documentation).
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host_ok = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == console.host);
    if !host_ok {
        return (StatusCode::FORBIDDEN, "unknown host").into_response();
    }
    let in_url = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .any(|pair| pair.strip_prefix("token=") == Some(console.token.as_str()));
    let in_cookie = cookie(headers).is_some_and(|t| t == console.token);
    if !in_url && !in_cookie {
        return (
            StatusCode::UNAUTHORIZED,
            "open the address kubectl jit console printed",
        )
            .into_response();
    }
    if request.method() != axum::http::Method::GET {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|t| t.starts_with("application/json"));
        if !json {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "JSON only").into_response();
        }
    }
    let mut response = next.run(request).await;
    if in_url {
        let value = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            console.token
        );
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
    }
    response
}

/// The secret from the console's cookie, if the browser sent it.
fn cookie(headers: &HeaderMap) -> Option<String> {
    let prefix = format!("{COOKIE}=");
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(&prefix).map(str::to_owned))
}

/// The page, its one script allowed by a fresh nonce: no inline handler, no injected
/// markup and no other origin can run code in it.
async fn page() -> Response {
    let Ok(nonce) = secret() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; \
         connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    (
        [
            (header::CONTENT_SECURITY_POLICY, policy),
            (header::X_FRAME_OPTIONS, "DENY".to_owned()),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        Html(PAGE.replace("{{NONCE}}", &nonce)),
    )
        .into_response()
}

/// An error as the page shows it: the API's message, with its status.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, axum::Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let status = match &error {
            Error::Usage(_) => StatusCode::BAD_REQUEST,
            // The API's refusals (403 by RBAC or admission, 404, 409, 422) are the user's to
            // see as such; anything else is the cluster failing behind the console. A 401 is
            // the console's own credentials refused upstream, not the page's session: passed
            // on, it would read as the console's guard turning the page away.
            Error::Api {
                code: Some(code @ 400..=499),
                ..
            } if *code != 401 => StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY),
            _ => StatusCode::BAD_GATEWAY,
        };
        Failure(status, error.to_string())
    }
}

async fn overview(
    State(console): State<Arc<Console>>,
) -> Result<axum::Json<data::Overview>, Failure> {
    Ok(axum::Json(data::overview(&console.session).await?))
}

/// What the request form sends.
#[derive(Debug, Deserialize)]
pub struct Ask {
    pub policy: String,
    pub machine: String,
    pub port: u16,
    pub duration: String,
    #[serde(default)]
    pub justification: Option<String>,
}

#[derive(Serialize)]
struct Created {
    name: String,
}

async fn create_request(
    State(console): State<Arc<Console>>,
    axum::Json(ask): axum::Json<Ask>,
) -> Result<axum::Json<Created>, Failure> {
    let name = data::request(&console.session, &ask).await?;
    Ok(axum::Json(Created { name }))
}

async fn revoke(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    data::revoke(&console.session, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An approver's decision from the page.
#[derive(Debug, Deserialize)]
pub struct Decision {
    pub decision: String,
    #[serde(default)]
    pub comment: Option<String>,
}

async fn decide(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    axum::Json(decision): axum::Json<Decision>,
) -> Result<axum::Json<Created>, Failure> {
    let name = data::decide(&console.session, &name, &decision).await?;
    Ok(axum::Json(Created { name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_refusals_keep_their_status_and_failures_upstream_are_a_bad_gateway() {
        let status = |code: Option<u16>| {
            Failure::from(Error::Api {
                message: "refused".into(),
                code,
            })
            .0
        };
        for code in [400, 403, 404, 409, 422] {
            assert_eq!(status(Some(code)).as_u16(), code);
        }
        for code in [Some(401), Some(500), Some(503), None] {
            assert_eq!(status(code), StatusCode::BAD_GATEWAY, "{code:?}");
        }
        assert_eq!(
            Failure::from(Error::Usage("no".into())).0,
            StatusCode::BAD_REQUEST
        );
    }
}
