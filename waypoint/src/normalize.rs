//! The request path as routes and L7 policy see it, and as the backend gets it.
//!
//! Routes and policies match paths by prefix and by equality. A client could step
//! around `DENY paths: ["/admin*"]` with `//admin`, `/./admin`, `/x/../admin` or
//! `/%61dmin`, which most backends serve as `/admin`. So before anything matches, the
//! path is normalised the way Istio's `MERGE_SLASHES` does (RFC 3986 6.2.2):
//!
//! ```text
//!  %XX of an unreserved character (A-Z a-z 0-9 - . _ ~)  --> the character
//!  any other %xx                                         --> %XX (upper case), kept
//!  a % that starts no escape                             --> %25
//!  \                                                     --> /
//!  // (any run of slashes)                               --> /
//!  . and .. segments                                     --> removed (RFC 3986 5.2.4)
//! ```
//!
//! An encoded slash (`%2F`) stays encoded: it is data, not a separator, for the
//! backends that tell the two apart. The query is left alone. The normalised path is
//! what the backend is sent, so it serves what the policy checked.

use std::borrow::Cow;

/// `path` normalised; borrowed when it already is (the common case costs one scan).
pub fn path(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || is_normal(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || out.is_empty() {
        normal.push('/');
    }
    Cow::Owned(normal)
}

/// Nothing to change: no escape, no backslash, no empty, `.` or `..` segment.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    !bytes.iter().any(|b| matches!(b, b'%' | b'\\'))
        && !path.contains("//")
        && !path.split('/').skip(1).any(|s| s == "." || s == "..")
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Escapes of unreserved characters decoded, the others in upper case; backslashes as
/// slashes.
fn decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
                match hex {
                    Some(b) if unreserved(b) => out.push(char::from(b)),
                    Some(b) => out.push_str(&format!("%{b:02X}")),
                    // A `%` that starts no escape is data: escaped itself, so that
                    // what follows cannot form an escape once its neighbours are
                    // decoded (`/%%361dmin` must not become `/%61dmin`, which a
                    // backend would read as `/admin`).
                    None => {
                        out.push_str("%25");
                        i += 1;
                        continue;
                    }
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // Paths are ASCII on the wire (hyper refuses others); any other byte is
                // copied with the character it starts.
                let c = path[i..].chars().next().unwrap_or('/');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_step_around_a_prefix_become_the_path_they_name() {
        for (raw, normal) in [
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/../../admin/users", "/admin/users"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/a/%2E/admin", "/a/admin"),
            ("/\\admin", "/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/%7euser/", "/~user/"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
        ] {
            assert_eq!(path(raw), normal, "{raw}");
        }
    }

    #[test]
    fn what_is_data_stays_and_normal_paths_are_not_copied() {
        for (raw, normal) in [
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%20b", "/a%20b"),
            ("/100%", "/100%25"),
            ("/a%zz", "/a%25zz"),
            ("/a%+1", "/a%25+1"),
            ("/%%361dmin", "/%2561dmin"),
            ("/a/b/", "/a/b/"),
            ("/", "/"),
            ("*", "*"),
            ("/v1.2/..x/.y", "/v1.2/..x/.y"),
        ] {
            assert_eq!(path(raw), normal, "{raw}");
        }
        for normal in ["/", "/admin/users", "/a.b/c_d~e-f", "/v1.2/..x/.y"] {
            assert!(matches!(path(normal), Cow::Borrowed(_)), "{normal}");
        }
    }
}
