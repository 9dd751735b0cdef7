//! The `mpp decode` and `mpp encode` subcommands, run as a user would: the
//! vectors convert both ways, stdin works, and every bad input is one
//! `mpp: <reason>` line on stderr with exit status 2.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

/// The vectors of docs/PROTOCOL.md §1 that have both a `.hex` and a `.json` form.
const VECTORS: [&str; 4] = ["heartbeat", "connect", "connect-response", "notify"];

/// Status for invalid input and for usage errors.
const EXIT_INVALID_INPUT: i32 = 2;

fn vector(name: &str, ext: &str) -> String {
    let path = format!("{}/tests/vectors/{name}.{ext}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The vector's JSON text on one line, keys in the file's order.
fn one_line_json(name: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(&vector(name, "json")).unwrap_or_else(|e| panic!("{name}: {e}"));
    value.to_string()
}

/// Runs `mpp` with `args`, feeding `stdin` (if any) to it.
fn mpp(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mpp"));
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn mpp");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The inputs are far smaller than a pipe buffer; a child that exits
        // without reading is not an error here.
        let _ = pipe.write_all(input);
    }
    child.wait_with_output().expect("wait for mpp")
}

fn stdout(output: &Output) -> &str {
    std::str::from_utf8(&output.stdout).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> &str {
    std::str::from_utf8(&output.stderr).expect("stderr is UTF-8")
}

/// Asserts success with exactly `expected` and a newline on stdout, nothing on stderr.
fn assert_prints(output: &Output, expected: &str) {
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(output));
    assert_eq!(stdout(output), format!("{expected}\n"));
    assert_eq!(stderr(output), "");
}

/// Asserts exit status 2, no output and one `mpp: ...` line on stderr containing `reason`.
fn assert_invalid(output: &Output, reason: &str) {
    let err = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(EXIT_INVALID_INPUT),
        "stderr: {err}"
    );
    assert_eq!(stdout(output), "");
    assert!(err.starts_with("mpp: "), "{err:?}");
    assert!(err.ends_with('\n'), "{err:?}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains(reason), "{err:?} lacks {reason:?}");
}

#[test]
fn decode_prints_each_vector_as_one_line_of_json() {
    for name in VECTORS {
        let hex = vector(name, "hex");
        assert_prints(&mpp(&["decode", hex.trim()], None), &one_line_json(name));
    }
}

#[test]
fn decode_pretty_prints_the_vector_file() {
    let hex = vector("notify", "hex");
    assert_prints(
        &mpp(&["decode", "--pretty", hex.trim()], None),
        vector("notify", "json").trim_end(),
    );
}

#[test]
fn decode_tolerates_whitespace_and_a_0x_prefix() {
    let hex = vector("heartbeat", "hex");
    let hex = hex.trim();
    let spaced: Vec<&str> = (0..hex.len()).step_by(2).map(|i| &hex[i..i + 2]).collect();
    let expected = one_line_json("heartbeat");
    for input in [
        format!("  {hex}\n"),
        format!("0x{hex}"),
        format!(" 0X{}", hex.to_uppercase()),
        format!("0x {}", spaced.join(" ")),
        spaced.join("\n\t"),
    ] {
        assert_prints(&mpp(&["decode", &input], None), &expected);
    }
}

#[test]
fn decode_reads_raw_bytes_from_stdin() {
    for name in VECTORS {
        let bytes = hex::decode(vector(name, "hex").trim()).expect("vector hex");
        assert_prints(&mpp(&["decode", "-"], Some(&bytes)), &one_line_json(name));
    }
}

#[test]
fn encode_prints_each_vector_as_hex() {
    for name in VECTORS {
        let json = vector(name, "json");
        let hex = vector(name, "hex");
        assert_prints(&mpp(&["encode", &json], None), hex.trim());
        assert_prints(&mpp(&["encode", &one_line_json(name)], None), hex.trim());
    }
}

#[test]
fn encode_reads_json_from_stdin() {
    for name in VECTORS {
        let json = vector(name, "json");
        let hex = vector(name, "hex");
        assert_prints(&mpp(&["encode", "-"], Some(json.as_bytes())), hex.trim());
    }
}

#[test]
fn invalid_hex_exits_2() {
    assert_invalid(&mpp(&["decode", "7bzz"], None), "invalid hex");
    assert_invalid(&mpp(&["decode", "7bb"], None), "invalid hex");
    assert_invalid(&mpp(&["decode", "0x"], None), "no hex digits");
    assert_invalid(&mpp(&["decode", "  "], None), "no hex digits");
}

#[test]
fn invalid_json_exits_2() {
    assert_invalid(
        &mpp(&["encode", "{\"PresenceHeartbeat\":"], None),
        "invalid JSON",
    );
    assert_invalid(
        &mpp(&["encode", "-"], Some(b"not json\nat all\n")),
        "invalid JSON",
    );
    assert_invalid(&mpp(&["encode", "-"], Some(b"\xff\xfe")), "UTF-8");
    assert_invalid(
        &mpp(&["encode", r#"{"PresenceHeartbeat":{"Serial":"5"}}"#], None),
        "Serial",
    );
    assert_invalid(
        &mpp(&["encode", r#"{"PresenceHeartbeat":{"Serail":5}}"#], None),
        "unknown field",
    );
}

#[test]
fn unknown_message_exits_2() {
    assert_invalid(
        &mpp(&["encode", r#"{"PresenceHello":{"Serial":5}}"#], None),
        "unknown message",
    );
    // `{ B4 0D "PresenceHello" { } }`
    let hex = format!("7bb40d{}7b7d7d", hex::encode("PresenceHello"));
    assert_invalid(&mpp(&["decode", &hex], None), "unknown message");
}

/// The vector's hex with its DateTime as this project wrote it before:
/// `80 14 …` instead of the reference's JSON text `22 … 22`.
fn with_string_datetime(name: &str) -> String {
    let hex = vector(name, "hex");
    let quoted = format!("22{}22", hex::encode("2026-11-21T12:00:00Z"));
    assert!(hex.contains(&quoted), "{name}: no quoted DateTime");
    hex.trim().replace(
        &quoted,
        &format!("8014{}", hex::encode("2026-11-21T12:00:00Z")),
    )
}

/// `{ B4 11 "PresenceHeartbeat" { B4 06 "Serial" A0 05 <more> } }` as hex.
fn heartbeat_hex_with(more: &[u8]) -> String {
    let mut bytes = b"{\xb4\x11PresenceHeartbeat{\xb4\x06Serial\xa0\x05".to_vec();
    bytes.extend_from_slice(more);
    bytes.extend_from_slice(b"}}");
    hex::encode(bytes)
}

#[test]
fn decode_reads_the_older_string_datetime() {
    for name in ["connect-response", "notify"] {
        let old = with_string_datetime(name);
        assert_prints(&mpp(&["decode", &old], None), &one_line_json(name));
        let bytes = hex::decode(&old).expect("hex");
        assert_prints(&mpp(&["decode", "-"], Some(&bytes)), &one_line_json(name));
    }
}

#[test]
fn decode_reads_a_json_text_string() {
    // Service as JSON text with escapes: `"a\u00e9\n"`.
    let hex = heartbeat_hex_with(b"\xb4\x07Service\"a\\u00e9\\n\"");
    assert_prints(
        &mpp(&["decode", &hex], None),
        r#"{"PresenceHeartbeat":{"Serial":5,"Service":"aé\n"}}"#,
    );
}

#[test]
fn malformed_json_text_exits_2() {
    for (more, reason) in [
        (&b"\xb4\x07Service\"abc"[..], "truncated"),
        (b"\xb4\x07Service\"a\\x\"", "invalid escape"),
        (b"\xb4\x07Service\"a\x01\"", "control character"),
        (b"\xb4\x07Service\"\xff\"", "UTF-8"),
        // An unknown field's text value, skipped, runs to the end.
        (b"\xb4\x03Now\"2026-11-21T12:00:00Z", "truncated"),
    ] {
        assert_invalid(&mpp(&["decode", &heartbeat_hex_with(more)], None), reason);
    }
}

#[test]
fn truncated_or_trailing_bytes_exit_2() {
    let bytes = hex::decode(vector("notify", "hex").trim()).expect("vector hex");
    let cut = &bytes[..bytes.len() - 1];
    assert_invalid(&mpp(&["decode", &hex::encode(cut)], None), "truncated");
    assert_invalid(&mpp(&["decode", "-"], Some(cut)), "truncated");
    assert_invalid(&mpp(&["decode", "-"], Some(b"")), "truncated");
    let long = [&bytes[..], b"\0"].concat();
    assert_invalid(&mpp(&["decode", "-"], Some(&long)), "trailing bytes");
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    for args in [&[][..], &["decode"], &["frobnicate"], &["encode", "a", "b"]] {
        let output = mpp(args, None);
        assert_eq!(output.status.code(), Some(EXIT_INVALID_INPUT), "{args:?}");
        assert_eq!(stdout(&output), "", "{args:?}");
    }
    for args in [
        &["--help"][..],
        &["decode", "--help"],
        &["encode", "--help"],
    ] {
        let output = mpp(args, None);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(stdout(&output).contains("Examples:"), "{args:?}");
    }
}
