//! Credentials as handed to a device (docs/PROTOCOL.md §4): conn id, connection
//! secret, account, device, expiry, binding and the endpoints to try, as JSON.
//!
//! A credential is issued from the master key with no database: everything a
//! node later needs is derivable from the conn id or carried in the binding.
//! This file validates names and endpoints on the way in and out and reports
//! bad files in one line; it must not read the clock or the file system (the
//! caller passes `expires`, `now` and the JSON text).

use serde::{Deserialize, Serialize};

use super::binding::{BindingError, BindingKey};
use super::conn_id::{account_affinity, ConnId, CONN_ID_LEN};
use super::kdf::{ConnSecret, MasterKey, KEY_LEN};
use crate::time::UnixSeconds;

/// Longest account name a credential may carry, in bytes.
pub const MAX_ACCOUNT_LEN: usize = 255;
/// Longest device name a credential may carry, in bytes.
pub const MAX_DEVICE_LEN: usize = 255;
/// Most endpoints one credential may list.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest host part of an endpoint, in bytes.
const MAX_HOST_LEN: usize = 255;
/// Length of a binding (HMAC-SHA256).
const BINDING_LEN: usize = 32;

/// Why a credential could not be issued or read. Not on a hot path: each
/// variant says in one line what is wrong, for an operator or a device log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The account or device name is empty, too long or holds control
    /// characters.
    #[error("invalid {field}: {reason}")]
    InvalidName {
        /// `"account"` or `"device"`.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An endpoint is not of the form `host:port`.
    #[error("invalid endpoint {0:?}: expected host:port with a port in 1..=65535")]
    InvalidEndpoint(String),
    /// More endpoints than [`MAX_ENDPOINTS`].
    #[error("too many endpoints (at most {MAX_ENDPOINTS})")]
    TooManyEndpoints,
    /// The text is not a JSON credential object: syntax, a missing field, an
    /// unknown field or a field of the wrong type.
    #[error("credential JSON: {0}")]
    Json(String),
    /// A hex field holds something other than hex digits.
    #[error("credential field {field} is not hex")]
    BadHex {
        /// The JSON key.
        field: &'static str,
    },
    /// A hex field has the wrong number of digits.
    #[error("credential field {field} must be {digits} hex digits")]
    BadLength {
        /// The JSON key.
        field: &'static str,
        /// How many hex digits it must have.
        digits: usize,
    },
    /// `expires` is not a date of the form `yyyy-MM-ddTHH:mm:ssZ`.
    #[error("credential field expires is not a UTC date of the form yyyy-MM-ddTHH:mm:ssZ")]
    BadDate,
    /// The conn id is the reserved all-zero id (docs/PROTOCOL.md §3).
    #[error("credential conn_id is the reserved all-zero id")]
    ReservedConnId,
    /// The conn id's affinity is not the account's (docs/PROTOCOL.md §4).
    #[error("credential conn_id does not carry the account's affinity")]
    AffinityMismatch,
    /// The binding could not be computed.
    #[error("credential binding: {0}")]
    Binding(#[from] BindingError),
}

/// A device's credential (docs/PROTOCOL.md §4). `Debug` never shows the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The connection's id: 4 random bytes ‖ account affinity.
    pub conn_id: ConnId,
    /// The connection secret `S`, from which both packet keys derive.
    pub secret: ConnSecret,
    /// The Mesh account the connection belongs to.
    pub account: String,
    /// The device within the account.
    pub device: String,
    /// When the credential stops being accepted.
    pub expires: UnixSeconds,
    /// The binding the client sends in every ConnectRequest.
    pub binding: [u8; BINDING_LEN],
    /// Where to reach the service, each `host:port`.
    pub endpoints: Vec<String>,
}

/// The JSON form on the way out; keys in the order of docs/PROTOCOL.md §4.
#[derive(Serialize)]
struct CredentialOut<'a> {
    conn_id: String,
    secret: String,
    account: &'a str,
    device: &'a str,
    expires: String,
    binding: String,
    endpoints: &'a [String],
}

/// The JSON form on the way in: every field required, nothing else allowed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialIn {
    conn_id: String,
    secret: String,
    account: String,
    device: String,
    expires: String,
    binding: String,
    endpoints: Vec<String>,
}

fn check_name(field: &'static str, name: &str, max: usize) -> Result<(), CredentialError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > max {
        "longer than 255 bytes"
    } else if name.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(CredentialError::InvalidName { field, reason })
}

fn check_endpoint(endpoint: &str) -> Result<(), CredentialError> {
    let bad = || CredentialError::InvalidEndpoint(endpoint.to_owned());
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    // An IPv6 literal keeps its colons inside brackets: "[::1]:15099".
    let host_ok = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && !host.chars().any(|c| c.is_control() || c.is_whitespace())
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn check_endpoints(endpoints: &[String]) -> Result<(), CredentialError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(CredentialError::TooManyEndpoints);
    }
    endpoints.iter().try_for_each(|e| check_endpoint(e))
}

fn hex_field<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], CredentialError> {
    if text.len() != 2 * N {
        return Err(CredentialError::BadLength {
            field,
            digits: 2 * N,
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| CredentialError::BadHex { field })?;
    Ok(out)
}

impl Credential {
    /// Issues a credential for `device` of `account`, valid until `expires`:
    /// a fresh conn id from `rng`, its secret and binding from `master`
    /// (docs/PROTOCOL.md §4).
    pub fn issue(
        master: &MasterKey,
        account: &str,
        device: &str,
        expires: UnixSeconds,
        endpoints: Vec<String>,
        rng: &mut impl rand::RngCore,
    ) -> Result<Credential, CredentialError> {
        Self::issue_at_generation(master, 0, account, device, expires, endpoints, rng)
    }

    /// [`Credential::issue`] with the binding made under a revocation
    /// generation (docs/PROTOCOL.md §7.11): what a node issues for an
    /// account or device that was revoked before.
    pub fn issue_at_generation(
        master: &MasterKey,
        generation: u64,
        account: &str,
        device: &str,
        expires: UnixSeconds,
        endpoints: Vec<String>,
        rng: &mut impl rand::RngCore,
    ) -> Result<Credential, CredentialError> {
        check_name("account", account, MAX_ACCOUNT_LEN)?;
        check_name("device", device, MAX_DEVICE_LEN)?;
        check_endpoints(&endpoints)?;
        let conn_id = ConnId::generate(account, rng);
        let binding = BindingKey::for_generation(master, generation)
            .binding(conn_id, expires, account, device)?;
        Ok(Credential {
            conn_id,
            secret: master.secret(conn_id),
            account: account.to_owned(),
            device: device.to_owned(),
            expires,
            binding,
            endpoints,
        })
    }

    /// Checks the credential against the master key at `now`: the secret must
    /// be the conn id's, and the binding must verify (docs/PROTOCOL.md §4).
    pub fn verify(&self, master: &MasterKey, now: UnixSeconds) -> Result<(), BindingError> {
        if master.secret(self.conn_id) != self.secret {
            return Err(BindingError::Invalid);
        }
        BindingKey::from_master(master).verify(
            self.conn_id,
            self.expires,
            &self.account,
            &self.device,
            &self.binding,
            now,
        )
    }

    /// The credential as pretty JSON with the keys of docs/PROTOCOL.md §4.
    pub fn to_json(&self) -> String {
        let out = CredentialOut {
            conn_id: self.conn_id.to_hex(),
            secret: self.secret.to_hex(),
            account: &self.account,
            device: &self.device,
            expires: self.expires.to_string(),
            binding: hex::encode(self.binding),
            endpoints: &self.endpoints,
        };
        // A struct of strings has no map keys or floats that could fail.
        serde_json::to_string_pretty(&out).expect("a struct of strings always serializes")
    }

    /// Reads a credential, refusing unknown or missing fields, bad hex, bad
    /// lengths, bad dates, bad names and endpoints, and a conn id that is
    /// reserved or does not carry the account's affinity.
    pub fn from_json(text: &str) -> Result<Credential, CredentialError> {
        let wire: CredentialIn = serde_json::from_str(text)
            .map_err(|e| CredentialError::Json(e.to_string().replace('\n', " ")))?;
        check_name("account", &wire.account, MAX_ACCOUNT_LEN)?;
        check_name("device", &wire.device, MAX_DEVICE_LEN)?;
        check_endpoints(&wire.endpoints)?;
        let conn_id = ConnId(hex_field::<CONN_ID_LEN>("conn_id", &wire.conn_id)?);
        if conn_id.is_reserved() {
            return Err(CredentialError::ReservedConnId);
        }
        if conn_id.affinity() != account_affinity(&wire.account) {
            return Err(CredentialError::AffinityMismatch);
        }
        let secret = ConnSecret(hex_field::<KEY_LEN>("secret", &wire.secret)?);
        let binding = hex_field::<BINDING_LEN>("binding", &wire.binding)?;
        let expires =
            UnixSeconds::parse(wire.expires.as_bytes()).map_err(|_| CredentialError::BadDate)?;
        Ok(Credential {
            conn_id,
            secret,
            account: wire.account,
            device: wire.device,
            expires,
            binding,
            endpoints: wire.endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const EXP: UnixSeconds = UnixSeconds(1_798_761_600);
    const NOW: UnixSeconds = UnixSeconds(1_798_000_000);

    fn master() -> MasterKey {
        MasterKey::new([42; 32])
    }

    fn issued() -> Credential {
        let mut rng = StdRng::seed_from_u64(3);
        Credential::issue(
            &master(),
            "alice@example.com",
            "phone",
            EXP,
            vec!["mpp.example.com:15099".into(), "[::1]:15099".into()],
            &mut rng,
        )
        .expect("valid request")
    }

    #[test]
    fn issue_json_round_trip_verifies() {
        let c = issued();
        assert_eq!(c.conn_id.affinity(), account_affinity("alice@example.com"));
        let json = c.to_json();
        let back = Credential::from_json(&json).expect("own output parses");
        assert_eq!(back, c);
        assert_eq!(back.verify(&master(), NOW), Ok(()));
        assert_eq!(
            back.verify(&MasterKey::new([1; 32]), NOW),
            Err(BindingError::Invalid)
        );
        assert_eq!(back.verify(&master(), EXP), Err(BindingError::Expired));
        let keys: Vec<&str> = json
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split_once('"'))
            .filter(|(_, rest)| rest.starts_with(':'))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "conn_id",
                "secret",
                "account",
                "device",
                "expires",
                "binding",
                "endpoints"
            ]
        );
        assert!(json.contains("\"expires\": \"2027-01-01T00:00:00Z\""));
        assert!(!format!("{c:?}").contains(&c.secret.to_hex()));
    }

    #[test]
    fn tampered_credentials_do_not_verify() {
        let c = issued();
        let mut t = c.clone();
        t.account = "mallory@example.com".into();
        assert_eq!(t.verify(&master(), NOW), Err(BindingError::Invalid));
        let mut t = c.clone();
        t.device = "laptop".into();
        assert_eq!(t.verify(&master(), NOW), Err(BindingError::Invalid));
        let mut t = c.clone();
        t.expires = UnixSeconds(EXP.0 + 86_400);
        assert_eq!(t.verify(&master(), NOW), Err(BindingError::Invalid));
        let mut t = c.clone();
        t.binding[7] ^= 4;
        assert_eq!(t.verify(&master(), NOW), Err(BindingError::Invalid));
        let mut t = c;
        t.secret.0[0] ^= 1;
        assert_eq!(t.verify(&master(), NOW), Err(BindingError::Invalid));
    }

    #[test]
    fn issue_validates_input() {
        let mut rng = StdRng::seed_from_u64(1);
        let m = master();
        let mut issue = |a: &str, d: &str, e: Vec<String>| {
            Credential::issue(&m, a, d, EXP, e, &mut rng).map(|_| ())
        };
        assert!(matches!(
            issue("", "d", vec![]),
            Err(CredentialError::InvalidName {
                field: "account",
                ..
            })
        ));
        assert!(matches!(
            issue("a", "", vec![]),
            Err(CredentialError::InvalidName {
                field: "device",
                ..
            })
        ));
        assert!(issue(&"a".repeat(256), "d", vec![]).is_err());
        assert!(issue(&"a".repeat(255), "d", vec![]).is_ok());
        assert!(issue("a\nb", "d", vec![]).is_err());
        assert!(issue("a", "d\u{7f}", vec![]).is_err());
        for bad in [
            "host",
            "host:",
            ":80",
            "host:0",
            "host:65536",
            "host:+80",
            "::1:80",
            "[::1:80",
            "::1]:80",
            "a b:1",
        ] {
            assert_eq!(
                issue("a", "d", vec![bad.into()]),
                Err(CredentialError::InvalidEndpoint(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            issue("a", "d", vec!["h:1".into(); MAX_ENDPOINTS + 1]),
            Err(CredentialError::TooManyEndpoints)
        );
        assert!(issue("a", "d", vec!["h:1".into(); MAX_ENDPOINTS]).is_ok());
        assert!(issue("a", "d", vec!["10.0.0.1:65535".into()]).is_ok());
    }

    fn edited(key: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value =
            serde_json::from_str(&issued().to_json()).expect("own output is JSON");
        v[key] = value;
        v.to_string()
    }

    /// Whether an error is the one a case expects.
    type Expect = fn(&CredentialError) -> bool;

    #[test]
    fn from_json_rejects_bad_input() {
        use serde_json::json;
        let c = issued();
        let cases: Vec<(String, Expect)> = vec![
            (String::new(), |e| matches!(e, CredentialError::Json(_))),
            ("[]".into(), |e| matches!(e, CredentialError::Json(_))),
            (edited("extra", json!(1)), |e| {
                matches!(e, CredentialError::Json(_))
            }),
            (edited("account", json!(5)), |e| {
                matches!(e, CredentialError::Json(_))
            }),
            (edited("conn_id", json!("0102")), |e| {
                matches!(
                    e,
                    CredentialError::BadLength {
                        field: "conn_id",
                        digits: 16
                    }
                )
            }),
            (edited("conn_id", json!("zz02030405060708")), |e| {
                matches!(e, CredentialError::BadHex { field: "conn_id" })
            }),
            (edited("conn_id", json!("0000000000000000")), |e| {
                matches!(e, CredentialError::ReservedConnId)
            }),
            (edited("conn_id", json!("0102030405060708")), |e| {
                matches!(e, CredentialError::AffinityMismatch)
            }),
            (edited("secret", json!(c.secret.to_hex()[2..])), |e| {
                matches!(
                    e,
                    CredentialError::BadLength {
                        field: "secret",
                        digits: 64
                    }
                )
            }),
            (edited("binding", json!("g".repeat(64))), |e| {
                matches!(e, CredentialError::BadHex { field: "binding" })
            }),
            (edited("expires", json!("2027-01-01 00:00:00")), |e| {
                matches!(e, CredentialError::BadDate)
            }),
            (edited("expires", json!("2027-02-30T00:00:00Z")), |e| {
                matches!(e, CredentialError::BadDate)
            }),
            (edited("device", json!("")), |e| {
                matches!(
                    e,
                    CredentialError::InvalidName {
                        field: "device",
                        ..
                    }
                )
            }),
            (edited("endpoints", json!(["nope"])), |e| {
                matches!(e, CredentialError::InvalidEndpoint(_))
            }),
        ];
        for (text, expected) in cases {
            let err = Credential::from_json(&text).expect_err(&text);
            assert!(expected(&err), "{text}: {err:?}");
            assert!(!err.to_string().contains('\n'));
        }
        let mut v: serde_json::Value = serde_json::from_str(&c.to_json()).expect("JSON");
        if let Some(obj) = v.as_object_mut() {
            obj.remove("endpoints");
        }
        let err = Credential::from_json(&v.to_string()).expect_err("missing field");
        assert!(err.to_string().contains("endpoints"), "{err}");
    }
}
