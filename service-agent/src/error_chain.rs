//! Errors told down to their root cause. A failed API request surfaces as
//! "client error (Connect)"; what a person can act on (the certificate is
//! not trusted, nothing listens there, the name does not resolve, the
//! credentials are refused) is several `source()`s further down.
use std::error::Error;

/// `e` and each of its sources, joined by ": ", skipping a source whose
/// text the outer messages already include; then a hint naming the cause
/// when it is one of the usual ones.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut hint = hint_for(e);
    let mut next = e.source();
    while let Some(s) = next {
        let m = s.to_string();
        if !m.is_empty() && !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        // The innermost recognised cause is the most precise.
        hint = hint_for(s).or(hint);
        next = s.source();
    }
    match hint {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}

/// The HTTP code of an API server's refusal, however it is wrapped.
fn api_status(e: &(dyn Error + 'static)) -> Option<u16> {
    use kube::core::Status;
    if let Some(kube::Error::Api(s)) = e.downcast_ref::<kube::Error>() {
        return Some(s.code);
    }
    e.downcast_ref::<Status>()
        .or_else(|| e.downcast_ref::<Box<Status>>().map(|b| &**b))
        .map(|s| s.code)
}

fn hint_for(e: &(dyn Error + 'static)) -> Option<&'static str> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        let hint = match io.kind() {
            ConnectionRefused => Some("connection refused: nothing listens at the server address"),
            TimedOut => Some("timed out: the server address is unreachable from here"),
            HostUnreachable | NetworkUnreachable => {
                Some("no route to the server address from this network namespace")
            }
            _ => None,
        };
        if hint.is_some() {
            return hint;
        }
    }
    if let Some(code) = api_status(e) {
        return match code {
            401 => Some(
                "401 Unauthorized: the API server refused the credentials (token or client certificate)",
            ),
            403 => Some(
                "403 Forbidden: the account lacks RBAC permission to list/watch these resources",
            ),
            _ => None,
        };
    }
    // rustls and DNS errors reach here only as text through hyper's wrappers.
    let m = e.to_string();
    if m.contains("invalid peer certificate") {
        return Some(
            "TLS: the API server's certificate is not accepted: check certificate-authority in the kubeconfig, and the certificate's names and dates",
        );
    }
    if m.contains("failed to lookup address") || m.contains("Name or service not known") {
        return Some("DNS: the API server's host name does not resolve");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_root_cause_is_named_once() {
        let e = Outer(Middle(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let s = error_chain(&e);
        assert!(
            s.starts_with("client error (Connect): tcp connect error: "),
            "{s}"
        );
        // Middle already printed the io error: it is not repeated.
        assert_eq!(s.matches("refused").count(), 2, "{s}");
        assert!(s.ends_with("(connection refused: nothing listens at the server address)"));
    }

    #[test]
    fn a_tls_refusal_wrapped_in_io_is_named() {
        let e = Outer(Middle(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        )));
        assert!(error_chain(&e).contains("certificate-authority"));
    }

    #[test]
    fn api_refusals_are_told_apart() {
        let status = |code| {
            kube::Error::Api(
                kube::core::Status::failure("denied", "Forbidden")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(error_chain(&status(403)).contains("RBAC"));
        assert!(error_chain(&status(401)).contains("credentials"));
        // Another code gets no hint: the chain is the error's own text.
        let e = status(404);
        assert_eq!(error_chain(&e), e.to_string());
    }
}
