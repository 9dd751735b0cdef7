//! The admin bearer token that guards the control port's writes
//! (docs/PROTOCOL.md §9).
//!
//! The token is kept only as its SHA-256 digest, and a presented token is
//! hashed and compared to it in constant time, so neither the comparison's
//! timing nor the token's length leaks. Nothing here may log, print or
//! `Debug`-show the token.

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use super::api::ApiError;

/// The admin token, as its digest.
pub(super) struct AdminToken {
    /// `None` when the configured token is empty: nothing authorizes then.
    digest: Option<[u8; 32]>,
}

impl AdminToken {
    /// Keeps the digest of `token`.
    pub(super) fn new(token: &str) -> Self {
        let digest = (!token.is_empty()).then(|| Sha256::digest(token.as_bytes()).into());
        AdminToken { digest }
    }

    /// Whether an `Authorization` header carries this token as a bearer token.
    pub(super) fn authorizes(&self, header: Option<&HeaderValue>) -> bool {
        let (Some(expected), Some(presented)) = (self.digest, header.and_then(bearer_token)) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(presented).into();
        constant_time_eq(&presented, &expected)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer_token(value: &HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let space = bytes.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = bytes.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares two digests without branching on their contents.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware on the write routes: 401 with `WWW-Authenticate: Bearer` unless
/// the request carries the admin token. Runs before the body is read.
pub(super) async fn require_admin(
    State(token): State<Arc<AdminToken>>,
    request: Request,
    next: Next,
) -> Response {
    if token.authorizes(request.headers().get(AUTHORIZATION)) {
        return next.run(request).await;
    }
    let reason = if request.headers().contains_key(AUTHORIZATION) {
        "invalid admin token"
    } else {
        "missing Authorization: Bearer <admin token>"
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, reason).into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).expect("test header")
    }

    #[test]
    fn accepts_only_the_bearer_token() {
        let t = AdminToken::new("s3cret");
        assert!(t.authorizes(Some(&header("Bearer s3cret"))));
        assert!(t.authorizes(Some(&header("bearer s3cret"))));
        assert!(t.authorizes(Some(&header("BEARER   s3cret "))));
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer S3CRET",
            "Bearer",
            "Bearer ",
            "Basic s3cret",
            "s3cret",
            "Bearers3cret",
        ] {
            assert!(!t.authorizes(Some(&header(bad))), "{bad}");
        }
        assert!(!t.authorizes(None));
    }

    #[test]
    fn empty_admin_token_refuses_everything() {
        let t = AdminToken::new("");
        assert!(!t.authorizes(Some(&header("Bearer "))));
        assert!(!t.authorizes(Some(&header("Bearer x"))));
        assert!(!t.authorizes(None));
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        for i in [0, 15, 31] {
            b = a;
            b[i] ^= 0x80;
            assert!(!constant_time_eq(&a, &b), "byte {i}");
        }
    }
}
